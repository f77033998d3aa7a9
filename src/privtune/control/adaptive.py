"""Adaptive quantile clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, arXiv 1905.03871).

The threshold tracks the gamma-quantile of the per-sample gradient norms with the geometric
update C <- C * exp(-eta_C * (b_tilde - gamma)), where b_tilde is the fraction of unclipped
samples released with differential privacy: every step the mechanism releases the centred count
sum_i (b_i - 1/2) + N(0, sigma_b^2) beside the gradient. By the paper's Theorem 1 the pair is
one Gaussian mechanism of multiplier z when the gradient gets z_grad = (z^-2 - (2 sigma_b)^-2)^-1/2,
so the ledger records z (the calibrated one) and the count's sigma_b.

Soundness: the controller reads only the released fraction (``unclipped_fraction_dp``), never
the raw norm statistics of the observation, which are not private.
"""

from __future__ import annotations

import math

from privtune.control.base import Action, Controller, ControllerContext, Observation


class AdaptiveQuantile(Controller):
    """Flat clipping at a threshold adapted every ``interval`` steps towards a target quantile.

    ``count_noise`` is sigma_b in count units; default: expected batch size / 20, the paper's
    recommendation.
    """

    name = "quantile"

    def __init__(
        self,
        ctx: ControllerContext,
        clip: float = 1.0,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_noise: float | None = None,
        interval: int = 1,
    ) -> None:
        super().__init__(ctx)
        if not clip > 0:
            raise ValueError("clip (the initial threshold) must be > 0")
        if not 0 < target_quantile < 1:
            raise ValueError("target_quantile must be in (0, 1), e.g. 0.5 for the median")
        if not clip_lr > 0 or interval < 1:
            raise ValueError("clip_lr must be > 0 and interval >= 1")
        if count_noise is None:
            if not ctx.expected_batch_size:
                raise ValueError("count_noise is needed when the expected batch size is unknown")
            count_noise = ctx.expected_batch_size / 20
        if not count_noise > ctx.calibrated_noise / 2:
            raise ValueError(
                f"count_noise must exceed z / 2 = {ctx.calibrated_noise / 2:.3g} (the count "
                "would otherwise use the whole privacy budget of a step)"
            )
        self.clip = float(clip)
        self.target_quantile = float(target_quantile)
        self.clip_lr = float(clip_lr)
        self.count_noise = float(count_noise)
        self.interval = interval
        self.last_fraction = math.nan

    def act(self, observation: Observation | None) -> Action:
        if observation is not None and observation.unclipped_fraction_dp is not None:
            fraction = observation.unclipped_fraction_dp
            self.clip *= math.exp(-self.clip_lr * (fraction - self.target_quantile))
            self.last_fraction = fraction
        return Action(
            clip_thresholds=(self.clip,),
            noise_multiplier=self.ctx.calibrated_noise,
            count_noise=self.count_noise,
        )

    def metrics(self) -> dict[str, float]:
        metrics = {"quantile/clip": self.clip}
        if math.isfinite(self.last_fraction):
            metrics["quantile/unclipped_fraction_dp"] = self.last_fraction
        return metrics

    def state_dict(self) -> dict[str, float]:
        return {"clip": self.clip}
