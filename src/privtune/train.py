"""ONE training loop for every method: a method is a controller (clipping and noise over time)
plugged into the same loop, with the privacy ledger and the budget guard around every step.

Read top to bottom: plan (sampling rate, steps, calibrated noise) -> for each Poisson batch:
decide (controller, admitted by the guard) -> forward/backward with per-sample gradients ->
DP step (clip, noise, scale) -> ledger -> optimizer -> log / validate.

The noise is Gaussian (L2 clipping) unless the controller's mechanism is "lmo" (LMO-DP: L1
clipping, Laplace-mixture noise, accounted in RDP); the ledger and guard handle both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from transformers import get_cosine_schedule_with_warmup

from privtune.config import FinetuneParams
from privtune.control import Action, Controller, ControllerContext, Observation, build_controller
from privtune.data.tokenization import EncodedRecords
from privtune.errors import BudgetExhausted, ConfigError
from privtune.losses import mean_token_loss, next_token_logits, per_sample_loss
from privtune.modeling import adapter_groups, resolve_device
from privtune.privacy import accountant
from privtune.privacy.gradient_canaries import CanaryInjector, GradientCanaries, included_count
from privtune.privacy.guard import BudgetGuard
from privtune.privacy.ledger import LedgerEntry, PrivacyLedger
from privtune.privacy.lmo_mechanism import LMOParams, noise_std
from privtune.privacy.mechanisms import (
    GaussianMechanism,
    LMOMechanism,
    count_dims,
    effective_noise_multiplier,
    gradient_noise_multiplier,
    uniform_noise_stds,
)
from privtune.progress import progress_bar

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainingPlan:
    n_records: int
    sample_rate: float
    steps: int
    delta: float
    calibrated_noise: float  # 0 for non-private methods


def planned_records(n_texts: int, params: FinetuneParams) -> int:
    """N: the text records plus the IN gradient canaries of the white-box audit (each one is a
    record, sampled, clipped and accounted like the others)."""
    return n_texts + included_count(params.audit_canaries, params.seed)


def make_plan(n_records: int, params: FinetuneParams, private: bool) -> TrainingPlan:
    """Sampling rate q = B/N, steps = ceil(epochs / q), delta < 1/N, and the calibrated noise.

    ``n_records`` is N, audit canaries included (see :func:`planned_records`)."""
    if n_records < 2:
        raise ConfigError("data", f"only {n_records} training records", "provide more records")
    q = min(1.0, params.batch_size / n_records)
    steps = max(1, math.ceil(params.epochs / q))
    delta = params.delta if params.delta is not None else 1.0 / (10 * n_records)
    if not delta < 1.0 / n_records:
        raise ConfigError(
            "finetune.delta",
            f"{delta:g} is not below 1/N = {1.0 / n_records:.3g} for N = {n_records} records",
            f"set finetune.delta below {1.0 / n_records:.3g} (e.g. {1.0 / (10 * n_records):.1g})",
        )
    noise = (
        accountant.calibrate_noise(params.epsilon, delta, q, steps, params.accountant)
        if private
        else 0.0
    )
    return TrainingPlan(n_records, q, steps, delta, noise)


@dataclass
class TrainResult:
    plan: TrainingPlan
    steps_taken: int
    ledger: PrivacyLedger | None
    epsilon: float | None
    epsilon_rdp: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    valid_loss: float = math.nan
    stopped_by_guard: bool = False
    controller: Controller | None = None
    audit: GradientCanaries | None = None  # the white-box audit's canaries and scores


class _Observer:
    """Accumulates per-step statistics into the observation a controller sees."""

    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups
        self.losses: list[float] = []
        self.norms: list[torch.Tensor] = []
        self.clipped: list[float] = []
        self.released: list[float] = []  # DP releases of the unclipped fraction
        self.histograms: list[np.ndarray] = []  # DP releases of the norm histogram
        self.previous_loss = math.nan

    def add(
        self,
        loss: float,
        norms: torch.Tensor | None,
        clipped: float,
        released: float | None = None,
        histogram: np.ndarray | None = None,
    ) -> None:
        self.losses.append(loss)
        if norms is not None and norms.numel():
            self.norms.append(norms)
        self.clipped.append(clipped)
        if released is not None:
            self.released.append(released)
        if histogram is not None:
            self.histograms.append(histogram)

    def observe(self, step: int, plan: TrainingPlan, action: Action, **kwargs: Any) -> Observation:
        loss = float(np.mean(self.losses)) if self.losses else math.nan
        norms = torch.cat(self.norms) if self.norms else torch.zeros(1, self.n_groups)
        quantiles = torch.quantile(norms, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]), dim=0)
        obs = Observation(
            step=step,
            total_steps=plan.steps,
            train_loss=loss,
            loss_trend=loss - self.previous_loss if math.isfinite(self.previous_loss) else 0.0,
            clipped_fraction=float(np.mean(self.clipped)) if self.clipped else 0.0,
            norm_quantiles=tuple(tuple(quantiles[:, k].tolist()) for k in range(self.n_groups)),
            norm_mean=tuple(norms.mean(0).tolist()),
            norm_std=tuple(norms.std(0, correction=0).tolist()),
            action=action,
            unclipped_fraction_dp=float(np.mean(self.released)) if self.released else None,
            norm_histogram_dp=(
                tuple(map(tuple, np.mean(self.histograms, axis=0).tolist()))
                if self.histograms
                else None
            ),
            **kwargs,
        )
        self.previous_loss = loss
        self.losses, self.norms, self.clipped, self.released = [], [], [], []
        self.histograms = []
        return obs


def freeze_dropout(model: torch.nn.Module) -> None:
    """No dropout while fine-tuning (as usual for DP-SGD): runs match across CPU and CUDA.

    LoRA modules stay in training mode because opacus captures activations only there.
    """
    model.eval()
    for name, module in model.named_modules():
        if "lora_" in name:
            module.train()


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
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune the trainable (LoRA) parameters of ``model`` with the given method.

    ``plan`` may be computed beforehand with :func:`make_plan` (to validate before any output).
    """
    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    from privtune.control.registry import controller_class

    private = controller_class(method, entry).private
    n_texts = len(train_data)
    plan = plan or make_plan(planned_records(n_texts, params), params, private)
    if plan.n_records != planned_records(n_texts, params):
        raise ValueError(
            f"the plan is for {plan.n_records} records, the data and audit canaries make "
            f"{planned_records(n_texts, params)}: compute it with planned_records()"
        )
    ctx = ControllerContext(
        group_names=tuple(adapter_groups(model, "per_adapter")[0]),
        sample_rate=plan.sample_rate,
        total_steps=plan.steps,
        target_epsilon=params.epsilon,
        delta=plan.delta,
        calibrated_noise=plan.calibrated_noise,
        seed=params.seed,
        expected_batch_size=plan.sample_rate * plan.n_records,
        accountant=params.accountant,
    )
    controller = build_controller(method, ctx, options or {}, entry)
    group_names, groups = adapter_groups(model, controller.grouping)

    model.to(device)
    freeze_dropout(model)
    trainable = [p for group in groups for p in group]
    audit = injector = None
    if params.audit_canaries:
        audit = GradientCanaries.draw(
            params.audit_canaries,
            sum(p.numel() for p in trainable),
            params.seed,
            params.audit_canary_norm,
        )
        injector = CanaryInjector(audit, trainable)
        canary_of_record = audit.in_indices()  # record n_texts + j is IN canary j
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(params.warmup_fraction * plan.steps), plan.steps
    )
    sampler = UniformWithReplacementSampler(
        num_samples=plan.n_records,
        sample_rate=plan.sample_rate,
        generator=torch.Generator().manual_seed(params.seed),
        steps=plan.steps,
    )
    expected_batch = plan.sample_rate * plan.n_records
    valid_subset = valid_data.slice(0, params.eval_records)
    decision_subset = valid_data.slice(0, controller.validation_records or params.eval_records)

    ledger = PrivacyLedger() if private else None
    forward = model
    guard = mechanism = None
    lmo_base: LMOParams | None = None  # LMO-DP: the controller's law at noise level 1
    if private and controller.mechanism == "lmo":
        lmo_base = getattr(controller, "lmo_params", None)
        if not isinstance(lmo_base, LMOParams):
            raise ValueError(f"controller '{controller.name}' uses LMO noise: needs lmo_params")
    lmo_law: LMOParams | None = None  # the admitted LMO law of the current interval
    lmo_stds: dict[LMOParams, float] = {}  # per-coordinate std per unit clip, for the ledger
    if private:
        forward = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        # Noise comes from a CPU generator so CPU and CUDA runs draw identical noise.
        noise_generator = torch.Generator().manual_seed(params.seed + 1)
        mechanism = (
            LMOMechanism(groups, noise_generator)
            if lmo_base is not None
            else GaussianMechanism(groups, noise_generator)
        )
        guard = BudgetGuard(
            ledger=ledger,
            target_epsilon=params.epsilon,
            delta=plan.delta,
            sample_rate=plan.sample_rate,
            total_steps=plan.steps,
            reserve_noise=controller.reserve_noise(),
            accountant=params.accountant,
            lmo_base=lmo_base,
        )

    observer = _Observer(len(groups))
    result = TrainResult(plan, 0, ledger, None, None, controller=controller, audit=audit)
    action: Action | None = None
    stds: tuple[float, ...] = ()
    count_std: float | None = None
    dims = 1  # counts released per step with count_std (mechanisms.count_dims)
    next_decision = 0
    valid_loss = math.nan
    eps_spent = 0.0

    with progress_bar(show_progress) as progress:
        task = progress.add_task(f"finetune {entry or method}", total=plan.steps, status="")
        for step, indices in enumerate(sampler):
            # -- decide: the controller proposes, the guard admits ------------------------
            if step == next_decision:
                obs = None
                if controller.needs_validation and step > 0:
                    valid_loss = mean_token_loss(model, decision_subset)
                if private and step > 0:
                    eps_spent = guard.spent()  # public: depends only on the schedule
                if action is not None:
                    obs = observer.observe(
                        step,
                        plan,
                        action,
                        valid_loss=valid_loss,
                        epsilon_spent=eps_spent,
                        epsilon_target=params.epsilon,
                    )
                action = controller.act(obs)
                if private:
                    # The reserve may change as a schedule unfolds (a decaying one does); the
                    # guard's bound holds whatever it is: the last admission sees the whole run.
                    guard.reserve_noise = _checked_reserve(controller.reserve_noise())
                    try:
                        admitted = guard.admit(action.noise_multiplier, controller.interval)
                    except BudgetExhausted:
                        result.stopped_by_guard = True
                        break
                    if lmo_base is not None:
                        action = replace(action, noise_multiplier=admitted.noise_multiplier)
                        lmo_law = lmo_base.with_noise_level(admitted.noise_multiplier)
                        if lmo_law not in lmo_stds:
                            lmo_stds[lmo_law] = noise_std(lmo_law)
                    else:
                        action, stds, count_std = _apply_admission(
                            action, admitted.noise_multiplier, len(groups)
                        )
                        dims = count_dims(len(groups), action.count_levels)
                next_decision = step + max(1, controller.interval)
                decision_metrics = controller.metrics()
                if on_log and decision_metrics:
                    on_log(decision_metrics, step)

            # -- forward / backward with per-sample gradients ------------------------------
            index = torch.as_tensor(indices, dtype=torch.long)
            texts = index[index < n_texts]
            canaries = (
                canary_of_record[index[index >= n_texts].numpy() - n_texts]
                if injector is not None
                else np.zeros(0, dtype=np.int64)
            )
            empty = len(index) == 0
            loss_value = math.nan
            if len(texts):
                batch = {k: v.to(device) for k, v in train_data.batch(texts).items()}
                logits = next_token_logits(forward, batch["input_ids"], batch["attention_mask"])
                losses = per_sample_loss(logits, batch["labels"])
                losses.sum().backward()
                loss_value = losses.mean().item()
            elif empty and not private:
                continue  # nothing to learn from and no privacy to account
            if len(canaries):  # audit canaries are records: clipped as the method clips
                if private:
                    injector.add_per_sample(canaries, has_records=len(texts) > 0)
                else:
                    injector.add_to_sum(canaries)

            # -- DP step: clip, noise, scale; the ledger records the draw ------------------
            if private and lmo_law is not None:
                # LMO-DP: the guard's knob is the noise level; the ledger keeps the law drawn.
                guard.check_step(action.noise_multiplier)
                (clip,) = action.clip_thresholds
                stats = mechanism.step(clip, lmo_law, expected_batch, empty=empty)
                z = lmo_stds[lmo_law]  # per-coordinate std over the clip: logs only
                ledger.record(
                    LedgerEntry(
                        step=step,
                        sample_rate=plan.sample_rate,
                        noise_multiplier=z,
                        clip_thresholds=(clip,),
                        noise_stds=(z * clip,),
                        batch_size=len(index),
                        mechanism="lmo",
                        lmo_params=lmo_law.to_dict(),
                    )
                )
                observer.add(loss_value, stats.norms, stats.clipped_fraction)
            elif private:
                z = effective_noise_multiplier(action.clip_thresholds, stds, count_std, dims)
                if z >= action.noise_multiplier:
                    # stds carry a rounding margin above the admitted z (see _apply_admission):
                    # record the admitted z, so an interval's steps stay one ledger segment.
                    z = action.noise_multiplier
                guard.check_step(z)
                stats = mechanism.step(
                    action.clip_thresholds,
                    stds,
                    expected_batch,
                    empty=empty,
                    scaling=action.scaling,
                    stability=action.stability,
                    count_std=count_std,
                    count_levels=action.count_levels,
                )
                ledger.record(
                    LedgerEntry(
                        step=step,
                        sample_rate=plan.sample_rate,
                        noise_multiplier=z,
                        clip_thresholds=tuple(action.clip_thresholds),
                        noise_stds=tuple(stds),
                        batch_size=len(index),
                        count_noise_std=count_std,
                        count_dims=dims,
                    )
                )
                observer.add(
                    loss_value,
                    stats.norms,
                    stats.clipped_fraction,
                    stats.unclipped_fraction_dp,
                    stats.norm_histogram_dp,
                )
            else:
                for p in trainable:
                    p.grad = p.grad / expected_batch
                observer.add(loss_value, None, 0.0)
            if injector is not None:
                injector.observe()  # the auditor reads the released gradient (white-box)

            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps_taken = step + 1

            # -- log and validate ----------------------------------------------------------
            last = step + 1 == plan.steps
            evaluated = step % params.eval_every == 0 or last
            if evaluated:
                valid_loss = mean_token_loss(model, valid_subset)
            if step % params.log_every == 0 or evaluated:
                row = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0]}
                if evaluated:
                    row["valid_loss"] = valid_loss
                if private:
                    eps_spent = guard.spent()
                    row.update(
                        epsilon=eps_spent,
                        noise_multiplier=z,
                        clipped_fraction=stats.clipped_fraction,
                    )
                    if stats.unclipped_fraction_dp is not None:
                        row["unclipped_fraction_dp"] = stats.unclipped_fraction_dp
                    clips = zip(group_names, action.clip_thresholds, strict=True)
                    row.update({f"clip/{n}": c for n, c in clips})
                result.history.append(row)
                if on_log:
                    on_log({k: v for k, v in row.items() if k != "step"}, step)
                status = f"loss {loss_value:.3f}" + (f" eps {eps_spent:.2f}" if private else "")
                progress.update(task, status=status)
            progress.advance(task)

    result.valid_loss = mean_token_loss(model, valid_data)
    if private:
        result.epsilon = accountant.ledger_epsilon(ledger, plan.delta, params.accountant)
        result.epsilon_rdp = accountant.ledger_epsilon(ledger, plan.delta, "rdp")
        if result.epsilon > params.epsilon * (1 + 1e-9):
            raise BudgetExhausted(  # unreachable unless the guard is broken: fail loudly
                f"spent epsilon {result.epsilon} exceeds the target {params.epsilon}"
            )
        _remove_opacus(forward)
    return result


def _checked_reserve(noise: float) -> float:
    if not (noise > 0 and math.isfinite(noise)):
        raise ValueError(f"controller.reserve_noise() must be finite and > 0, got {noise}")
    return noise


# Relative excess of the noise stds over the admitted multiplier (float rounding only).
ROUNDING_MARGIN = 1e-9


def _apply_admission(
    action: Action, noise: float, n_groups: int
) -> tuple[Action, tuple[float, ...], float | None]:
    """Rescale the action's noise to the admitted multiplier z; return the action, per-group
    gradient stds and the counts' noise std, together making one step of multiplier >= z."""
    count_std = action.count_noise
    grad_noise = noise
    if count_std is not None:
        dims = count_dims(n_groups, action.count_levels)
        # The counts must leave room for gradient noise, z sqrt(D) < 2 sigma_b; should the
        # admitted z reach that, sigma_b is raised to z sqrt(D) (counts take a quarter of it).
        if not 2 * count_std > noise * math.sqrt(dims) * (1 + 1e-6):
            count_std = noise * math.sqrt(dims)
        grad_noise = gradient_noise_multiplier(noise, count_std, dims)
    if action.noise_stds is None:
        # A hair more noise than z needs, so recombining the stds into z never rounds below it.
        stds = uniform_noise_stds(action.clip_thresholds, grad_noise * (1 + ROUNDING_MARGIN))
        return replace(action, noise_multiplier=noise, count_noise=count_std), stds, count_std
    requested = effective_noise_multiplier(action.clip_thresholds, action.noise_stds)
    factor = grad_noise / requested if requested > 0 else math.inf
    stds = tuple(s * max(1.0, factor) for s in action.noise_stds)
    dims = count_dims(n_groups, action.count_levels)
    total = effective_noise_multiplier(action.clip_thresholds, stds, count_std, dims)
    admitted = replace(action, noise_multiplier=total, noise_stds=stds, count_noise=count_std)
    return admitted, stds, count_std


def _remove_opacus(forward: torch.nn.Module) -> None:
    """Detach opacus' hooks so the fine-tuned model can be saved and evaluated as usual."""
    if isinstance(forward, GradSampleModule):
        forward.to_standard_module()
