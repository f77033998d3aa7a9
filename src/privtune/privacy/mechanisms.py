"""The DP step on per-sample gradients: per-group clipping, then Gaussian noise, in phases.

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

LMOMechanism (at the end) is the LMO-DP step: L1 clipping over all parameters, LMO noise.

Written here rather than with opacus' DPOptimizer because opacus clips with one threshold (or
per parameter) and one noise scale; we need per-adapter thresholds with per-group noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from privtune.privacy.lmo_mechanism import LMOParams, lmo_noise

Group = list[torch.nn.Parameter]
Scaling = Literal["clip", "normalize", "psac"]
SCALINGS: tuple[str, ...] = get_args(Scaling)
# Sensitivity of the centred count sum_i (b_i - 1/2) under adding or removing one record.
COUNT_SENSITIVITY = 0.5


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


@dataclass
class ClipStats:
    """Per-sample, per-group gradient norms before clipping, for logs (not DP: a controller
    must not set thresholds from them), and the DP release of the unclipped fraction."""

    norms: torch.Tensor  # (B, K) on CPU
    clipped_fraction: float
    # (noisy count of unclipped samples) / (expected batch size); None when not released
    unclipped_fraction_dp: float | None = None
    # (K, L) DP fractions of samples whose group-k norm is <= levels[l] * C_k; None: not released
    norm_histogram_dp: np.ndarray | None = None


class GaussianMechanism:
    """Phased DP step over per-sample gradients (``p.grad_sample`` from opacus' hooks)."""

    def __init__(self, groups: Sequence[Group], generator: torch.Generator) -> None:
        if not groups or any(not g for g in groups):
            raise ValueError("every clipping group needs at least one parameter")
        self.groups = [list(g) for g in groups]
        self.generator = generator

    def per_sample_norms(self) -> torch.Tensor:
        columns = []
        for group in self.groups:
            squares = [p.grad_sample.flatten(1).pow(2).sum(1) for p in group]
            columns.append(torch.stack(squares, dim=1).sum(1).sqrt())
        return torch.stack(columns, dim=1)

    def clip_and_accumulate(
        self, clips: Sequence[float], scaling: str = "clip", stability: float = 0.0
    ) -> ClipStats:
        """Sum per-sample gradients after scaling each group of each sample to norm <= C_k."""
        norms = self.per_sample_norms()
        thresholds = torch.tensor(clips, dtype=norms.dtype, device=norms.device)
        factors = per_sample_factors(norms, thresholds, scaling, stability)  # (B, K)
        for k, group in enumerate(self.groups):
            for p in group:
                p.grad = torch.einsum("i,i...->...", factors[:, k], p.grad_sample).to(p.dtype)
                p.grad_sample = None
        clipped = (norms > thresholds).float().mean().item() if norms.numel() else 0.0
        return ClipStats(norms.detach().cpu(), clipped)

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

    def add_noise(self, stds: Sequence[float]) -> None:
        for std, group in zip(stds, self.groups, strict=True):
            # One draw per group on the CPU generator (CPU and CUDA runs add identical noise),
            # moved to the device in one copy.
            sizes = [p.numel() for p in group]
            flat = torch.normal(0.0, std, size=(sum(sizes),), generator=self.generator)
            flat = flat.to(group[0].device, non_blocking=True)
            for p, noise in zip(group, flat.split(sizes), strict=True):
                noise = noise.view_as(p).to(p.dtype)
                p.grad = noise if p.grad is None else p.grad + noise

    def scale(self, expected_batch_size: float) -> None:
        for group in self.groups:
            for p in group:
                p.grad = p.grad / expected_batch_size

    def empty_batch(self) -> ClipStats:
        """A Poisson batch can be empty: the step is then noise alone (still accounted)."""
        for group in self.groups:
            for p in group:
                p.grad = torch.zeros_like(p)
                p.grad_sample = None
        return ClipStats(torch.zeros(0, len(self.groups)), 0.0)

    def step(
        self,
        clips: Sequence[float],
        stds: Sequence[float],
        expected_batch_size: float,
        *,
        empty: bool = False,
        scaling: str = "clip",
        stability: float = 0.0,
        count_std: float | None = None,
        count_levels: Sequence[float] = (),
    ) -> ClipStats:
        """One DP step; with count_std, also release the noisy unclipped fraction, or with
        ``count_levels`` the per-group norm histogram (the step's privacy cost is then
        effective_noise_multiplier(clips, stds, count_std, count_dims(...)))."""
        stats = self.empty_batch() if empty else self.clip_and_accumulate(clips, scaling, stability)
        if count_std is not None and count_levels:
            stats.norm_histogram_dp = self.release_norm_histogram(
                stats.norms, clips, count_levels, count_std, expected_batch_size
            )
        elif count_std is not None:
            stats.unclipped_fraction_dp = self.release_unclipped_count(
                stats.norms, clips, count_std, expected_batch_size
            )
        self.add_noise(stds)
        self.scale(expected_batch_size)
        return stats


class _L1Clipping(GaussianMechanism):
    """The Gaussian mechanism's clipping, summing and scaling phases with per-sample L1 norms
    (its add_noise is never called: LMOMechanism adds its own noise)."""

    def per_sample_norms(self) -> torch.Tensor:
        columns = []
        for group in self.groups:
            sums = [p.grad_sample.flatten(1).abs().sum(1) for p in group]
            columns.append(torch.stack(sums, dim=1).sum(1))
        return torch.stack(columns, dim=1)


class LMOMechanism:
    """LMO-DP step (arXiv 2405.18776, made sound): clip each sample's gradient over ALL
    trainable parameters to L1 norm <= C, sum, add LMO noise C * Laplace(0, 1) / eps per
    coordinate (eps = a1 Gamma + a3 Exp + a4 U, privacy.lmo_mechanism), divide by the expected
    batch size.

    L1, not L2: one record moves the clipped sum by at most C in L1, which is what the
    per-coordinate Laplace-mixture bound of lmo_accounting needs (with L2 clipping the L1 shift
    can reach sqrt(d) C). Noise is drawn on the CPU generator, as the Gaussian path does.
    """

    def __init__(self, groups: Sequence[Group], generator: torch.Generator) -> None:
        flat = [p for group in groups for p in group]
        self._clipping = _L1Clipping([flat], generator)
        self.params = flat
        self.generator = generator

    def add_noise(self, law: LMOParams, clip: float) -> None:
        sizes = [p.numel() for p in self.params]
        flat = lmo_noise(law, (sum(sizes),), clip, self.generator)
        flat = flat.to(self.params[0].device, non_blocking=True)
        for p, noise in zip(self.params, flat.split(sizes), strict=True):
            noise = noise.view_as(p).to(p.dtype)
            p.grad = noise if p.grad is None else p.grad + noise

    def step(
        self, clip: float, law: LMOParams, expected_batch_size: float, *, empty: bool = False
    ) -> ClipStats:
        """One DP step; its privacy cost is law's (lmo_accounting), sensitivity C in L1."""
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"the L1 clipping threshold must be > 0, got {clip!r}")
        clipping = self._clipping
        stats = clipping.empty_batch() if empty else clipping.clip_and_accumulate([clip])
        self.add_noise(law, clip)
        clipping.scale(expected_batch_size)
        return stats
