"""The budget guard: no controller, however buggy or adversarial, can overspend epsilon.

Before an interval's action is applied the guard projects the whole run: the ledger so far,
the interval at the requested noise, and every later planned step at ``reserve_noise``. If
that projection exceeds the target, the interval's noise is raised (doubling, then geometric
bisection) until it fits; if nothing fits, the run stops. Steps are then only allowed inside
the admitted interval, so the per-step check is a counter, and the final epsilon is at most
the target by construction.

For LMO-DP (``lmo_base`` set) the knob is the noise level L of LMOParams.with_noise_level
(every draw multiplied by L, spending non-increasing in L) instead of z, and the projection is
composed in RDP with the ledger's other steps (accountant.composed_epsilon): the same
admission, raising and stopping apply, so an LMO run cannot overspend either.
"""

from __future__ import annotations

from dataclasses import dataclass

from privtune.errors import BudgetExhausted
from privtune.privacy import accountant as acc
from privtune.privacy.ledger import PrivacyLedger
from privtune.privacy.lmo_mechanism import LMOParams


@dataclass(frozen=True)
class Admission:
    noise_multiplier: float
    steps: int
    projected_epsilon: float
    raised: bool  # True when the guard had to raise the requested noise


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
        max_noise: float = 1e3,
        rtol: float = 1e-3,
        lmo_base: LMOParams | None = None,
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
        self.lmo_base = lmo_base  # LMO-DP: the noise law at level 1; None: Gaussian steps
        self._allowed_until = len(ledger)  # ledger length up to which steps are admitted
        self._admitted_noise: float | None = None

    def spent(self) -> float:
        return acc.ledger_epsilon(self.ledger, self.delta, self.accountant)

    def projected(self, noise: float, steps: int) -> float:
        left = self.total_steps - len(self.ledger)
        steps = min(steps, left)
        gaussian, lmo = self.ledger.split_segments()
        planned = [(noise, steps), (self.reserve_noise, left - steps)]
        q = self.sample_rate
        if self.lmo_base is None:
            gaussian += [(level, q, n) for level, n in planned]
        else:
            lmo += [(self.lmo_base.with_noise_level(level), q, n) for level, n in planned]
        return acc.composed_epsilon(gaussian, lmo, self.delta, self.accountant)

    def admit(self, noise: float, steps: int) -> Admission:
        """Admit `steps` steps at the requested noise, raised as needed to stay in budget."""
        steps = min(steps, self.total_steps - len(self.ledger))
        if steps <= 0:
            raise BudgetExhausted("the planned number of steps has been taken")
        if not noise > 0:  # also catches NaN
            noise = self.reserve_noise
        noise = min(noise, self.max_noise)
        eps = self.projected(noise, steps)
        raised = False
        if eps > self.target_epsilon:
            raised = True
            low, high = noise, noise
            while eps > self.target_epsilon:  # double until feasible
                if high >= self.max_noise:
                    raise BudgetExhausted(
                        f"even noise multiplier {self.max_noise} cannot keep the run within "
                        f"epsilon {self.target_epsilon}"
                    )
                low, high = high, min(2 * high, self.max_noise)
                eps = self.projected(high, steps)
            while high / low > 1 + self.rtol:  # geometric bisection: feasible side is `high`
                mid = (low * high) ** 0.5
                mid_eps = self.projected(mid, steps)
                if mid_eps > self.target_epsilon:
                    low = mid
                else:
                    high, eps = mid, mid_eps
            noise = high
        self._allowed_until = len(self.ledger) + steps
        self._admitted_noise = noise
        return Admission(noise, steps, eps, raised)

    def check_step(self, noise: float) -> None:
        """Refuse a step outside the admitted interval or at a noise below the admitted one."""
        if len(self.ledger) >= self._allowed_until:
            raise BudgetExhausted("step not admitted: call admit() for the next interval")
        # Relative slack of 1e-9 absorbs float rounding when per-group stds are recombined.
        if self._admitted_noise is None or noise < self._admitted_noise * (1 - 1e-9):
            raise BudgetExhausted("step noise is below the admitted noise multiplier")
