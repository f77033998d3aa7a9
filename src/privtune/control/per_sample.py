"""Per-sample scaling instead of clipping: every sample's gradient is rescaled by a weight that
depends on its norm and bounds it by C, so the sensitivity (and DP-SGD's noise) stays C."""

from __future__ import annotations

from privtune.control.base import Action, Controller, ControllerContext, Observation


class AutoS(Controller):
    """Automatic clipping AUTO-S (Bu, Wang, Zha, Karypis 2023, arXiv 2206.07136): each
    per-sample gradient becomes g / (||g|| + gamma); sensitivity 1, noise z * 1. No threshold to
    tune: the update's scale is absorbed by the learning rate."""

    name = "auto_s"

    def __init__(self, ctx: ControllerContext, gamma: float = 0.01) -> None:
        super().__init__(ctx)
        if not gamma > 0:
            raise ValueError("gamma (the stability constant) must be > 0")
        self.gamma = float(gamma)

    def act(self, observation: Observation | None) -> Action:
        return Action(
            clip_thresholds=(1.0,),
            noise_multiplier=self.ctx.calibrated_noise,
            scaling="normalize",
            stability=self.gamma,
        )


class PSAC(Controller):
    """DP-PSAC (Xia et al., AAAI 2023, arXiv 2212.00328): per-sample adaptive clipping with the
    non-monotonic weight C / (||g|| + r / (||g|| + r)). Unlike AUTO-S it does not blow up
    small gradients (the weight tends to C as ||g|| -> 0); every weighted gradient has norm < C,
    so the sensitivity is C and the noise std z * C."""

    name = "psac"

    def __init__(self, ctx: ControllerContext, clip: float = 1.0, r: float = 0.1) -> None:
        super().__init__(ctx)
        if not (clip > 0 and r > 0):
            raise ValueError("clip and r must be > 0")
        self.clip = float(clip)
        self.r = float(r)

    def act(self, observation: Observation | None) -> Action:
        return Action(
            clip_thresholds=(self.clip,),
            noise_multiplier=self.ctx.calibrated_noise,
            scaling="psac",
            stability=self.r,
        )
