"""LMO-DP step (arXiv 2405.18776, made sound): L1 clipping over all trainable parameters,
Laplace-mixture noise, accounted in RDP only.

Each sample's gradient over ALL trainable parameters is clipped to L1 norm <= C and summed;
LMO noise C * Laplace(0, 1) / eps is added per coordinate (eps = a1 Gamma + a3 Exp + a4 U,
privacy.lmo_mechanism), then the sum is divided by the expected batch size.

L1, not L2: one record moves the clipped sum by at most C in L1, which is what the
per-coordinate Laplace-mixture bound of lmo_accounting needs (with L2 clipping the L1 shift can
reach sqrt(d) C). The guard's knob is the law's noise level (LMOParams.with_noise_level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from privtune.privacy.action import Action
from privtune.privacy.ledger import LedgerEntry
from privtune.privacy.lmo_mechanism import LMOParams, lmo_noise, noise_std
from privtune.privacy.mechanisms.base import Group, PerSampleClipping, Segment, StepSpec, StepStats


@dataclass(frozen=True)
class LMOSpec(StepSpec):
    law: LMOParams  # the admitted law, in units of the clip
    clip: float
    z: float  # per-coordinate noise std over the clip: logs only, not a noise multiplier


class LMO(PerSampleClipping):
    """L1 clipping in one group over every trainable parameter, LMO noise scaled by C."""

    name = "lmo"
    accounting = "rdp"
    norm_ord = 1.0  # L1: the mechanism's sensitivity is in L1

    def __init__(
        self, groups: Sequence[Group], group_names: Sequence[str], seed: int, *, law: LMOParams
    ) -> None:
        flat = [p for group in groups for p in group]
        super().__init__([flat], ["all"], seed)
        self.law = law  # the controller's law at noise level 1
        self._stds: dict[LMOParams, float] = {}

    def admit(self, action: Action, noise: float) -> LMOSpec:
        (clip,) = action.clip_thresholds
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"the L1 clipping threshold must be > 0, got {clip!r}")
        law = self.law.with_noise_level(noise)
        if law not in self._stds:
            self._stds[law] = noise_std(law)
        return LMOSpec(replace(action, noise_multiplier=noise), noise, law, clip, self._stds[law])

    def factors(self, norms: torch.Tensor, spec: StepSpec) -> torch.Tensor:
        (clip,) = spec.action.clip_thresholds
        limit = torch.tensor([clip], dtype=norms.dtype, device=norms.device)
        return (limit / (norms + 1e-6)).clamp(max=1.0)

    def release(self, spec: LMOSpec, expected_batch_size: float, batch_size: int) -> StepStats:
        total, norms, clipped = self.take_sum([spec.clip])
        noise = lmo_noise(spec.law, tuple(total.shape), spec.clip, self.generator)
        total.add_(noise.to(total.device, non_blocking=True))
        self.scale(total, expected_batch_size)
        metrics = {"noise_multiplier": spec.z, "clipped_fraction": clipped, "clip/all": spec.clip}
        return StepStats(norms, clipped, metrics=metrics)

    def ledger_entry(self, spec: LMOSpec, step: int, sample_rate: float, batch_size: int):
        return LedgerEntry(
            step=step,
            sample_rate=sample_rate,
            noise_multiplier=spec.z,
            clip_thresholds=(spec.clip,),
            noise_stds=(spec.z * spec.clip,),
            batch_size=batch_size,
            mechanism="lmo",
            lmo_params=spec.law.to_dict(),
        )

    def segment(self, noise: float, sample_rate: float, steps: int) -> Segment:
        return (self.law.with_noise_level(noise), sample_rate, steps)
