"""Hand-made noise schedules: noise that decays over the run, calibrated to the target epsilon.

Decaying noise (more noise early, less late) follows the linear and exponential decay schedules
studied for DP-SGD by Yu, Liu, Pu, Gursoy, Truex (IEEE S&P 2019, "Differentially private model
publishing for deep learning", arXiv 1904.02200). The schedule is piecewise constant over
``phases`` equal phases (each phase is one ledger segment, which keeps the accountant fast),
and one scale factor, found by root finding with the run's accountant, makes the whole planned
schedule spend exactly the target.

The guard assumes one reserve noise for every step after the current interval, while this
schedule's later phases differ. The reserve reported is therefore the constant noise that,
after the planned prefix, spends exactly what the rest of the schedule spends (rounded to the
safe side), so the guard's projection equals the plan and it never needs to raise the noise.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from scipy.optimize import brentq

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.privacy import accountant

Segment = tuple[float, float, int]
XTOL = 1e-4  # relative precision of the root finding on log noise


def decay_profile(schedule: str, end_ratio: float, phases: int) -> np.ndarray:
    """Relative noise of each phase, from 1 down to end_ratio."""
    t = np.linspace(0.0, 1.0, phases) if phases > 1 else np.zeros(1)
    if schedule == "linear":
        return 1.0 - (1.0 - end_ratio) * t
    if schedule == "exponential":
        return end_ratio**t
    raise ValueError(f"unknown schedule '{schedule}': use linear or exponential")


class DecayingNoise(Controller):
    """Noise multiplier decaying linearly or exponentially from its first to its last phase
    (last / first = ``end_ratio``), flat clipping at ``clip``."""

    name = "decay"

    def __init__(
        self,
        ctx: ControllerContext,
        schedule: Literal["linear", "exponential"] = "linear",
        end_ratio: float = 0.5,
        phases: int = 5,
        clip: float = 1.0,
    ) -> None:
        super().__init__(ctx)
        if not (0 < end_ratio <= 1 and clip > 0 and phases >= 1):
            raise ValueError("need 0 < end_ratio <= 1, clip > 0 and phases >= 1")
        profile = decay_profile(schedule, end_ratio, min(phases, ctx.total_steps))
        self.lengths = [len(a) for a in np.array_split(np.arange(ctx.total_steps), len(profile))]
        self.clip = float(clip)
        self.scale = self._calibrate(profile)
        self.noises = [float(self.scale * f) for f in profile]
        self.planned_epsilon = self._epsilon(self._segments(self.noises))
        self._phase = 0
        self._reserves: dict[int, float] = {}

    @classmethod
    def describe_plan(cls, ctx: ControllerContext, **options: Any) -> str:
        decay = cls(ctx, **options)  # its calibration: about a second
        noises = " → ".join(f"{z:.3g}" for z in decay.noises)
        return (
            f"noise multiplier {noises} over {len(decay.noises)} phases, spending epsilon "
            f"{decay.planned_epsilon:.5g} of {ctx.target_epsilon:g} ({ctx.accountant})"
        )

    # -- accounting of the planned schedule ------------------------------------------------
    def _epsilon(self, segments: list[Segment]) -> float:
        return accountant.epsilon(segments, self.ctx.delta, self.ctx.accountant)

    def _segments(self, noises: list[float]) -> list[Segment]:
        q = self.ctx.sample_rate
        return [(z, q, n) for z, n in zip(noises, self.lengths, strict=True)]

    def _calibrate(self, profile: np.ndarray) -> float:
        """Smallest scale whose schedule spends at most the target (cf. calibrate_noise)."""
        target = self.ctx.target_epsilon
        low = self.ctx.calibrated_noise  # every phase at or below the constant noise
        high = low / float(profile.min())  # every phase at or above it: spends <= target

        def excess(log_scale: float) -> float:
            return self._epsilon(self._segments(list(math.exp(log_scale) * profile))) - target

        if excess(math.log(low)) <= 0:
            return low
        scale = math.exp(brentq(excess, math.log(low), math.log(high), xtol=XTOL))
        while excess(math.log(scale)) > 0:  # the root is approximate: step to the safe side
            scale *= 1 + XTOL
        return scale

    def _reserve(self, phase: int) -> float:
        """Constant noise for the phases after `phase` spending what they spend in the plan."""
        rest = self.noises[phase + 1 :]
        if not rest:
            return self.noises[-1]  # nothing left after this interval: never used
        if max(rest) == min(rest):
            return rest[0]
        prefix = self._segments(self.noises)[: phase + 1]
        steps = sum(self.lengths[phase + 1 :])
        q = self.ctx.sample_rate

        def excess(log_noise: float) -> float:
            spent = self._epsilon([*prefix, (math.exp(log_noise), q, steps)])
            return spent - self.planned_epsilon

        # A constant at the largest remaining noise spends less than the rest, at the smallest
        # more: the equivalent constant lies between.
        reserve = math.exp(brentq(excess, math.log(min(rest)), math.log(max(rest)), xtol=XTOL))
        while excess(math.log(reserve)) > 0:
            reserve *= 1 + XTOL
        return reserve

    # -- controller interface ----------------------------------------------------------------
    def reserve_noise(self) -> float:
        """Reserve for the steps after the current phase (before the first act: phase 0)."""
        phase = max(self._phase - 1, 0)
        if phase not in self._reserves:
            self._reserves[phase] = self._reserve(phase)
        return self._reserves[phase]

    def act(self, observation: Observation | None) -> Action:
        phase = min(self._phase, len(self.noises) - 1)
        self.interval = self.lengths[phase]
        self._phase = phase + 1
        return Action(clip_thresholds=(self.clip,), noise_multiplier=self.noises[phase])

    def metrics(self) -> dict[str, float]:
        return {"decay/noise_multiplier": self.noises[max(self._phase - 1, 0)]}
