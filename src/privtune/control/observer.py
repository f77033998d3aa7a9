"""What a controller sees: the learning dynamics of the last interval as an Observation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from privtune.control.base import Action, Observation
from privtune.privacy.mechanisms import StepStats


class Observer:
    """Accumulates each released step's statistics into the next decision's observation."""

    def __init__(self, n_groups: int, total_steps: int) -> None:
        self.n_groups = n_groups
        self.total_steps = total_steps
        self.losses: list[float] = []
        self.norms: list[torch.Tensor] = []
        self.clipped: list[float] = []
        self.released: list[float] = []  # DP releases of the unclipped fraction
        self.histograms: list[np.ndarray] = []  # DP releases of the norm histogram
        self.previous_loss = math.nan

    def add(self, loss: float, stats: StepStats) -> None:
        self.losses.append(loss)
        if stats.norms is not None and stats.norms.numel():
            self.norms.append(stats.norms)
        self.clipped.append(stats.clipped_fraction)
        if stats.unclipped_fraction_dp is not None:
            self.released.append(stats.unclipped_fraction_dp)
        if stats.norm_histogram_dp is not None:
            self.histograms.append(stats.norm_histogram_dp)

    def observe(self, step: int, action: Action, **kwargs: Any) -> Observation:
        loss = float(np.mean(self.losses)) if self.losses else math.nan
        norms = torch.cat(self.norms) if self.norms else torch.zeros(1, self.n_groups)
        quantiles = torch.quantile(norms, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]), dim=0)
        obs = Observation(
            step=step,
            total_steps=self.total_steps,
            train_loss=loss,
            loss_trend=loss - self.previous_loss if math.isfinite(self.previous_loss) else 0.0,
            clipped_fraction=float(np.mean(self.clipped)) if self.clipped else 0.0,
            norm_quantiles=tuple(tuple(quantiles[:, k].tolist()) for k in range(self.n_groups)),
            norm_mean=tuple(norms.mean(0).tolist()),
            norm_std=tuple(norms.std(0, correction=0).tolist()),
            action=action,
            unclipped_fraction_dp=float(np.mean(self.released)) if self.released else None,
            norm_histogram_dp=(
                tuple(map(tuple, np.mean(self.histograms, axis=0).tolist()))
                if self.histograms
                else None
            ),
            **kwargs,
        )
        self.previous_loss = loss
        self.losses, self.norms, self.clipped, self.released = [], [], [], []
        self.histograms = []
        return obs
