"""Stage `attack@<name>`: membership inference, canary exposure and extraction, and the
one-run privacy audits of a fine-tuned model (logged to its MLflow run by `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import BASE_DIR, METRICS_DIR, PLOTS_DIR, PREPARED_DIR, AttackParams, Params
from privtune.errors import AuditViolation, DataError
from privtune.progress import notice
from privtune.stages.common import (
    PREPARE_AGAIN,
    fine_tuned_dir,
    load_base,
    read_input,
    read_split,
    resolved_max_length,
)


def _finetune_info(path: Path) -> tuple[dict[str, Any], float]:
    """finetune.json, and its plan's δ (the claim the audits test)."""
    info = io.read_json(path)
    return info, float(info["plan"]["delta"])


def read_canaries(root: Path) -> list:
    """The prepared text canaries (prepare's canaries.json)."""
    from privtune.data.canaries import load_canaries

    return read_input(root / PREPARED_DIR / "canaries.json", load_canaries, PREPARE_AGAIN)


def membership_sets(
    root: Path, a: AttackParams, canaries: list | None = None, train: list[dict] | None = None
) -> tuple[list[dict], list[dict]]:
    """attack.members members (ordinary training records: canaries are measured by exposure
    and the audit) and as many non-members from the attack split, records no stage trained,
    validated or evaluated on; fewer than asked is an error, never a quietly weaker attack.
    The register stage counts them the same way for results that predate `mia_members`.
    ``canaries`` and ``train``: the prepared ones, when the caller has read them already."""
    from privtune.attacks.membership import balanced_sets, without_canaries

    canaries = read_canaries(root) if canaries is None else canaries
    train = read_split(root, "train") if train is None else train
    members = without_canaries([r for r in train if r.get("kind") != "audit_canary"], canaries)
    held_out = read_split(root, "attack")
    for side, found, fix in [
        ("members", members, "lower attack.members or provide more records"),
        ("non-members", held_out, "run `dvc repro prepare` (its attack split follows it)"),
    ]:
        if len(found) < a.members:
            raise DataError(
                "attack.members",
                f"{a.members} {side} wanted, the prepared data has {len(found)}",
                fix,
            )
    return balanced_sets(members, held_out, a.members, a.seed)


def _canary_coverage(canaries, train: list[dict], tokenizer, max_length: int) -> dict[str, float]:
    """How many planted canary occurrences training could see (within base.max_length); says
    so, before the attacks run, when some could not, as their exposure and extraction then
    understate memorisation (`privtune check` says the same before training)."""
    from privtune.data.canaries import planted_and_trained, unseen_canaries_warning

    texts = [r["text"] for r in train]
    planted, trained = planted_and_trained(canaries, texts, tokenizer, max_length)
    if warning := unseen_canaries_warning(planted, trained, max_length):
        notice(warning)
    return {
        "canary_occurrences_planted": float(planted),
        "canary_occurrences_trained": float(trained),
    }


def attack(params: Params, name: str, root: Path = Path("."), show_progress: bool = True):
    """Attack the model of `methods.<name>`; fail loudly if the audit beats the claim."""
    from privtune.attacks.exposure import default_chunk_size
    from privtune.attacks.reference_cache import ReferenceCache
    from privtune.attacks.run import AttackConfig, run_attacks
    from privtune.data.canaries import load_canaries
    from privtune.modeling import load_adapter, resolve_device
    from privtune.privacy.gradient_canaries import AUDIT_FILE, GradientCanaries

    params.method(name)
    a = params.attack
    model_dir, again = fine_tuned_dir(root, name)
    info, delta = read_input(model_dir / "finetune.json", _finetune_info, again)
    device = resolve_device(params.finetune.device, "finetune.device")
    model, tokenizer = load_base(root)
    # Merged weights compute the same function at half the cost of separate LoRA matmuls.
    model = load_adapter(model, model_dir / "adapter").merge_and_unload()
    model = model.to(device).eval()
    # The base model saw only public text: a legitimate reference for calibrated scores.
    reference = load_base(root)[0].to(device).eval() if a.reference else None

    canaries, train = read_canaries(root), read_split(root, "train")
    max_length = resolved_max_length(params, root)
    coverage = _canary_coverage(canaries, train, tokenizer, max_length)
    members, non_members = membership_sets(root, a, canaries, train)
    audit_file = root / PREPARED_DIR / "audit_canaries.json"
    audit = read_input(audit_file, load_canaries, PREPARE_AGAIN) if audit_file.is_file() else []
    gradient_file = model_dir / AUDIT_FILE  # written by training when it planted canaries
    gradient = (
        read_input(gradient_file, GradientCanaries.load, again) if gradient_file.is_file() else None
    )
    cache = None
    if reference is not None:  # its scores: the same for every method's attack
        cache = ReferenceCache.for_project(root, io.tree_sha256(root / BASE_DIR), device)
    config = AttackConfig(
        min_k=a.min_k,
        bootstrap_resamples=a.bootstrap,
        confidence=a.confidence,
        seed=a.seed,
        n_candidates=a.candidates,
        chunk_size=default_chunk_size(model),  # (on a GPU, its free memory's share)
        samples=a.samples,
        audit_delta=delta,
        audit_score="reference" if a.reference else "loss",
        max_length=max_length,
        batch_size=a.batch_size,
        progress=show_progress,
        reference_cache=cache,
    )
    found, figures = run_attacks(
        model,
        reference,
        tokenizer,
        members,
        non_members,
        canaries,
        audit,
        config,
        out_dir=root / PLOTS_DIR,
        name=name,
        gradient_canaries=gradient,
    )
    claimed = info["metrics"].get("epsilon")  # None: non-private, nothing claimed
    metrics: dict[str, Any] = {
        "method": info["method"],
        "claimed_epsilon": claimed,
        # with `mia_members` / `mia_non_members`: what each membership number rests on (a TPR
        # of 0.01 is 1 of 100 members; a 1 % FPR needs 100 non-members)
        **found,
        **coverage,
    }
    bound = found.get("audit_epsilon_lower_bound")
    if claimed is not None and bound is not None and bound > claimed:
        raise AuditViolation(
            f"the audit's {a.confidence:.0%} lower bound on epsilon, {bound:.3f}, exceeds the "
            f"claimed epsilon {claimed:.3f} of '{name}': check the privacy code (ledger, "
            "accountant, mechanism) before trusting any model of this method"
        )
    io.write_json(root / METRICS_DIR / f"attack-{name}.json", metrics)
    return metrics
