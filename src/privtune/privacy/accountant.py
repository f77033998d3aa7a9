"""Compose a ledger into (epsilon, delta): PRV (tight) with RDP beside it, both from opacus.

Schedules are lists of (noise_multiplier, sample_rate, steps) segments, so varying noise
(RLDP, decaying schedules) composes exactly, segment by segment.

LMO-DP steps (privacy.lmo_accounting) have only a sound RDP bound, so a ledger holding any
composes entirely in RDP: the subsampled-Gaussian RDP of its Gaussian segments (opacus) plus
the subsampled LMO RDP of the others, at the same integer orders 2..128, then converted once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from privtune.privacy.ledger import LMOSegment, PrivacyLedger
from privtune.privacy.lmo_accounting import MAX_ORDER, orders_up_to, segment_rdp

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


def composed_epsilon(
    gaussian: Sequence[Segment],
    lmo: Sequence[LMOSegment],
    delta: float,
    accountant: str = "prv",
) -> float:
    """Epsilon of Gaussian and LMO segments together; without LMO, exactly `epsilon`."""
    lmo = [(p, q, n) for p, q, n in lmo if n > 0]
    if not lmo:
        return epsilon(gaussian, delta, accountant)
    orders = orders_up_to(MAX_ORDER)
    total = np.zeros(len(orders))
    for params, q, n in lmo:
        total += segment_rdp(params, q, n)
    for z, q, n in gaussian:
        if n <= 0:
            continue
        if z <= 0:
            return math.inf
        total += compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders)
    if not np.isfinite(total).any():
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns when the best order is an end point
        eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return max(float(eps), 0.0)


def ledger_epsilon(ledger: PrivacyLedger, delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by a ledger of any mix of Gaussian and LMO steps (an upper bound)."""
    gaussian, lmo = ledger.split_segments()
    return composed_epsilon(gaussian, lmo, delta, accountant)
