"""Noise mechanisms of the DP step: one class per noise law, phases shared (base.py)."""

from privtune.privacy.mechanisms.base import Group, Mechanism, Segment, StepSpec, StepStats
from privtune.privacy.mechanisms.gaussian import (
    COUNT_SENSITIVITY,
    Gaussian,
    admit_gaussian,
    count_dims,
    effective_noise_multiplier,
    gradient_noise_multiplier,
    per_sample_factors,
    quarter_share_count_std,
    uniform_noise_stds,
)
from privtune.privacy.mechanisms.lmo import LMO
from privtune.privacy.mechanisms.none import NoNoise

__all__ = [
    "COUNT_SENSITIVITY",
    "LMO",
    "Gaussian",
    "Group",
    "Mechanism",
    "NoNoise",
    "Segment",
    "StepSpec",
    "StepStats",
    "admit_gaussian",
    "count_dims",
    "effective_noise_multiplier",
    "gradient_noise_multiplier",
    "per_sample_factors",
    "quarter_share_count_std",
    "uniform_noise_stds",
]
