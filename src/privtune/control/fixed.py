"""Constant-schedule methods: the non-private reference and DP-SGD with one flat threshold."""

from __future__ import annotations

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.control.registry import register_controller


@register_controller("nonprivate")
class NonPrivate(Controller):
    """No clipping, no noise: the utility ceiling every private method is compared with."""

    private = False

    def act(self, observation: Observation | None) -> Action:
        return Action(clip_thresholds=(), noise_multiplier=0.0)


@register_controller("dpsgd")
class DPSGD(Controller):
    """DP-SGD (Abadi et al., 2016, arXiv 1607.00133): flat clipping at C, constant noise.

    The noise multiplier is calibrated so that the planned steps spend exactly the target.
    """

    def __init__(self, ctx: ControllerContext, clip: float = 1.0) -> None:
        super().__init__(ctx)
        if not clip > 0:
            raise ValueError("clip must be > 0")
        self.clip = float(clip)

    def act(self, observation: Observation | None) -> Action:
        return Action(clip_thresholds=(self.clip,), noise_multiplier=self.ctx.calibrated_noise)
