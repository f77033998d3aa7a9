"""The budget guard: no controller, however buggy or adversarial, can overspend epsilon.

Before an interval's action is applied the guard projects the whole run: the ledger so far,
the interval at the requested noise, and every later planned step at ``reserve_noise``. If
that projection exceeds the target, the interval's noise is raised (a bracketing search on
log z) until it fits; if nothing fits, the run stops. Steps are then only allowed inside
the admitted interval, so the per-step check is a counter, and the final epsilon is at most
the target by construction.

The guard does not know the noise law: ``segment(noise, q, steps)`` (the mechanism's) turns
its knob into an accounting segment. For Gaussian noise the knob is z; for LMO-DP it is the
noise level L of LMOParams.with_noise_level (every draw multiplied by L, spending
non-increasing in L), composed in RDP with the ledger's other steps (accountant.compose): the
same admission, raising and stopping apply, so no mechanism can overspend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scipy import optimize

from privtune.errors import BudgetExhausted
from privtune.privacy import accountant as acc
from privtune.privacy.ledger import PrivacyLedger

SegmentFn = Callable[[float, float, int], tuple[Any, float, int]]


def gaussian_segment(noise: float, sample_rate: float, steps: int) -> tuple[float, float, int]:
    """Steps of the subsampled Gaussian mechanism at noise multiplier ``noise``."""
    return (noise, sample_rate, steps)


@dataclass(frozen=True)
class Admission:
    noise_multiplier: float
    steps: int
    projected_epsilon: float
    raised: bool  # True when the guard had to raise the requested noise


# The largest noise multiplier the guard admits: at z = 1000 a step's noise is a thousand
# clipping thresholds, and an adapter learns nothing (the plan refuses an epsilon needing more).
MAX_NOISE = 1e3


class BudgetGuard:
    def __init__(
        self,
        *,
        ledger: PrivacyLedger,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        total_steps: int,
        reserve_noise: float,
        accountant: str = "pld",
        max_noise: float = MAX_NOISE,
        rtol: float = 1e-3,
        segment: SegmentFn = gaussian_segment,
    ) -> None:
        if reserve_noise <= 0:
            raise ValueError("reserve_noise must be > 0")
        self.ledger = ledger
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.sample_rate = sample_rate
        self.total_steps = total_steps
        self.reserve_noise = reserve_noise
        self.accountant = accountant
        self.max_noise = max_noise
        self.rtol = rtol  # relative precision of a raised noise multiplier
        self.segment = segment  # noise knob -> accounting segment (the mechanism's)
        self._allowed_until = len(ledger)  # ledger length up to which steps are admitted
        self._admitted_noise: float | None = None

    def spent(self) -> float:
        return acc.ledger_epsilon(self.ledger, self.delta, self.accountant)

    def projected(self, noise: float, steps: int) -> float:
        left = self.total_steps - len(self.ledger)
        steps = min(steps, left)
        gaussian, lmo = self.ledger.split_segments()
        q = self.sample_rate
        planned = [self.segment(noise, q, steps), self.segment(self.reserve_noise, q, left - steps)]
        return acc.compose([*gaussian, *lmo, *planned], self.delta, self.accountant)

    def admit(self, noise: float, steps: int) -> Admission:
        """Admit `steps` steps at the requested noise, raised as needed to stay in budget."""
        steps = min(steps, self.total_steps - len(self.ledger))
        if steps <= 0:
            raise BudgetExhausted("the planned number of steps has been taken")
        if not noise > 0:  # also catches NaN
            noise = self.reserve_noise
        noise = min(noise, self.max_noise)
        eps = self.projected(noise, steps)
        raised = eps > self.target_epsilon
        if raised:
            noise, eps = self._raise(noise, eps, steps)
        self._allowed_until = len(self.ledger) + steps
        self._admitted_noise = noise
        return Admission(noise, steps, eps, raised)

    def _raise(self, noise: float, eps: float, steps: int) -> tuple[float, float]:
        """The least noise (to ``rtol``) at which the projection fits, and its epsilon.

        Every projection at a new noise costs a fresh PLD, so the search is frugal. On
        u = log z, f(u) = log eps - log target is smooth and decreasing: widen from the
        request along eps ~ 1/z until feasible, let Brent's method find the root, then close
        the bracket of the points seen around it on the feasible side.
        """
        tol = math.log(1 + self.rtol)
        ceiling = math.log(self.max_noise)
        target = math.log(self.target_epsilon)
        seen: dict[float, tuple[float, float]] = {}  # u -> (f, projected epsilon)

        def f(u: float) -> float:
            if u not in seen:
                projected = self.projected(math.exp(u), steps)
                value = math.log(projected) - target if projected > 0 else -math.inf
                seen[u] = (value, projected)
            return min(max(seen[u][0], -50.0), 50.0)  # finite for the root finder

        low = math.log(noise)
        seen[low] = (math.log(eps) - target, eps)  # infeasible
        step = min(f(low), math.log(64.0))
        while True:  # widen until feasible
            high = min(low + max(step, tol), ceiling)
            if f(high) <= 0:
                break
            if high >= ceiling:
                raise BudgetExhausted(
                    f"even noise multiplier {self.max_noise} cannot keep the run within "
                    f"epsilon {self.target_epsilon}"
                )
            low, step = high, 2 * step

        def tighten() -> tuple[float, float]:  # the closest infeasible and feasible points
            infeasible = max(u for u, (v, _) in seen.items() if v > 0)
            return infeasible, min(u for u, (v, _) in seen.items() if v <= 0)

        if high - low > tol:
            root = optimize.brentq(f, low, high, xtol=tol / 4)
            for probe in (root + tol / 4, root - tol / 4):
                low, high = tighten()
                if high - low > tol and low < probe < high:
                    f(probe)
            low, high = tighten()
        while high - low > tol:  # bisection, in case the root finder left a gap
            mid = (low + high) / 2
            if f(mid) > 0:
                low = mid
            else:
                high = mid
        return math.exp(high), seen[high][1]

    def state_dict(self) -> dict[str, Any]:
        """The admitted interval (the ledger is saved on its own)."""
        return {
            "allowed_until": self._allowed_until,
            "admitted_noise": self._admitted_noise,
            "reserve_noise": self.reserve_noise,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._allowed_until = int(state["allowed_until"])
        self._admitted_noise = state["admitted_noise"]
        self.reserve_noise = float(state["reserve_noise"])

    def check_step(self, noise: float) -> None:
        """Refuse a step outside the admitted interval or at a noise below the admitted one."""
        if len(self.ledger) >= self._allowed_until:
            raise BudgetExhausted("step not admitted: call admit() for the next interval")
        # Relative slack of 1e-9 absorbs float rounding when per-group stds are recombined;
        # written as `not >=` so a NaN noise (an infinite clip's inf/inf) is refused too.
        if self._admitted_noise is None or not noise >= self._admitted_noise * (1 - 1e-9):
            raise BudgetExhausted("step noise is below the admitted noise multiplier")
