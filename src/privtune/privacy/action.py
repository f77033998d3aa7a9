"""What a controller proposes and the engine admits: the privacy parameters of an interval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Scaling = Literal["clip", "normalize", "psac"]
SCALINGS: tuple[str, ...] = get_args(Scaling)


@dataclass(frozen=True)
class Action:
    """Clipping and noise for the steps of one interval.

    ``noise_multiplier`` is the knob the budget guard turns: the step's effective z for
    Gaussian noise, the noise level of the law for LMO-DP (privacy.mechanisms).
    """

    clip_thresholds: tuple[float, ...]
    noise_multiplier: float
    # Per-group noise std; None = the same std on every group (effective z = noise_multiplier).
    noise_stds: tuple[float, ...] | None = None
    # How each per-sample gradient is bounded (see privacy.mechanisms.gaussian), and its
    # constant (gamma of AUTO-S, r of DP-PSAC).
    scaling: Scaling = "clip"
    stability: float = 0.0
    # Std of the noisy unclipped count to release every step (Andrew et al. 2021); None = none.
    # noise_multiplier is the step's total z: the gradient gets the part the count leaves.
    count_noise: float | None = None
    # With count_noise: release instead, per group k, the noisy fraction of samples whose norm
    # is <= level * C_k for each level (a DP histogram of the norms; mechanisms.gaussian).
    count_levels: tuple[float, ...] = ()
