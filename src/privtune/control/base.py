"""The controller interface: a method is a controller that sets clipping and noise over time.

The training loop asks the controller for an action every ``interval`` steps, passing an
observation of the learning dynamics since the last action. The budget guard then admits the
action (raising its noise if needed), so a controller can never overspend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from privtune.privacy.action import Action, Scaling
from privtune.privacy.mechanisms import Gaussian, Group, Mechanism

Grouping = Literal["flat", "per_adapter", "per_projection"]

__all__ = ["Action", "Controller", "ControllerContext", "Grouping", "Observation", "Scaling"]


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


# The fields an Observation computes from the training records without noise.
RAW_FIELDS = (
    "train_loss",
    "loss_trend",
    "clipped_fraction",
    "norm_quantiles",
    "norm_mean",
    "norm_std",
)


@dataclass(frozen=True)
class Observation:
    """Learning-dynamics statistics over the last interval."""

    step: int
    total_steps: int
    # RAW_FIELDS, from train_loss to norm_std: computed from the protected records WITHOUT
    # noise, so the loop withholds them (None) from a private method's controller, whose
    # action must depend on the records only through the ledger's releases (dp_only()).
    train_loss: float | None
    loss_trend: float | None  # mean loss of this interval minus the previous interval's
    valid_loss: float | None
    epsilon_spent: float
    epsilon_target: float
    clipped_fraction: float | None
    norm_quantiles: tuple[tuple[float, ...], ...] | None  # per group: (q10, q25, q50, q75, q90)
    norm_mean: tuple[float, ...] | None
    norm_std: tuple[float, ...] | None
    action: Action
    extra: dict[str, float] = field(default_factory=dict)
    # Mean over the interval of the DP-released unclipped fraction (None when not released).
    unclipped_fraction_dp: float | None = None
    # Mean over the interval of the DP-released norm histogram: per group, per level of the
    # action's count_levels, the fraction of samples with norm <= level * C_k (None: not released)
    norm_histogram_dp: tuple[tuple[float, ...], ...] | None = None

    def dp_only(self) -> Observation:
        """This observation without RAW_FIELDS: what a private controller is given. The
        validation loss stays (held-out records, not the training set), as do epsilon and
        the DP releases."""
        return replace(self, **dict.fromkeys(RAW_FIELDS))


class Controller(ABC):
    """Base class of a method's controller; the registry (control.registry) names them.

    A controller names its noise mechanism (``mechanism``, a class of privacy.mechanisms);
    the loop and the privacy engine build and drive it, so nothing else reads its type.
    """

    name: ClassVar[str] = ""
    mechanism: ClassVar[type[Mechanism]] = Gaussian
    private: ClassVar[bool] = True  # derived from the mechanism (__init_subclass__)
    grouping: Grouping = "flat"
    # True: the loop evaluates the validation loss right before every decision.
    needs_validation: ClassVar[bool] = False
    # How many of the validation records those decision-time evaluations use (None: the
    # loop's eval_records); fewer make each decision cheaper.
    validation_records: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.private = cls.mechanism.private

    def __init__(self, ctx: ControllerContext) -> None:
        self.ctx = ctx
        self.interval = ctx.total_steps

    @classmethod
    def check_plan(cls, ctx: ControllerContext, **options: Any) -> None:
        """Raise what this controller would refuse about the plan alone, before a model is
        loaded (the stages' preflight, `privtune check`). ``ctx.group_names`` is empty there:
        most controllers need the model's groups and have nothing to check."""
        del ctx, options

    @classmethod
    def describe_plan(cls, ctx: ControllerContext, **options: Any) -> str | None:
        """The planned noise in words, for `privtune check`, where it is not the plan's
        constant Gaussian multiplier (None: it is)."""
        del ctx, options
        return None

    def make_mechanism(
        self, groups: Sequence[Group], group_names: Sequence[str], seed: int
    ) -> Mechanism:
        """The noise mechanism of this method over the loop's parameter groups."""
        return self.mechanism(groups, group_names, seed)

    def reserve_noise(self) -> float:
        """Noise the guard assumes for steps after the current interval."""
        return self.ctx.calibrated_noise

    @abstractmethod
    def act(self, observation: Observation | None) -> Action:
        """Return the action for the next interval (observation is None before step 0)."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the last decision (reward, fallbacks...), logged by the loop."""
        return {}

    def provenance(self) -> dict[str, str]:
        """Where a controller's learned state came from (MLflow tags of the run; {}: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
