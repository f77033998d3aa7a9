"""The controller interface: a method is a controller that sets clipping and noise over time.

The training loop asks the controller for an action every ``interval`` steps, passing an
observation of the learning dynamics since the last action. The budget guard then admits the
action (raising its noise if needed), so a controller can never overspend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from privtune.privacy.mechanisms import Scaling

Grouping = Literal["flat", "per_adapter"]


@dataclass(frozen=True)
class ControllerContext:
    """What a controller knows before training starts."""

    group_names: tuple[str, ...]
    sample_rate: float
    total_steps: int
    target_epsilon: float
    delta: float
    calibrated_noise: float  # z spending exactly the target over total_steps at constant noise
    seed: int = 0
    expected_batch_size: float | None = None  # q * N (public)
    accountant: str = "pld"  # the accountant the budget guard uses


@dataclass(frozen=True)
class Action:
    clip_thresholds: tuple[float, ...]
    noise_multiplier: float
    # Per-group noise std; None = the same std on every group (effective z = noise_multiplier).
    noise_stds: tuple[float, ...] | None = None
    # How each per-sample gradient is bounded (see privacy.mechanisms), and its constant
    # (gamma of AUTO-S, r of DP-PSAC).
    scaling: Scaling = "clip"
    stability: float = 0.0
    # Std of the noisy unclipped count to release every step (Andrew et al. 2021); None = none.
    # noise_multiplier is the step's total z: the gradient gets the part the count leaves.
    count_noise: float | None = None
    # With count_noise: release instead, per group k, the noisy fraction of samples whose norm
    # is <= level * C_k for each level (a DP histogram of the norms; mechanisms.py).
    count_levels: tuple[float, ...] = ()


@dataclass(frozen=True)
class Observation:
    """Learning-dynamics statistics over the last interval."""

    step: int
    total_steps: int
    train_loss: float
    loss_trend: float  # mean loss of this interval minus the previous interval's
    valid_loss: float | None
    epsilon_spent: float
    epsilon_target: float
    clipped_fraction: float
    norm_quantiles: tuple[tuple[float, ...], ...]  # per group: (q10, q25, q50, q75, q90)
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    action: Action
    extra: dict[str, float] = field(default_factory=dict)
    # Mean over the interval of the DP-released unclipped fraction (None when not released).
    # Everything above from train_loss to norm_std is computed from the protected records
    # WITHOUT noise: a private controller must not set thresholds or noise from it.
    unclipped_fraction_dp: float | None = None
    # Mean over the interval of the DP-released norm histogram: per group, per level of the
    # action's count_levels, the fraction of samples with norm <= level * C_k (None: not released)
    norm_histogram_dp: tuple[tuple[float, ...], ...] | None = None


class Controller(ABC):
    """Base class; subclasses are registered with ``@register_controller(name)``."""

    name: ClassVar[str] = ""
    private: ClassVar[bool] = True
    grouping: Grouping = "flat"
    # True: the loop evaluates the validation loss right before every decision.
    needs_validation: ClassVar[bool] = False
    # How many of the validation records those decision-time evaluations use (None: the
    # loop's eval_records); fewer make each decision cheaper.
    validation_records: int | None = None
    # The noise the loop adds: "gaussian" (noise_multiplier is z) or "lmo" (LMO-DP noise of the
    # controller's `lmo_params` law; noise_multiplier is its noise level, see LMOParams).
    mechanism: ClassVar[str] = "gaussian"

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.interval = ctx.total_steps

    def reserve_noise(self) -> float:
        """Noise the guard assumes for steps after the current interval."""
        return self.ctx.calibrated_noise

    @abstractmethod
    def act(self, observation: Observation | None) -> Action:
        """Return the action for the next interval (observation is None before step 0)."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the last decision (reward, fallbacks...), logged by the loop."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
