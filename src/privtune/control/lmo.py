"""LMO-DP as a method of the one loop: Laplace noise with a random inverse scale.

After Yang, Mohammady, Wang, Payani, Kundu, Shu, Yan, Hong, "LMO-DP: Optimizing the
Randomization Mechanism for Differentially Private Fine-Tuning (Large) Language Models",
arXiv 2405.18776 (2024). Per coordinate the noise is Laplace(0, C / eps) with
eps = a1 Gamma(k, theta) + a3 Exp(rate lam) + a4 U(a, b), and the law's 8 parameters come from
an offline search.

What we changed to make it sound (see privacy/lmo_accounting.py and the research notes):
- per-sample clipping in L1 (not L2) over all LoRA parameters, so that one record moves the
  released sum by at most C in L1, the sensitivity the per-coordinate bound covers;
- the noise is scaled by C (the authors' code fixes C = 1 and never scales);
- one convention for the Exponential (a RATE) in sampler and accountant;
- RDP only at orders where the mixture's MGF is finite (the authors' code evaluates the closed
  forms past their poles);
- the run is accounted with Poisson subsampling over the planned steps and delta (Zhu & Wang
  2019, general bound), not per round, and not credited with a Gaussian proxy's epsilon;
- the search scores every candidate by that whole-run epsilon, then the winner's scale is
  calibrated so the plan spends the target (as DP-SGD's noise multiplier is);
- every step goes through the ledger, the accountant and the budget guard like any method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.errors import ConfigError
from privtune.privacy import lmo_accounting
from privtune.privacy.lmo_mechanism import LMOParams, noise_std
from privtune.privacy.lmo_search import EXTENDED_GRID, PAPER_GRID, LMOSearchResult, search
from privtune.privacy.mechanisms import LMO, Group, Mechanism

GRIDS = {"paper": PAPER_GRID, "extended": EXTENDED_GRID}
LEVEL_RTOL = 1e-3  # relative precision of the calibrated noise level
LEVEL_RANGE = (1e-3, 1e3)


class LMODP(Controller):
    """LMO-DP with a constant noise law over the run and a flat L1 threshold ``clip``.

    ``params``: an explicit law (a1, a3, a4, k, theta, lam, a, b; lam is a rate), used as given
    unless ``calibrate`` is true. Without it the law is searched on ``grid`` ("paper": the
    authors' 40,824 points, about a second; "extended": smaller Gamma/Exponential weights,
    about 20 s, reaches lower epsilons) for the least noise (``objective`` "std") or the most
    usefulness P(|n| <= 0.9 C) ("usefulness") whose sound epsilon over the plan is within
    the target, then calibrated (default). ``cache``: a JSON file caching searches per plan
    (``write_cache`` false: read only).
    """

    name = "lmo"
    mechanism = LMO

    def __init__(
        self,
        ctx: ControllerContext,
        clip: float = 1.0,
        params: dict[str, float] | None = None,
        grid: Literal["paper", "extended"] = "paper",
        objective: Literal["std", "usefulness"] = "std",
        calibrate: bool | None = None,
        cache: str | None = None,
        write_cache: bool = True,
    ) -> None:
        super().__init__(ctx)
        if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be > 0, got {clip!r}")
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        self.clip = float(clip)
        self.search_result: LMOSearchResult | None = None
        if params is None:
            self.search_result = search(
                ctx.target_epsilon,
                ctx.sample_rate,
                ctx.total_steps,
                ctx.delta,
                objective=objective,
                grid=GRIDS[grid],
                cache_path=cache,
                write_cache=write_cache,
            )
            law = self.search_result.params
        else:
            if not isinstance(params, dict):
                raise ValueError("params must be a mapping of the 8 LMO parameters")
            missing = set(LMOParams.__dataclass_fields__) - set(params)
            unknown = set(params) - set(LMOParams.__dataclass_fields__)
            if missing or unknown:
                raise ValueError(
                    "params needs exactly a1, a3, a4, k, theta, lam, a, b"
                    + (f"; missing {', '.join(sorted(missing))}" if missing else "")
                    + (f"; unknown {', '.join(sorted(unknown))}" if unknown else "")
                )
            law = LMOParams.from_dict(params)
        if calibrate if calibrate is not None else params is None:
            law = law.with_noise_level(self._calibrated_level(law))
        self.planned_epsilon = self._epsilon(law)
        if not self.planned_epsilon <= ctx.target_epsilon:
            raise ConfigError(
                "methods.lmo.params",
                f"this law spends epsilon {self.planned_epsilon:.4g} over the plan "
                f"({ctx.total_steps} steps at q={ctx.sample_rate:.4g}), above the target "
                f"{ctx.target_epsilon}",
                "set calibrate: true, or give a noisier law",
            )
        self.lmo_params = law
        self.noise_std = noise_std(law, self.clip)  # per coordinate, for logs

    @classmethod
    def check_plan(cls, ctx: ControllerContext, **options: Any) -> None:
        """The law's search and calibration need only the plan: an epsilon no candidate
        reaches, or a given law above the target, is found before the model loads (the
        ``cache`` file read, not written: `privtune check` writes nothing)."""
        cls(ctx, **options, write_cache=False)

    @classmethod
    def describe_plan(cls, ctx: ControllerContext, **options: Any) -> str:
        lmo = cls(ctx, **options, write_cache=False)  # kept per process: not searched again
        return (
            f"LMO-DP law with noise std {lmo.noise_std:.3g} per coordinate (L1 clip "
            f"{lmo.clip:g}), spending epsilon {lmo.planned_epsilon:.5g} of "
            f"{ctx.target_epsilon:g} ({cls.mechanism.accounting})"
        )

    def _epsilon(self, law: LMOParams) -> float:
        c = self.ctx
        return lmo_accounting.epsilon(law, c.sample_rate, c.total_steps, c.delta)

    def _calibrated_level(self, law: LMOParams) -> float:
        """Smallest noise level whose planned run spends at most the target (geometric
        bisection; the bound is monotone in the level, see LMOParams.with_noise_level)."""
        target = self.ctx.target_epsilon

        def fits(level: float) -> bool:
            return self._epsilon(law.with_noise_level(level)) <= target

        low, high = LEVEL_RANGE
        if not fits(high):
            raise ConfigError(
                "methods.lmo",
                f"even {high:g} times this law's noise spends more than epsilon {target}",
                "raise the target or plan fewer steps",
            )
        if fits(low):
            return low
        while high / low > 1 + LEVEL_RTOL:  # invariant: fits(high), not fits(low)
            mid = math.sqrt(low * high)
            low, high = (low, mid) if fits(mid) else (mid, high)
        return high

    def make_mechanism(
        self, groups: Sequence[Group], group_names: Sequence[str], seed: int
    ) -> Mechanism:
        return LMO(groups, group_names, seed, law=self.lmo_params)

    def reserve_noise(self) -> float:
        return 1.0  # the planned law itself, for every later step

    def act(self, observation: Observation | None) -> Action:
        return Action(clip_thresholds=(self.clip,), noise_multiplier=1.0)

    def metrics(self) -> dict[str, float]:
        return {"lmo/noise_std": self.noise_std, "lmo/planned_epsilon": self.planned_epsilon}

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "lmo_params": self.lmo_params.to_dict()}
