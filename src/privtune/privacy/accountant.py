"""Compose a ledger into (epsilon, delta): PRV (tight) with RDP beside it, both from opacus.

Schedules are lists of (noise_multiplier, sample_rate, steps) segments, so varying noise
(RLDP, decaying schedules) composes exactly, segment by segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

Segment = tuple[float, float, int]

# Below this noise PRV's discretisation runs out of memory or fails (measured: z=0.01 and
# z=0.001 at q=0.1); such steps spend hundreds of epsilon, so RDP's looser bound costs nothing.
PRV_MIN_NOISE = 0.1


def epsilon(segments: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by a schedule of subsampled-Gaussian segments (an upper bound)."""
    segments = [(z, q, n) for z, q, n in segments if n > 0]
    if not segments:
        return 0.0
    if any(z <= 0 for z, _, _ in segments):
        return math.inf
    if accountant == "prv" and min(z for z, _, _ in segments) >= PRV_MIN_NOISE:
        prv = PRVAccountant()
        prv.history = list(segments)
        try:
            return float(prv.get_epsilon(delta))
        except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
            # PRV's discretisation can fail on extreme schedules; RDP is looser but always sound.
            return epsilon(segments, delta, "rdp")
    rdp = RDPAccountant()
    rdp.history = list(segments)
    return float(rdp.get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier whose `steps` steps spend at most the target epsilon."""
    sigma = get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        epsilon_tolerance=0.005,
    )
    # opacus stops its bisection within tolerance on the safe side; re-check to be certain.
    while epsilon([(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        sigma *= 1.001
    return float(sigma)
