"""ONE training loop for every method: a method is a controller (clipping and noise over time)
and the noise mechanism it names, plugged into the same loop through the privacy engine.

Read top to bottom: ``Trainer`` builds the run (plan, controller, engine, optimizer, Poisson
sampler); ``train`` runs it: for each logical batch, decide when due (the controller proposes,
the engine's guard admits), then ``Trainer.step`` (per-sample gradients per physical
micro-batch, one DP release by the engine, the optimizer), then the callbacks (validation,
metrics, progress). The mechanism (privacy.mechanisms) decides what a release is, and the
engine whether it is accounted; the loop asks whether a method is private only to hand its
controller the noised statistics alone (``Observation.dp_only``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from transformers import get_cosine_schedule_with_warmup

from privtune.callbacks import (
    Callback,
    CallbackList,
    Checkpoint,
    LogFn,
    MetricsLogger,
    ProgressCallback,
    StepInfo,
    Validation,
    load_checkpoint,
)
from privtune.config import FinetuneParams
from privtune.control import Action, Controller, ControllerContext, Observer, build_controller
from privtune.control.registry import controller_class
from privtune.data.tokenization import EncodedRecords
from privtune.errors import BudgetExhausted
from privtune.losses import mean_token_loss, next_token_logits, per_sample_loss
from privtune.modeling import adapter_groups, resolve_device
from privtune.privacy.distributed import Replica
from privtune.privacy.engine import PrivacyEngine
from privtune.privacy.gradient_canaries import CanaryInjector, GradientCanaries
from privtune.privacy.ledger import PrivacyLedger
from privtune.privacy.mechanisms import StepStats
from privtune.privacy.plan import TrainingPlan, make_plan, planned_records
from privtune.privacy.seeds import secret_state, seeded_state
from privtune.progress import progress_bar

__all__ = [
    "Checkpointing",
    "TrainResult",
    "Trainer",
    "TrainingPlan",
    "make_plan",
    "planned_records",
    "train",
]


@dataclass
class TrainResult:
    plan: TrainingPlan
    steps_taken: int
    ledger: PrivacyLedger | None  # None for a non-private method
    epsilon: float | None
    epsilon_rdp: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    valid_loss: float = math.nan
    stopped_by_guard: bool = False
    controller: Controller | None = None
    audit: GradientCanaries | None = None  # the white-box audit's canaries and scores
    mechanism: str = ""  # the noise mechanism's name (privacy.mechanisms)
    accountant: str | None = None  # the accountant that composed `epsilon`
    privacy: dict[str, Any] = field(default_factory=dict)  # the engine's report (private runs)
    resumed_at: int | None = None  # the step a checkpoint resumed the run from
    # The step loop alone (decisions, steps, callbacks), wall and CPU seconds: a method's
    # step cost without the one-off plan calibration before it and final accounting after it
    loop_seconds: float = 0.0
    loop_cpu_seconds: float = 0.0
    # Of the loop, the CPU seconds of decisions (the controller's observation and action, the
    # guard's admission): a controller's own cost, measured under the same load as its steps
    decision_cpu_seconds: float = 0.0


def freeze_dropout(model: torch.nn.Module) -> None:
    """No dropout in the base model while fine-tuning (as usual for DP-SGD): runs match
    across CPU and CUDA.

    LoRA modules stay in training mode because opacus captures activations only there, so
    LoRA's own dropout (`finetune.lora.dropout`, 0 by default) applies when a user sets it.
    """
    model.eval()
    for name, module in model.named_modules():
        if "lora_" in name:
            module.train()


def generator_states(params: FinetuneParams, replica: Replica) -> tuple[torch.Tensor, ...]:
    """The Poisson sampler's and the noise generator's states. DP needs both secret, so by
    default they come whole from the OS's entropy (rank 0's, sent to every replica) and live
    nowhere but in the generators and the run's checkpoint (privacy/seeds.py).
    ``secret_noise: false``: seeded from ``seed`` and ``seed + 1`` (reproducible, published)."""
    if not params.secret_noise:
        return seeded_state(params.seed), seeded_state(params.seed + 1)
    return replica.broadcast((secret_state(), secret_state()))


def plan_context(
    plan: TrainingPlan, params: FinetuneParams, group_names: tuple[str, ...] = ()
) -> ControllerContext:
    """What a controller knows before training: the plan, the target and the adapters'
    group names (none for `Controller.check_plan`, before the model is loaded)."""
    return ControllerContext(
        group_names=group_names,
        sample_rate=plan.sample_rate,
        total_steps=plan.steps,
        target_epsilon=params.epsilon,
        delta=plan.delta,
        calibrated_noise=plan.calibrated_noise,
        seed=params.seed,
        expected_batch_size=plan.expected_batch_size,
        accountant=params.accountant,
    )


class Trainer:
    """One fine-tuning run: its plan, controller, privacy engine, optimizer and sampler.

    ``plan`` may be computed beforehand with :func:`make_plan` (the stage does, to validate
    before any output); it must be the plan of this data and these params.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_data: EncodedRecords,
        valid_data: EncodedRecords,
        params: FinetuneParams,
        method: str,
        options: dict[str, Any] | None = None,
        *,
        entry: str | None = None,
        plan: TrainingPlan | None = None,
    ) -> None:
        self.replica = Replica.current()
        self.device = resolve_device(params.device, "finetune.device")
        if self.replica.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(params.seed)
        self.model, self.train_data, self.params = model, train_data, params
        n_records = planned_records(len(train_data), params)
        private = controller_class(method, entry).private
        self.plan = plan = plan or make_plan(n_records, params, private)
        if plan.n_records != n_records:
            raise ValueError(
                f"the plan is for {plan.n_records} records, the data and audit canaries make "
                f"{n_records}: compute it with planned_records()"
            )
        ctx = plan_context(plan, params, tuple(adapter_groups(model, "per_adapter")[0]))
        self.controller = build_controller(method, ctx, options or {}, entry)
        group_names, groups = adapter_groups(model, self.controller.grouping)
        model.to(self.device)
        freeze_dropout(model)
        trainable = [p for group in groups for p in group]

        # The white-box audit's gradient canaries are records n_texts.. of the sampler.
        self.audit = self.injector = None
        if params.audit_canaries:
            n_params = sum(p.numel() for p in trainable)
            self.audit = GradientCanaries.draw(
                params.audit_canaries, n_params, params.seed, params.audit_canary_norm
            )
            self.injector = CanaryInjector(self.audit, trainable)
            self.canary_of_record = self.audit.in_indices()  # record n_texts + j: IN canary j

        self.optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(params.warmup_fraction * plan.steps), plan.steps
        )
        # Every replica draws the same Poisson masks (rank 0's seed): one logical batch.
        sampler_state, noise_state = generator_states(params, self.replica)
        self.sampler_generator = torch.Generator()
        self.sampler_generator.set_state(sampler_state)
        self.position = 0  # logical batches drawn so far (where a resumed run continues)
        mechanism = self.controller.make_mechanism(groups, group_names, seed=params.seed + 1)
        mechanism.generator.set_state(noise_state)  # secret, or seeded as above
        self.engine = PrivacyEngine(
            plan=plan,
            mechanism=mechanism,
            target_epsilon=params.epsilon,
            accountant=params.accountant,
            replica=self.replica,
        )
        self.forward = self.engine.wrap(model, params.grad_sampler)  # per-sample hooks if needed
        if self.injector is not None:
            self.engine.attach_release_hook(self.injector.observe)  # reads what was released
        self.observer = Observer(len(groups), plan.steps)
        self.decision_data = valid_data.slice(
            0, self.controller.validation_records or params.eval_records
        )
        self.action: Action | None = None
        self.next_decision = 0
        self.bf16 = params.precision == "bf16" or (
            params.precision == "auto" and self.device.type == "cuda"
        )

    def batches(self):
        """(step, record indices) of the logical batches still to run (Poisson, rate q)."""
        sampler = UniformWithReplacementSampler(
            num_samples=self.plan.n_records,
            sample_rate=self.plan.sample_rate,
            generator=self.sampler_generator,
            steps=self.plan.steps - self.position,
        )
        return enumerate(sampler, start=self.position)

    def due(self, step: int) -> bool:
        return step == self.next_decision

    def decide(self, step: int, valid_loss: float) -> Action:
        """The controller proposes from what it may observe; the engine admits (every replica
        the proposal of rank 0, so all apply the same admitted action)."""
        observation = None
        if self.action is not None:
            if self.controller.needs_validation:
                valid_loss = mean_token_loss(self.model, self.decision_data)
            observation = self.observer.observe(
                step,
                self.action,
                valid_loss=valid_loss,
                epsilon_spent=self.engine.spent(),
                epsilon_target=self.params.epsilon,
            )
        c = self.controller
        if observation is not None and c.private:
            observation = observation.dp_only()  # nothing computed from records without noise
        proposal = self.replica.broadcast(c.act(observation))
        self.action = self.engine.decide(proposal, steps=c.interval, reserve=c.reserve_noise())
        self.next_decision = step + max(1, c.interval)
        return self.action

    def step(self, step: int, indices: list[int]) -> tuple[float, StepStats] | None:
        """One logical (Poisson) batch: per-sample gradients per physical micro-batch, one DP
        release, one optimizer step. None when an empty batch released nothing."""
        self.position = step + 1
        index = torch.as_tensor(indices, dtype=torch.long)
        mine = self.replica.share(index)  # the whole batch unless distributed
        n_texts = len(self.train_data)
        texts = mine[mine < n_texts]
        canaries = (
            self.canary_of_record[mine[mine >= n_texts].numpy() - n_texts]
            if (self.injector is not None)
            else np.zeros(0, dtype=np.int64)
        )
        rows = self.injector.rows(canaries) if len(canaries) else None  # type: ignore[union-attr]
        size = self.params.physical_batch_size or max(len(texts), 1)
        chunks = list(texts.split(size)) if len(texts) else []
        losses = []
        for i, chunk in enumerate(chunks):
            batch = {k: v.to(self.device) for k, v in self.train_data.batch(chunk).items()}
            with self._autocast():
                logits = next_token_logits(
                    self.forward, batch["input_ids"], batch["attention_mask"]
                )
                per_record = per_sample_loss(logits, batch["labels"])
            with warnings.catch_warnings():
                # opacus' full backward hooks on modules whose inputs need no gradient (the
                # frozen base): expected here, and torch would warn on every step
                warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                per_record.sum().backward()
            losses.append(per_record.detach())
            # audit canaries are records too: clipped with the last micro-batch
            self.engine.accumulate(rows if i == len(chunks) - 1 else None, records=len(chunk))
        if not chunks and rows is not None:
            self.engine.accumulate(rows, records=0)
        stats = self.engine.step(step, len(index))
        if stats is None:
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._mean_loss(losses)
        self.observer.add(loss, stats)
        return loss, stats

    def _mean_loss(self, losses: list[torch.Tensor]) -> float:
        """The batch's mean per-record loss (every replica's records when distributed)."""
        if not self.replica.distributed:
            return torch.cat(losses).mean().item() if losses else math.nan
        total = torch.tensor([float(torch.cat(losses).sum()) if losses else 0.0, 0.0])
        total[1] = sum(len(part) for part in losses)
        self.replica.sum_([total])
        return float(total[0] / total[1]) if total[1] else math.nan

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one is.

        The controller and the observer are saved whole (pickled): stable-baselines3's SAC,
        its replay buffer and its random streams have no state_dict that covers everything.
        """
        trainable = {
            n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad
        }
        return {
            "position": self.position,
            "next_decision": self.next_decision,
            "action": self.action,
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler_generator": self.sampler_generator.get_state(),
            "engine": self.engine.state_dict(),
            "controller": self.controller,
            "observer": self.observer,
            "audit_scores": None if self.audit is None else self.audit.scores.copy(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.next_decision = state["position"], state["next_decision"]
        self.action = state["action"]
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler_generator.set_state(state["sampler_generator"])
        self.controller = state["controller"]
        self.observer = state["observer"]
        self.engine.load_state_dict(state["engine"])
        if self.audit is not None:
            self.audit.scores[:] = state["audit_scores"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often a run saves itself, and the identity of its inputs (``key``): a
    checkpoint resumes only a run of the same method, parameters, data, base and code."""

    path: Path
    every: int
    key: str
    extra: dict[str, Any] = field(default_factory=dict)  # saved alongside (the MLflow run id)


def _resumed_alike(replica: Replica, checkpoint: Checkpointing | None) -> dict[str, Any] | None:
    """The checkpoint to resume from, the same on every rank. Under torchrun each rank reads
    the file rank 0 wrote; a rank that finds another one (the same step of another attempt: its
    secret generator states differ), none (its node cannot see rank 0's disk) or cannot read it
    would mix other batches and noise into the logical batch, or leave the others waiting in a
    collective: every rank fails before the first step, together."""
    try:
        resumed = load_checkpoint(checkpoint.path, checkpoint.key) if checkpoint else None
    except Exception as err:  # any: the other ranks must hear of it, not wait for it
        if not replica.distributed:
            raise
        resumed, mine = None, f"unreadable ({type(err).__name__})"
    else:
        mine = "none"
        if resumed is not None and replica.distributed:
            digest = hashlib.sha256(checkpoint.path.read_bytes()).hexdigest()[:12]
            mine = f"step {resumed['steps_taken']} of checkpoint {digest}"
    found = replica.gather(mine)
    if len(set(found)) > 1 or any(f.startswith("unreadable") for f in found):
        ranks = ", ".join(f"rank {r}: {f}" for r, f in enumerate(found))
        raise RuntimeError(
            f"the ranks would resume from different checkpoints ({ranks}): every rank must read "
            "the checkpoint rank 0 writes: put .privtune/checkpoints on storage every node "
            "shares (or delete it there to start the run over)"
        )
    return resumed


def train(
    model: torch.nn.Module,
    train_data: EncodedRecords,
    valid_data: EncodedRecords,
    params: FinetuneParams,
    method: str,
    options: dict[str, Any] | None = None,
    *,
    entry: str | None = None,
    plan: TrainingPlan | None = None,
    on_log: LogFn | None = None,
    callbacks: list[Callback] | None = None,
    checkpoint: Checkpointing | None = None,
    show_progress: bool = True,
    trainer: Trainer | None = None,
) -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of ``model`` with the given method.

    ``on_log(metrics, step)`` receives every logged row and decision (MLflow, in the stage).
    With ``checkpoint``, the run saves itself every ``checkpoint.every`` steps and, started
    again with the same key, resumes from the last save: the same batches, noise, ledger and
    controller state as if it had never stopped.

    ``trainer``: the run already built from these arguments (the stage builds it first, so
    that every option and the device are checked before it opens an MLflow run).
    """
    if trainer is None:
        trainer = Trainer(
            model, train_data, valid_data, params, method, options, entry=entry, plan=plan
        )
    elif trainer.model is not model or trainer.params != params:
        raise ValueError("the trainer was built for another model or other parameters")
    plan, engine, main = trainer.plan, trainer.engine, trainer.replica.is_main
    validation = Validation(model, valid_data.slice(0, params.eval_records), params.eval_every)
    logger = MetricsLogger(engine, validation, params.log_every, on_log if main else None)
    resumed = _resumed_alike(trainer.replica, checkpoint)
    steps_taken = 0
    if resumed is not None:
        trainer.load_state_dict(resumed["trainer"])
        validation.load_state_dict(resumed["validation"])
        logger.load_state_dict(resumed["logger"])
        steps_taken = resumed["steps_taken"]
    result = TrainResult(
        plan,
        steps_taken,
        engine.ledger,
        None,
        None,
        audit=trainer.audit,
        mechanism=engine.mechanism.name,
        resumed_at=trainer.position if resumed else None,
    )

    def state(step: int) -> dict[str, Any]:
        return {
            "version": 1,
            "key": checkpoint.key,
            "steps_taken": step + 1,
            "trainer": trainer.state_dict(),
            "validation": validation.state_dict(),
            "logger": logger.state_dict(),
            **checkpoint.extra,
        }

    with progress_bar(show_progress and main) as progress:
        name = f"finetune {entry or method}"
        bar = ProgressCallback(progress, name, plan.steps, logger, trainer.position)
        extra = (
            [Checkpoint(checkpoint.path, checkpoint.every, state)] if checkpoint and main else []
        )
        callback = CallbackList([validation, logger, bar, *(callbacks or []), *extra])
        started, cpu_started = time.perf_counter(), time.process_time()
        for step, indices in trainer.batches():
            if trainer.due(step):
                deciding = time.process_time()
                try:
                    trainer.decide(step, validation.last)
                except BudgetExhausted:
                    if result.steps_taken == 0:  # the plan fits the guard: never a model of
                        raise  # no step (exit 3: the two disagree, a bug)
                    result.stopped_by_guard = True
                    break
                finally:
                    result.decision_cpu_seconds += time.process_time() - deciding
                callback.on_decision(step, trainer.controller.metrics())
            released = trainer.step(step, indices)
            if released is None:
                continue
            loss, stats = released
            result.steps_taken = step + 1
            info = StepInfo(loss, trainer.scheduler.get_last_lr()[0], stats, step + 1 == plan.steps)
            if not callback.on_step(step, info):
                break
        callback.on_training_end()
        result.loop_seconds = time.perf_counter() - started
        result.loop_cpu_seconds = time.process_time() - cpu_started

    result.controller, result.history = trainer.controller, logger.history
    result.valid_loss = mean_token_loss(model, valid_data)
    spent = engine.finish(trainer.forward)
    if spent is not None:
        result.epsilon, result.epsilon_rdp = spent.epsilon, spent.epsilon_rdp
        result.accountant, result.privacy = spent.accountant, spent.metrics
    return result
