"""What a stage's command would refuse, checked before DVC runs the stage.

DVC removes a stage's outputs before it starts the stage's command, so an error the command
then finds (an epsilon no noise can certify, a corpus path that does not exist) would leave
the last good outputs gone, and under Prefect the error would arrive as DVC's bare "failed to
reproduce". The scheduler's tasks (tasks/stages.py, for a stage DVC will run), the
fine-tuning dispatcher and the lanes (privtune/lanes.py) call `check` first, a profile's run
(`python -m privtune.profiles run`) `check_project`; `privtune check` runs `check_all`, before
a `dvc repro` by hand. It needs no model: prepare's splits built in memory (the corpus read
and checked, split sizes, room for the canaries and members), the downstream task the base
stage checks first (`evaluate.task`: a cloze pattern must mark answers), and the fine-tuning
plan (N, q, steps, delta, calibrated noise; the Gaussian calibration is cached on disk, so the
stage does not pay twice) with what the method's controller refuses about it (an LMO-DP law
no grid candidate fits: its search, about a second on the paper grid, is paid again by the
stage unless the method's `cache` file holds it). `check_all` also tells whether the planted
canaries lie within base.max_length tokens, with the base stage's tokenizer (not its model).
"""

from __future__ import annotations

from pathlib import Path

from privtune.config import PREPARED_DIR, Params, load_params

STAGES = ("prepare", "base", "finetune")  # the stages `check` has anything to say about


def check(root: str | Path, target: str) -> None:
    """Raise the stage's own error (a PrivtuneError naming the field and the fix) for what
    it would refuse; ``target`` is a DVC stage name (``prepare``, ``finetune@dpsgd``).
    Stages other than prepare and finetune, a finetune whose data is not prepared yet (DVC
    then says so), and any other failure here (a bug, an unreadable file) are left to the
    stage itself: it makes the same checks and reports them as its own."""
    from privtune.errors import PrivtuneError

    root = Path(root)
    stage, _, name = target.partition("@")
    try:
        if stage == "prepare":
            from privtune.stages.prepare import build

            build(load_params(root / "params.yaml"), root)  # the corpus read, nothing written
        elif stage == "base" and (root / PREPARED_DIR / "test.jsonl").is_file():
            from privtune.downstream import check_task
            from privtune.stages.common import evaluated_split, read_split

            params = load_params(root / "params.yaml")
            test = evaluated_split(root, params)
            check_task(test, read_split(root, "train"), params.evaluate)  # its first check
        elif stage == "finetune" and (root / PREPARED_DIR / "train.jsonl").is_file():
            from privtune.stages.finetune import finetune_plan

            finetune_plan(load_params(root / "params.yaml"), name, root)
    except PrivtuneError:
        raise
    except Exception:  # noqa: BLE001 (advisory: the stage reports it with its traceback)
        return


def check_project(root: str | Path, methods: list[str] | None = None) -> None:
    """`check_all` before a whole `dvc repro` of the project at ``root`` (a profile's run, the
    pipeline flow), for ``methods`` (default: all): privtune's own errors raised, anything
    else left to the stages, as in `check`; its warnings said before the run starts (canaries
    a short max_length cuts, an attack without power for a gate), not after it trained."""
    from privtune.errors import PrivtuneError
    from privtune.progress import notice

    try:
        lines = check_all(load_params(Path(root) / "params.yaml"), root, methods)
    except PrivtuneError:
        raise
    except Exception:  # noqa: BLE001 (advisory: the stage reports it with its traceback)
        return
    for line in lines:
        if line.startswith("warning:"):
            notice(line)


def check_all(params: Params, root: str | Path, methods: list[str] | None = None) -> list[str]:
    """`privtune check`: prepare's splits, then every method's (or those of ``methods``)
    fine-tuning plan from those splits (not from data/prepared, which may be an older
    corpus's); one line each, counts and the plan only (never a record)."""
    from privtune.downstream import check_task
    from privtune.errors import PrivtuneError
    from privtune.stages.prepare import build

    root = Path(root)
    built = build(params, root)
    splits = built.splits
    counts = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
    lines = [f"prepare: {counts} records"]
    if built.groups is not None:  # counts only, never an id
        g = built.groups
        lines.append(
            f"prepare: {g['groups']['train']} patients ({g['column']}) in train, up to "
            f"{g['train_records_per_group_max']} records each (mean "
            f"{g['train_records_per_group_mean']:g}; left out: "
            f"{g['records_left_out']['attack_split_boundary']} at the attack split's edge, "
            f"{g['records_left_out']['cap']} by prepare.max_records_per_group)"
        )
    # the downstream task the base stage checks first (a cloze pattern that marks no answer)
    check_task(splits["test"][: params.evaluate.max_records], splits["train"], params.evaluate)
    # the corpus's records split (the public passages and the audit's canaries are not)
    audit = sum(c.repetitions for c in built.audit)  # the audit canaries included in train
    private = sum(len(rows) for name, rows in splits.items() if name != "public") - audit
    left_by_cap = 0 if built.groups is None else built.groups["records_left_out"]["cap"]
    if warning := _attack_power_warning(params, private, left_by_cap):
        lines.append(warning)
    if warning := _unseen_canaries_warning(params, root, built):
        lines.append(warning)
    most = None if built.groups is None else built.groups["train_records_per_group_max"]
    names = params.methods if methods is None else methods
    for name in names:
        try:
            lines.append(_entry_line(params, name, root, len(splits["train"]), most))
        except PrivtuneError as err:  # which entry: its field may be shared (finetune.epsilon)
            raise type(err)(err.field, f"{err.problem} (finetune@{name})", err.fix) from None
    if warning := _epsilon_gate_warning(params, names):
        lines.append(warning)
    return lines


def _epsilon_gate_warning(params: Params, names: list[str]) -> str | None:
    """A warning when the private entries will spend more than the promotion gate allows:
    they would train, then every one be refused (a sweep past the gate may mean it, so this
    is not an error as a delta above its gate is)."""
    from privtune.control.registry import controller_class

    epsilon, gate = params.finetune.epsilon, params.registry.gates.max_epsilon
    private = [n for n in names if controller_class(params.method(n)[0], n).private]
    if epsilon <= gate or not private:
        return None
    return (
        f"warning: finetune.epsilon {epsilon:g} is above registry.gates.max_epsilon {gate:g}: "
        f"`privtune promote` will refuse {', '.join(private)} on gate epsilon. Fix: "
        f"finetune.epsilon {gate:g} or lower, or raise registry.gates.max_epsilon if your "
        "privacy officer agrees"
    )


def _attack_power_warning(params: Params, n_records: int, left_by_cap: int = 0) -> str | None:
    """A warning when the attack split cannot measure the TPR at 1 % FPR that a promotion
    gate reads: every model would run to the end and be refused as insufficient evidence."""
    from privtune.attacks.roc import non_members_needed, resolvable
    from privtune.stages.prepare import cap_fix, records_for_members

    fpr, members = 0.01, params.attack.members
    if resolvable(fpr, members):
        return None
    need = non_members_needed(fpr)
    return (
        f"warning: attack.members {members} (as many non-members) cannot measure the TPR at "
        f"{fpr:.0%} FPR, which needs {need} non-members: `privtune promote` will refuse every "
        f"version on gate mia_tpr_at_fpr_0.01 (insufficient evidence). Fix: attack.members "
        f"{need}, which needs at least {records_for_members(need, params)} records (these are "
        f"{n_records})" + (f"; or {cap_fix(left_by_cap)}" if left_by_cap else "")
    )


def _unseen_canaries_warning(params: Params, root: Path, built) -> str | None:
    """The attack stage's warning of planted canary occurrences past base.max_length, before
    anything trains: from the tokenizer the base stage will use (trained on the public split
    for `build`, a fraction of a second; read from the directory or the GGUF otherwise) and
    the max_length it will resolve. A base.source that names nothing is the stage's error."""
    from privtune.data.canaries import planted_and_trained, unseen_canaries_warning
    from privtune.stages.base import checked_source, resolve_max_length

    source = checked_source(params.base, root)  # a bad source: the base stage's error, now
    planting = any(c.repetitions for c in built.canaries)
    tokenizer = _base_tokenizer(params, source, built.splits["public"]) if planting else None
    if tokenizer is None:
        return None
    train = [r["text"] for r in built.splits["train"]]
    max_length, _ = resolve_max_length(params.base, tokenizer, train)
    planted, trained = planted_and_trained(built.canaries, train, tokenizer, max_length)
    return unseen_canaries_warning(planted, trained, max_length)


def _base_tokenizer(params: Params, source, public: list[dict]):
    """The base stage's tokenizer for its checked ``source``, without the model (None where
    it cannot be read here: the stage's load says what is missing)."""
    from privtune.config import SOURCE_BUILD

    if source == SOURCE_BUILD:
        from privtune.data.tokenization import train_tokenizer

        return train_tokenizer([r["text"] for r in public], params.base.vocab_size)
    from transformers import AutoTokenizer

    directory, gguf = (source, None) if isinstance(source, Path) else (source[1].parent, source[1])
    try:
        return AutoTokenizer.from_pretrained(
            directory, gguf_file=gguf and gguf.name, local_files_only=True
        )
    except (OSError, ValueError):
        return None


def _entry_line(
    params: Params, name: str, root: Path, n_texts: int, group: int | None = None
) -> str:
    """One entry's line of `privtune check`: its plan (checked) and the noise it will add;
    with ``group`` (the most training records of one patient), what that patient gets."""
    from privtune.control.registry import controller_class, describe_controller
    from privtune.privacy.group import describe
    from privtune.stages.finetune import finetune_plan
    from privtune.train import plan_context

    f = params.finetune
    method, options = params.method(name)
    plan = finetune_plan(params, name, root, n_texts=n_texts)
    # what the entry resolved to: its method (when not its name) and options, validated
    given = [method] * (method != name) + [f"{k} {v}" for k, v in sorted(options.items())]
    what = f" ({', '.join(given)})" if given else ""
    line = f"finetune@{name}{what}: N {plan.n_records}, q {plan.sample_rate:.3g}, "
    line += f"{plan.steps} steps"
    if not controller_class(method, name).private:
        return line + ", not private"
    # the controller's own account of its noise (an LMO-DP law, a decaying schedule), else
    # the constant Gaussian multiplier of the plan
    noise = describe_controller(method, plan_context(plan, f), options, name) or (
        f"noise multiplier {plan.calibrated_noise:.3g} for epsilon {f.epsilon:g} ({f.accountant})"
    )
    line = f"{line}, delta {plan.delta:.2g}, {noise}"
    return line if group is None else f"{line}; {describe(group, f.epsilon, plan.delta)}"
