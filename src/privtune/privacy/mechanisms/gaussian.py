"""Gaussian noise on per-group clipped per-sample gradients, optionally with DP counts.

Groups are sets of parameters clipped jointly (one group for flat DP-SGD, one per LoRA adapter
for per-adapter clipping). With group k clipped to C_k and given noise of std s_k, a step is a
subsampled Gaussian mechanism with effective noise multiplier z = 1 / sqrt(sum_k (C_k / s_k)^2).

Per-sample scaling rules (all bound a sample's group-k contribution by C_k, so the sensitivity,
and therefore z, is the same for all of them):
- "clip":      g * min(1, C / ||g||)                  (Abadi et al. 2016)
- "normalize": g * C / (||g|| + gamma)                 (AUTO-S, Bu et al. 2023, arXiv 2206.07136)
- "psac":      g * C / (||g|| + r / (||g|| + r))       (DP-PSAC, Xia et al. 2023, arXiv 2212.00328)

Optionally the step also releases a noisy count of unclipped samples (Andrew et al. 2021, arXiv
1905.03871): sum_i (b_i - 1/2) + N(0, sigma_b^2), with b_i = 1 when every group norm of sample i
is within its threshold. Under add/remove its sensitivity is 1/2, so the count and the gradient
together are one Gaussian mechanism with z = 1 / sqrt(sum_k (C_k / s_k)^2 + (1 / (2 sigma_b))^2).
Or it releases D such counts at once, a histogram of each group's norms (samples with
||g_k|| <= l * C_k for a few levels l): each record moves each count by 1/2, so the vector's
sensitivity is sqrt(D) / 2 and z = 1 / sqrt(sum_k (C_k / s_k)^2 + D (1 / (2 sigma_b))^2).

Written here rather than with opacus' DPOptimizer because opacus clips with one threshold (or
per parameter) and one noise scale; we need per-adapter thresholds with per-group noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from privtune.privacy.action import SCALINGS, Action
from privtune.privacy.ledger import LedgerEntry
from privtune.privacy.mechanisms.base import PerSampleClipping, StepSpec, StepStats

# Sensitivity of the centred count sum_i (b_i - 1/2) under adding or removing one record.
COUNT_SENSITIVITY = 0.5
# Relative excess of the noise stds over the admitted multiplier (float rounding only).
ROUNDING_MARGIN = 1e-9


def effective_noise_multiplier(
    clips: Sequence[float],
    stds: Sequence[float],
    count_std: float | None = None,
    count_dims: int = 1,
) -> float:
    """z of a step whose group k is clipped to clips[k] and noised with std stds[k], releasing
    also (when count_std is given) ``count_dims`` noisy counts with noise std count_std."""
    if len(clips) != len(stds) or not clips:
        raise ValueError("need one noise std per clipping threshold")
    if any(s <= 0 for s in stds) or (count_std is not None and count_std <= 0):
        return 0.0
    ratio = sum((c / s) ** 2 for c, s in zip(clips, stds, strict=True))
    if count_std is not None:
        ratio += count_dims * (COUNT_SENSITIVITY / count_std) ** 2
    return 1.0 / math.sqrt(ratio)


def gradient_noise_multiplier(z: float, count_std: float, count_dims: int = 1) -> float:
    """Noise multiplier left for the gradient when ``count_dims`` counts with std count_std are
    released too and the whole step must be a Gaussian mechanism of multiplier z (Andrew et al.
    2021, Thm 1: z_grad = (z^-2 - D (2 sigma_b)^-2)^(-1/2)). Needs z < 2 sigma_b / sqrt(D)."""
    rest = z**-2 - count_dims * (COUNT_SENSITIVITY / count_std) ** 2
    if not rest > 0:
        bound = z * math.sqrt(count_dims) / 2
        raise ValueError(
            f"count noise std {count_std:g} is too small for total noise multiplier {z:g}: "
            f"it must exceed z * sqrt({count_dims}) / 2 = {bound:g}"
        )
    return rest**-0.5


def count_dims(n_groups: int, count_levels: Sequence[float]) -> int:
    """Counts a step releases: one unclipped count, or one per group and level."""
    return n_groups * len(count_levels) if count_levels else 1


def quarter_share_count_std(z: float, dims: int) -> float:
    """sigma_b at which ``dims`` counts take a quarter of a step's privacy at multiplier z:
    their share of 1/z^2 is D z^2 / (2 sigma_b)^2, a quarter at sigma_b = z sqrt(D)."""
    return z * math.sqrt(dims)


def uniform_noise_stds(clips: Sequence[float], noise_multiplier: float) -> tuple[float, ...]:
    """Same noise std on every group, s = z * ||C||_2, so the step's effective z is exactly z."""
    scale = noise_multiplier * math.sqrt(sum(c * c for c in clips))
    return tuple(scale for _ in clips)


def per_sample_factors(
    norms: torch.Tensor, thresholds: torch.Tensor, scaling: str = "clip", stability: float = 0.0
) -> torch.Tensor:
    """(B, K) factors scaling each sample's group k to norm < C_k, by the named rule."""
    if scaling == "clip":
        return (thresholds / (norms + 1e-6)).clamp(max=1.0)
    if not stability > 0:
        raise ValueError(f"scaling '{scaling}' needs a stability constant > 0")
    if scaling == "normalize":
        return thresholds / (norms + stability)
    if scaling == "psac":
        return thresholds / (norms + stability / (norms + stability))
    raise ValueError(f"unknown per-sample scaling '{scaling}': use one of {', '.join(SCALINGS)}")


def admit_gaussian(
    action: Action, noise: float, n_groups: int
) -> tuple[Action, tuple[float, ...], float | None]:
    """Rescale the action's noise to the admitted multiplier z; return the action, per-group
    gradient stds and the counts' noise std, together making one step of multiplier >= z."""
    count_std = action.count_noise
    grad_noise = noise
    if count_std is not None:
        dims = count_dims(n_groups, action.count_levels)
        # The counts must leave room for gradient noise, z sqrt(D) < 2 sigma_b; should the
        # admitted z reach that, sigma_b is raised to z sqrt(D) (counts take a quarter of it).
        if not 2 * count_std > quarter_share_count_std(noise, dims) * (1 + 1e-6):
            count_std = quarter_share_count_std(noise, dims)
        grad_noise = gradient_noise_multiplier(noise, count_std, dims)
    if action.noise_stds is None:
        # A hair more noise than z needs, so recombining the stds into z never rounds below it.
        stds = uniform_noise_stds(action.clip_thresholds, grad_noise * (1 + ROUNDING_MARGIN))
        return replace(action, noise_multiplier=noise, count_noise=count_std), stds, count_std
    if not all(s > 0 for s in action.noise_stds):
        # a group without noise leaks its gradient whatever the others get: no z fits
        raise ValueError(f"every per-group noise std must be > 0, got {action.noise_stds}")
    factor = grad_noise / effective_noise_multiplier(action.clip_thresholds, action.noise_stds)
    stds = tuple(s * max(1.0, factor) for s in action.noise_stds)
    dims = count_dims(n_groups, action.count_levels)
    total = effective_noise_multiplier(action.clip_thresholds, stds, count_std, dims)
    admitted = replace(action, noise_multiplier=total, noise_stds=stds, count_noise=count_std)
    return admitted, stds, count_std


@dataclass(frozen=True)
class GaussianSpec(StepSpec):
    stds: tuple[float, ...]
    count_std: float | None
    count_dims: int


class Gaussian(PerSampleClipping):
    """Per-group clipping (or normalising), per-group Gaussian noise and the DP counts."""

    name = "gaussian"

    def admit(self, action: Action, noise: float) -> GaussianSpec:
        if len(action.clip_thresholds) != len(self.groups):
            raise ValueError(
                f"the action has {len(action.clip_thresholds)} clipping thresholds for "
                f"{len(self.groups)} groups ({', '.join(self.group_names)})"
            )
        admitted, stds, count_std = admit_gaussian(action, noise, len(self.groups))
        dims = count_dims(len(self.groups), admitted.count_levels)
        z = effective_noise_multiplier(admitted.clip_thresholds, stds, count_std, dims)
        if z >= admitted.noise_multiplier:
            # stds carry a rounding margin above the admitted z (see admit_gaussian): record
            # the admitted z, so an interval's steps stay one ledger segment.
            z = admitted.noise_multiplier
        return GaussianSpec(admitted, z, stds, count_std, dims)

    def summary(self, calibrated_noise: float) -> dict[str, float]:
        return {"noise_multiplier": calibrated_noise}  # z means nothing for other noise laws

    def factors(self, norms: torch.Tensor, spec: StepSpec) -> torch.Tensor:
        a = spec.action
        thresholds = torch.tensor(a.clip_thresholds, dtype=norms.dtype, device=norms.device)
        return per_sample_factors(norms, thresholds, a.scaling, a.stability)

    def release(self, spec: GaussianSpec, expected_batch_size: float, batch_size: int) -> StepStats:
        a = spec.action
        total, norms, clipped = self.take_sum(a.clip_thresholds)
        stats = StepStats(norms, clipped)
        if spec.count_std is not None and a.count_levels:
            stats.norm_histogram_dp = self.release_norm_histogram(
                norms, a.clip_thresholds, a.count_levels, spec.count_std, expected_batch_size
            )
        elif spec.count_std is not None:
            stats.unclipped_fraction_dp = self.release_unclipped_count(
                norms, a.clip_thresholds, spec.count_std, expected_batch_size
            )
        self.add_noise(total, spec.stds)
        self.scale(total, expected_batch_size)
        stats.metrics = {"noise_multiplier": spec.guard_noise, "clipped_fraction": clipped}
        if stats.unclipped_fraction_dp is not None:
            stats.metrics["unclipped_fraction_dp"] = stats.unclipped_fraction_dp
        clips = zip(self.group_names, a.clip_thresholds, strict=True)
        stats.metrics |= {f"clip/{name}": c for name, c in clips}
        return stats

    def ledger_entry(
        self, spec: GaussianSpec, step: int, sample_rate: float, batch_size: int
    ) -> LedgerEntry:
        return LedgerEntry(
            step=step,
            sample_rate=sample_rate,
            noise_multiplier=spec.guard_noise,
            clip_thresholds=tuple(spec.action.clip_thresholds),
            noise_stds=tuple(spec.stds),
            batch_size=batch_size,
            count_noise_std=spec.count_std,
            count_dims=spec.count_dims,
        )

    def release_unclipped_count(
        self, norms: torch.Tensor, clips: Sequence[float], count_std: float, expected: float
    ) -> float:
        """Noisy fraction of samples whose every group is within its threshold: the count
        centred by 1/2 per sample (sensitivity 1/2), plus noise from the mechanism's generator,
        rescaled by the public expected batch size."""
        thresholds = torch.tensor(clips, dtype=norms.dtype)
        unclipped = (norms <= thresholds).all(dim=1).float()  # (B,); empty batch: (0,)
        centred = float((unclipped - 0.5).sum())
        noise = float(torch.normal(0.0, count_std, size=(1,), generator=self.generator))
        return (centred + noise) / expected + 0.5

    def release_norm_histogram(
        self,
        norms: torch.Tensor,
        clips: Sequence[float],
        levels: Sequence[float],
        count_std: float,
        expected: float,
    ) -> np.ndarray:
        """(K, L) noisy fractions of samples with ||g_k|| <= levels[l] * C_k: centred counts
        (sensitivity 1/2 each) plus noise from the mechanism's generator, over the public
        expected batch size. What a controller may read about the norms."""
        thresholds = torch.tensor(clips, dtype=norms.dtype)[:, None] * torch.tensor(
            levels, dtype=norms.dtype
        )  # (K, L)
        below = (norms[:, :, None] <= thresholds).to(torch.float64)  # (B, K, L)
        centred = (below - 0.5).sum(0)  # (K, L); empty batch: zeros
        noise = torch.normal(0.0, count_std, size=tuple(centred.shape), generator=self.generator)
        return ((centred + noise.double()) / expected + 0.5).numpy()

    def add_noise(self, total: torch.Tensor, stds: Sequence[float]) -> None:
        """Add group k's noise of std stds[k] to its columns of the summed gradient ``total``
        (T,): one draw per group on the CPU generator (CPU and CUDA runs add identical noise),
        moved to the device in one copy."""
        draws = [
            torch.normal(0.0, std, size=(width,), generator=self.generator)
            for std, width in zip(stds, self._widths, strict=True)
        ]
        noise = draws[0] if len(draws) == 1 else torch.cat(draws)
        total.add_(noise.to(total.device, non_blocking=True))
