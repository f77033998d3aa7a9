"""Stage `finetune@<name>`: LoRA fine-tuning with one method, tracked in MLflow."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from privtune import io
from privtune.config import BASE_DIR, CHECKPOINTS_DIR, METRICS_DIR, MODELS_DIR, PLOTS_DIR, Params
from privtune.progress import notice
from privtune.stages.common import data_hash, load_base, read_split, resolved_max_length
from privtune.store_lock import HolderFileLock, StoreLock

if TYPE_CHECKING:
    from privtune.privacy.distributed import Replica
    from privtune.privacy.plan import TrainingPlan


# What a run without noise never reads: it trains the same model at any target epsilon and
# accountant. (Not delta: its attack stage audits the model at the plan's delta.)
_PRIVATE_ONLY = ("epsilon", "accountant")
# How a step is computed, not what it releases (the same ledger and noise: test_train.py,
# test_lora_grad_sample.py): a run resumed or retried with another micro-batch (after running
# out of memory) is the same run.
_HOW_ONLY = ("physical_batch_size", "grad_sampler", "checkpoint_every")
# How often a fine-tuning waits to see whether a run with its inputs that another live
# process is making has ended; and at most how long rank 0 waits before telling the other
# ranks of a torchrun run that it still waits (well under the process group's timeout).
LIVE_RUN_POLL_SECONDS = 10.0
WAIT_ROUND_SECONDS = 30.0


def run_key(params: Params, name: str, root: Path) -> str:
    """The identity of a fine-tuning run: its method, parameters, data, base model and code.

    Two attempts with the same key would train the same kind of model on the same records and
    spend the same budget again (with secret noise, another model: a second release), so the
    second one reuses the first's finished run instead (see `finetune`). A non-private
    method's key leaves out what only a private run reads (the target epsilon, the accountant):
    an epsilon sweep reuses its model instead of training it again; how a step is computed
    (micro-batches, the per-sample gradient code, checkpoints) is not in any key.
    """
    from privtune.control.registry import controller_class

    method, options = params.method(name)
    f = params.finetune.model_dump()
    private = controller_class(method, name).private
    for unread in _HOW_ONLY + (() if private else _PRIVATE_ONLY):
        f.pop(unread)
    payload = {
        "stage": "finetune",
        "entry": name,
        "method": method,
        "options": options,
        "finetune": f,
        # the default delta is capped by the registry's gate: a lower gate is another plan
        "max_delta": params.registry.gates.max_delta,
        "max_length": resolved_max_length(params, root),
        "data": data_hash(root),
        "base": io.tree_sha256(root / BASE_DIR),
        "code": io.code_sha256(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _publish(root: Path, name: str, info: dict[str, Any], history: list[dict]) -> None:
    """The stage's metric and plot files (the model directory is written before)."""
    _write_history(root / PLOTS_DIR / f"finetune-{name}.csv", history)
    io.write_json(root / METRICS_DIR / f"finetune-{name}.json", info["metrics"])


_RESTORED = ("adapter", "ledger.json", "controller.pt", "audit.json", "history.json")


def _reuse(root: Path, name: str, run: Any, key: str, experiment: str) -> dict[str, Any]:
    """Restore the model of an earlier finished run with the same key: nothing is re-spent.
    A run filed in another experiment (a profile whose fine-tuning inputs are the default's, a
    renamed `tracking.experiment`) is copied into this project's first, with its id in
    finetune.json: the registry version, evaluation and attack results of this project land on
    its own run, not on the other project's."""
    from privtune import tracking
    from privtune.plots import plot_training

    with tempfile.TemporaryDirectory() as tmp:
        files = tracking.download_run_artifacts(root, run.info.run_id, tmp)
        if not (files / "finetune.json").is_file() or not (files / "adapter").is_dir():
            return {}
        info = io.read_json(files / "finetune.json")
        history = io.read_json(files / "history.json")
        figure = root / PLOTS_DIR / f"finetune-{name}.png"
        if tracking.in_experiment(root, run, experiment):
            _restore(files, root / MODELS_DIR / name, info)
            plot_training(history, info["finetune"]["epsilon"], figure)
            filed = ""
        else:
            # a copy an earlier attempt left unfinished (here: another's failed runs are its own)
            tracking.discard_unfinished(root, key, experiment=experiment)
            with tracking.copy_run(root, run, key=key, experiment=experiment) as copy:
                info = info | {"run_id": copy.run_id, "reused_from": copy.reused_from}
                _restore(files, root / MODELS_DIR / name, info)
                copy.log_artifact(plot_training(history, info["finetune"]["epsilon"], figure))
                copy.log_dir_contents(root / MODELS_DIR / name)
            filed = f", copied into experiment {experiment} as run {copy.run_id}"
    _publish(root, name, info, history)
    where = tracking.experiment_name(root, run)
    notice(
        f"finetune {name}: reusing finished MLflow run {run.info.run_id} of experiment {where} "
        f"(same inputs){filed}"
    )
    return info["metrics"]


def _restore(files: Path, out_dir: Path, info: dict[str, Any]) -> None:
    """models/<name> from a run's downloaded artifacts, with ``info`` as its finetune.json."""
    with io.atomic_dir(out_dir) as out:
        for item in _RESTORED:
            source = files / item
            if source.is_dir():
                shutil.copytree(source, out / item)
            elif source.is_file():
                shutil.copy2(source, out / item)
        io.write_json(out / "finetune.json", info)


def finetune(
    params: Params, name: str, root: Path = Path("."), show_progress: bool = True
) -> dict[str, Any]:
    """Fine-tune LoRA adapters with method `name`; log everything to MLflow."""
    from privtune.privacy.distributed import process_group_from_environment

    # under torchrun: one rank of a distributed run, in its process group until the end
    with process_group_from_environment() as replica, contextlib.ExitStack() as held:
        return _finetune(params, name, root, show_progress, replica, held)


def _lock_file(root: Path, name: str) -> Path:
    """The file lock of entry ``name`` in the project (it exists once one has trained it)."""
    return root / CHECKPOINTS_DIR / f"{name}.lock"


def _store_lock(root: Path, key: str) -> StoreLock:
    """The tracking store's lock of run key ``key`` (other checkouts and machines take it)."""
    from privtune import tracking

    return StoreLock(tracking.tracking_uri(root), f"finetune-{key}", root)


def _held_elsewhere(root: Path, name: str, key: str) -> bool:
    """Whether the entry's lock file exists (another may hold it) or another process holds the
    store's lock of the run key: worth waiting for before a model is loaded."""
    return _lock_file(root, name).is_file() or _store_lock(root, key).taken_elsewhere()


class EntryTurn:
    """This project's turn to fine-tune entry ``name`` with run key ``key``.

    Two processes fine-tuning one entry at once (a restart beside a launcher's orphaned
    workers, two shells) would both release a model of the same records, or write one
    checkpoint in turns; so the entry has a file lock in the project (freed by the OS when its
    holder dies, `kill -9` included), and the run key has a lock of the tracking store (a file
    lock beside sqlite, an advisory lock in PostgreSQL: `store_lock`), which another checkout
    or machine using that store takes too. Through an http(s) server, which has no lock, a run
    with the key that another live process is making is waited out instead (two starts within
    the same second can both pass that check). The waiter then finds the finished run (reused)
    or the checkpoint (resumed). Waiting goes in rounds of at most ``round_seconds``: under
    torchrun, rank 0 waits and tells the other ranks after each round, so no collective waits
    longer than a round.
    """

    def __init__(self, root: Path, name: str, key: str) -> None:
        self.root, self.name, self.key = root, name, key
        # taken in this order, freed in the other: the project's, then the store's
        self.locks = [
            (HolderFileLock(_lock_file(root, name), root), "this entry in this project", "its "
             "finished run is then reused, or its checkpoint resumed"),
            (_store_lock(root, key), "the same inputs against this tracking store (another "
             "checkout or machine)", "its finished run is then reused"),
        ]  # fmt: skip
        self.said: set[str] = set()

    def ready(self, round_seconds: float) -> bool:
        """Try for up to ``round_seconds``; True once this process holds the locks and no other
        live process makes a run with the key."""
        from privtune import tracking

        for lock, what, then in self.locks:
            if not lock.acquire(timeout=0):
                if what not in self.said:  # asked once: in PostgreSQL, a query
                    self._say_once(
                        what,
                        f"{lock.holder()} is fine-tuning {what}: waiting for it to end ({then}; "
                        "Ctrl-C stops waiting)",
                    )
                if not lock.acquire(timeout=round_seconds):
                    return False
        live = tracking.running_elsewhere(self.root, self.key)
        if live is None:
            return True
        tags = live.data.tags
        self._say_once(
            "run",
            f"run {live.info.run_id} with the same inputs is being made by process "
            f"{tags.get(tracking.PID_TAG, '?')} on {tags.get(tracking.HOST_TAG, '?')} (last "
            f"heartbeat {tags.get(tracking.HEARTBEAT_TAG, '?')}): waiting for it to end (a "
            "finished run is then reused; Ctrl-C stops waiting)",
        )
        time.sleep(min(LIVE_RUN_POLL_SECONDS, round_seconds))
        return False

    def _say_once(self, what: str, message: str) -> None:
        if what not in self.said:
            self.said.add(what)
            notice(f"finetune {self.name}: {message}")

    def release(self) -> None:
        with contextlib.ExitStack() as releases:  # each one, even if another's raises
            for lock, _, _ in self.locks:
                releases.callback(lock.release)  # run in reverse: the store's first


def wait_turn(
    root: Path,
    name: str,
    key: str,
    replica: Replica,
    held: contextlib.ExitStack,
    round_seconds: float = WAIT_ROUND_SECONDS,
) -> None:
    """Rank 0 waits for the entry's turn (:class:`EntryTurn`), held until ``held`` closes; the
    other ranks learn after each round whether it still waits."""
    turn = EntryTurn(root, name, key) if replica.is_main else None
    if turn is not None:
        held.callback(turn.release)
    while replica.broadcast(turn is not None and not turn.ready(round_seconds)):
        pass


def finetune_plan(
    params: Params, name: str, root: Path, n_texts: int | None = None
) -> TrainingPlan:
    """N, q, steps, delta and the calibrated noise of entry ``name``, validated (batch size,
    delta below 1/N and the registry's delta gate, an epsilon some noise can certify, what
    the method's controller would refuse about the plan, such as an LMO-DP law no candidate
    fits) before anything is written. N counts the audit's gradient canaries; ``n_texts``:
    the train split's size when the caller has read it."""
    from privtune.control.registry import check_controller, controller_class
    from privtune.privacy.plan import make_plan, planned_records
    from privtune.train import plan_context

    method, options = params.method(name)
    private = controller_class(method, name).private
    f = params.finetune
    n_texts = len(read_split(root, "train")) if n_texts is None else n_texts
    gate = params.registry.gates.max_delta
    plan = make_plan(planned_records(n_texts, f), f, private, max_delta=gate)
    check_controller(method, plan_context(plan, f), options, name)
    return plan


def _finetune(
    params: Params,
    name: str,
    root: Path,
    show_progress: bool,
    replica: Replica,
    held: contextlib.ExitStack,
) -> dict[str, Any]:
    from privtune import tracking
    from privtune.callbacks import load_checkpoint
    from privtune.control.registry import controller_class
    from privtune.data.tokenization import encode_records
    from privtune.modeling import attach_lora
    from privtune.plots import plot_training
    from privtune.privacy.gradient_canaries import AUDIT_FILE
    from privtune.train import Checkpointing, Trainer, train

    method, options = params.method(name)
    private = controller_class(method, name).private  # fail fast on an unknown method
    f = params.finetune
    train_records = read_split(root, "train")
    plan = finetune_plan(params, name, root, n_texts=len(train_records))  # before the model
    # A retried stage (Prefect retries, a crash after training) must neither train again and
    # spend the budget twice nor leave a duplicate run: runs are keyed by stage and inputs.
    key = run_key(params, name, root)
    # Another process may hold the entry (its lock file exists once one has trained it), or
    # another checkout of the store its run key: wait before loading a model beside it on its
    # device. Otherwise the turn is taken once the run is built, so that a refused input
    # leaves no lock file behind.
    early = replica.broadcast(replica.is_main and _held_elsewhere(root, name, key))
    if early:
        wait_turn(root, name, key, replica, held)
    model, tokenizer = load_base(root)
    max_length = resolved_max_length(params, root)
    train_data = encode_records([r["text"] for r in train_records], tokenizer, max_length)
    valid_data = encode_records(
        [r["text"] for r in read_split(root, "valid")], tokenizer, max_length
    )
    model = attach_lora(model, f.lora, seed=f.seed)
    # The whole run is built (device, controller and every option, engine) before an MLflow
    # run is opened or a file written: a bad input leaves nothing behind.
    trainer = Trainer(model, train_data, valid_data, f, method, options, entry=name, plan=plan)

    if not early:
        wait_turn(root, name, key, replica, held)  # one fine-tuning of an entry at a time
    # A run killed mid-way resumes from its last checkpoint (kept outside the stage's DVC
    # outputs, which `dvc repro` removes before rerunning the stage), in the same MLflow run.
    checkpoint_path = root / CHECKPOINTS_DIR / f"{name}.pt"
    resumed = load_checkpoint(checkpoint_path, key)
    if resumed is not None and replica.is_main:  # said here: the MLflow tag comes at the end
        notice(
            f"finetune {name}: resuming at step {resumed['steps_taken']} of {plan.steps} from "
            f"{CHECKPOINTS_DIR}/{name}.pt (an attempt with the same inputs was stopped there)"
        )
    checkpointing = Checkpointing(checkpoint_path, f.checkpoint_every, key)
    common = {"entry": name, "plan": plan, "checkpoint": checkpointing, "trainer": trainer}
    reused: dict[str, Any] | None = None
    experiment = params.tracking.experiment
    if replica.is_main:
        # runs a killed attempt left RUNNING in this experiment: KILLED, with why
        tracking.close_dead_runs(root, experiment)
        previous = tracking.finished_run(root, key, experiment)  # this one's, else any
        if previous is not None:
            reused = _reuse(root, name, previous, key, experiment) or None
    # Every rank learns whether rank 0 reuses a finished run: a rank that trained alone would
    # wait for the others in its first collective until the group timed out.
    if replica.broadcast(reused is not None):
        return reused or {}
    if not replica.is_main:  # other ranks compute; rank 0 logs and writes everything
        train(model, train_data, valid_data, f, method, options, show_progress=False, **common)
        return {}
    resumed_run = resumed.get("mlflow_run_id") if resumed else None
    lost_run = None
    if resumed_run is not None and not tracking.resumable_run(root, resumed_run):
        # the training resumes (its ledger is the checkpoint's), its MLflow run cannot: the
        # steps before the checkpoint stay in the other store, or nowhere
        lost_run, resumed_run = resumed_run, None
        notice(
            f"finetune {name}: the checkpoint's MLflow run {lost_run} is not in this store "
            "(deleted, or MLFLOW_TRACKING_URI names another store): a new run records the "
            f"steps from {resumed['steps_taken']} on, and the whole ledger at the end"
        )
    tracking.discard_unfinished(root, key, keep=resumed_run, experiment=experiment)

    with tracking.start_run(
        run_name=name, root=root, key=key, run_id=resumed_run, experiment=experiment
    ) as run:
        checkpointing.extra["mlflow_run_id"] = run.run_id
        if lost_run is not None:
            run.set_tags({"privtune.resumed_from_run": lost_run})
        run.set_tags(
            {
                "stage": "finetune",
                "method": method,
                "entry": name,
                tracking.NOTE_TAG: tracking.finetune_note(
                    name, method, f.epsilon if private else None
                ),
            }
        )
        # a learned controller's warm start (RLDP): the data its policy saw, file hash
        run.set_tags(trainer.controller.provenance())
        # How this attempt computes a step (tags: a resume may use other micro-batches or
        # processes, with the same ledger; an MLflow param keeps its first value)
        how = {f"privtune.{k}": getattr(f, k) for k in _HOW_ONLY}
        run.set_tags(how | {"privtune.processes": replica.world_size})
        if resumed_run is None:
            run.log_params(
                {
                    "method": method,
                    "entry": name,
                    "method_options": options,
                    "finetune": f.model_dump(exclude=set(_HOW_ONLY)),
                    "base": params.base.model_dump(),
                    "data_sha256": data_hash(root),
                    "git_commit": tracking.git_commit(root),
                    "git_modified": tracking.git_modified(root),
                    "n_train_records": len(train_data),
                    "n_records_with_audit_canaries": plan.n_records,
                    "sample_rate": plan.sample_rate,
                    "steps": plan.steps,
                    "private": private,
                    # a non-private run has no delta and no noise (MLflow's UI showed them)
                    **(
                        {"delta": plan.delta, "noise_multiplier": plan.calibrated_noise}
                        if private
                        else {}
                    ),
                }
            )
        logged = run.last_step() if resumed_run is not None else -1

        def on_log(metrics: dict[str, float], step: int) -> None:
            if step > logged:  # not a replayed step the killed attempt logged already
                run.log_metrics(metrics, step)

        result = train(
            model,
            train_data,
            valid_data,
            f,
            method,
            options,
            on_log=on_log,
            show_progress=show_progress,
            **common,
        )
        if result.resumed_at is not None:
            run.set_tags({"resumed_at_step": result.resumed_at})
        metrics: dict[str, Any] = {
            "method": method,
            "private": result.ledger is not None,
            "steps": result.steps_taken,
            "sample_rate": plan.sample_rate,
            "valid_perplexity": math.exp(result.valid_loss),
            "stopped_by_guard": result.stopped_by_guard,
        }
        metrics |= result.privacy  # epsilon spent, delta, mechanism, accountant (private runs)
        # Final values at the last step, so no curve jumps back to step 0 (tracking.py).
        run.log_metrics(tracking.final_metrics(metrics), step=max(0, result.steps_taken - 1))

        with io.atomic_dir(root / MODELS_DIR / name) as out:
            model.save_pretrained(out / "adapter")
            if result.ledger is not None:
                result.ledger.save(out / "ledger.json")
            torch.save(result.controller.state_dict(), out / "controller.pt")
            if result.audit is not None:
                result.audit.save(out / AUDIT_FILE)  # the auditor's canaries and scores
            io.write_json(out / "history.json", result.history)
            info = {
                "entry": name,
                "method": method,
                "options": options,
                "base": str(BASE_DIR),
                "run_id": run.run_id,
                "plan": dataclasses.asdict(plan),
                "finetune": f.model_dump(),
                "processes": replica.world_size,
                "metrics": metrics,
            }
            io.write_json(out / "finetune.json", info)
            figure = plot_training(
                result.history, f.epsilon, root / PLOTS_DIR / f"finetune-{name}.png"
            )
            run.log_artifact(figure)
            run.log_dir_contents(out)  # adapter, ledger, controller, history, finetune.json
    _publish(root, name, info, result.history)
    checkpoint_path.unlink(missing_ok=True)  # the outputs are written: nothing to resume
    return metrics


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    columns = ["step", "loss", "valid_loss", "epsilon", "noise_multiplier"]
    with io.atomic_file(path) as handle:
        handle.write(",".join(columns) + "\n")
        for row in history:
            handle.write(",".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in columns))
            handle.write("\n")
