"""Constant-schedule methods: the non-private reference, DP-SGD with one flat threshold and
per-adapter clipping with a fixed split of it."""

from __future__ import annotations

import math

from privtune.control.base import Action, Controller, ControllerContext, Observation
from privtune.privacy.mechanisms import NoNoise


class NonPrivate(Controller):
    """No clipping, no noise: the utility ceiling every private method is compared with."""

    name = "nonprivate"
    mechanism = NoNoise

    def act(self, observation: Observation | None) -> Action:
        return Action(clip_thresholds=(), noise_multiplier=0.0)


class DPSGD(Controller):
    """DP-SGD (Abadi et al., 2016, arXiv 1607.00133): flat clipping at C, constant noise.

    The noise multiplier is calibrated so that the planned steps spend exactly the target.
    """

    name = "dpsgd"

    def __init__(self, ctx: ControllerContext, clip: float = 1.0) -> None:
        super().__init__(ctx)
        if not clip > 0:
            raise ValueError("clip must be > 0")
        self.clip = float(clip)

    def act(self, observation: Observation | None) -> Action:
        return Action(clip_thresholds=(self.clip,), noise_multiplier=self.ctx.calibrated_noise)


class PerAdapter(Controller):
    """Per-layer clipping (McMahan, Ramage, Talwar, Zhang 2018, arXiv 1710.06963): each LoRA
    adapter (A and B jointly) is clipped to its own fixed C_k, with C_k = C * w_k / ||w||, so
    sum_k C_k^2 = C^2 and the noise is DP-SGD's (std z * C on every adapter).

    ``weights`` (one per adapter, in the order of the model's adapters) default to equal,
    C_k = C / sqrt(K).
    """

    name = "per_adapter"

    grouping = "per_adapter"

    def __init__(
        self, ctx: ControllerContext, clip: float = 1.0, weights: list[float] | None = None
    ) -> None:
        super().__init__(ctx)
        k = len(ctx.group_names)
        if not clip > 0:
            raise ValueError("clip must be > 0")
        weights = [1.0] * k if weights is None else [float(w) for w in weights]
        if len(weights) != k or not all(w > 0 for w in weights):
            raise ValueError(
                f"weights must be {k} positive numbers, one per adapter: "
                + ", ".join(ctx.group_names)
            )
        norm = math.sqrt(sum(w * w for w in weights))
        self.clips = tuple(clip * w / norm for w in weights)

    def act(self, observation: Observation | None) -> Action:
        return Action(clip_thresholds=self.clips, noise_multiplier=self.ctx.calibrated_noise)
