"""The DP step on per-sample gradients: per-group clipping, then Gaussian noise, in phases.

Groups are sets of parameters clipped jointly (one group for flat DP-SGD, one per LoRA adapter
for per-adapter clipping). With group k clipped to C_k and given noise of std s_k, a step is a
subsampled Gaussian mechanism with effective noise multiplier z = 1 / sqrt(sum_k (C_k / s_k)^2).

Written here rather than with opacus' DPOptimizer because opacus clips with one threshold (or
per parameter) and one noise scale; we need per-adapter thresholds with per-group noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Group = list[torch.nn.Parameter]


def effective_noise_multiplier(clips: Sequence[float], stds: Sequence[float]) -> float:
    """z of a step whose group k is clipped to clips[k] and noised with std stds[k]."""
    if len(clips) != len(stds) or not clips:
        raise ValueError("need one noise std per clipping threshold")
    if any(s <= 0 for s in stds):
        return 0.0
    return 1.0 / math.sqrt(sum((c / s) ** 2 for c, s in zip(clips, stds, strict=True)))


def uniform_noise_stds(clips: Sequence[float], noise_multiplier: float) -> tuple[float, ...]:
    """Same noise std on every group, s = z * ||C||_2, so the step's effective z is exactly z."""
    scale = noise_multiplier * math.sqrt(sum(c * c for c in clips))
    return tuple(scale for _ in clips)


@dataclass
class ClipStats:
    """Per-sample, per-group gradient norms before clipping, for controllers and logs."""

    norms: torch.Tensor  # (B, K) on CPU
    clipped_fraction: float


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

    def clip_and_accumulate(self, clips: Sequence[float]) -> ClipStats:
        """Sum per-sample gradients after scaling each group of each sample to norm <= C_k."""
        norms = self.per_sample_norms()
        thresholds = torch.tensor(clips, dtype=norms.dtype, device=norms.device)
        factors = (thresholds / (norms + 1e-6)).clamp(max=1.0)  # (B, K)
        for k, group in enumerate(self.groups):
            for p in group:
                p.grad = torch.einsum("i,i...->...", factors[:, k], p.grad_sample).to(p.dtype)
                p.grad_sample = None
        clipped = (norms > thresholds).float().mean().item() if norms.numel() else 0.0
        return ClipStats(norms.detach().cpu(), clipped)

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
    ) -> ClipStats:
        stats = self.empty_batch() if empty else self.clip_and_accumulate(clips)
        self.add_noise(stds)
        self.scale(expected_batch_size)
        return stats
