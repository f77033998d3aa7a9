"""Compose a ledger into (epsilon, delta): PLD (dp-accounting) or PRV (opacus), both tight,
with RDP (opacus) beside them.

Schedules are lists of (noise_multiplier, sample_rate, steps) segments, so varying noise
(RLDP, decaying schedules) composes exactly, segment by segment.

PLD is the default because it composes incrementally: the privacy-loss distribution of every
segment and of every prefix of a schedule is cached, so the budget guard's projections (the
ledger so far, then planned steps) cost one or two convolutions instead of a new numerical
composition of the whole history, which is what makes a controller acting every few steps
affordable. dp-accounting's pessimistic discretisation keeps it an upper bound, as PRV's
``eps_upper`` is; the two agree within a fraction of a percent (tests/test_accountant.py).

LMO-DP steps (privacy.lmo_accounting) have only a sound RDP bound, so a ledger holding any
composes entirely in RDP: the subsampled-Gaussian RDP of its Gaussian segments (opacus) plus
the subsampled LMO RDP of the others, at the same integer orders 2..128, then converted once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from privtune.privacy.ledger import LMOSegment, PrivacyLedger
from privtune.privacy.lmo_accounting import MAX_ORDER, orders_up_to, rdp_epsilon, segment_rdp
from privtune.privacy.lmo_mechanism import LMOParams
from privtune.privacy.pld_gaussian import gaussian_step_pld

Segment = tuple[float, float, int]

# Below this noise PRV's discretisation runs out of memory or fails (measured: z=0.01 and
# z=0.001 at q=0.1); such steps spend hundreds of epsilon, so RDP's looser bound costs nothing.
PRV_MIN_NOISE = 0.1
ACCOUNTANTS = ("pld", "prv", "rdp")
# Pessimistic (upper-bound) discretisation of the privacy loss; 1e-4 moves epsilon by < 1e-4
# on the pipeline's schedules at ten times the cost.
PLD_INTERVAL = 1e-3


@functools.lru_cache(maxsize=128)
def _pld_step(z: float, q: float) -> pld.PrivacyLossDistribution:
    """One Poisson-subsampled Gaussian step, add/remove-one neighbours (dp-accounting's PLD,
    built vectorised: pld_gaussian)."""
    return gaussian_step_pld(z, q, PLD_INTERVAL)


@functools.lru_cache(maxsize=256)
def _pld_segment(z: float, q: float, n: int) -> pld.PrivacyLossDistribution:
    step = _pld_step(z, q)
    return step if n == 1 else step.self_compose(n)


@functools.lru_cache(maxsize=256)
def _pld_schedule(segments: tuple[Segment, ...]) -> pld.PrivacyLossDistribution:
    """A schedule's PLD, built from its cached prefix: appending a segment is one convolution."""
    last = _pld_segment(*segments[-1])
    return last if len(segments) == 1 else _pld_schedule(segments[:-1]).compose(last)


def _pld_epsilon(segments: Sequence[Segment], delta: float) -> float:
    return float(_pld_schedule(tuple(segments)).get_epsilon_for_delta(delta))


@functools.lru_cache(maxsize=1024)
def _rdp_step(z: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    """One subsampled-Gaussian step's RDP at ``orders`` (opacus' compute_rdp, whose ``steps``
    only multiplies): cached, as opacus' RDPAccountant recomputes every segment of the history
    at each call (a pure-Python series, about 0.1 s a segment), which made each guard projection
    of a long varying schedule cost the whole history again."""
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(orders))
    rdp.flags.writeable = False  # shared by every caller of the cache
    return rdp


def _rdp_epsilon(segments: Sequence[Segment], delta: float) -> float:
    """What opacus' RDPAccountant(history=segments).get_epsilon(delta) returns, from cached
    per-step RDP: the same products, summed in the same order (tests/test_accountant.py)."""
    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    rdp = sum(_rdp_step(float(z), float(q), orders) * n for z, q, n in segments)
    with warnings.catch_warnings():
        # at a large ε the best order is the smallest: opacus warns that the bound is loose
        # (it is still an upper bound), on every call, a screen of it per run
        warnings.filterwarnings("ignore", "Optimal order is the smallest alpha")
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def _merge_adjacent(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments of the same (z, q) are one: a constant schedule stays one segment
    however the guard cuts it (ledger so far, next interval, the rest), so its composition is
    computed once and cached."""
    merged: list[Segment] = []
    for z, q, n in segments:
        if merged and merged[-1][:2] == (z, q):
            merged[-1] = (z, q, merged[-1][2] + n)
        else:
            merged.append((z, q, n))
    return merged


def epsilon(segments: Sequence[Segment], delta: float, accountant: str = "pld") -> float:
    """Epsilon spent by a schedule of subsampled-Gaussian segments (an upper bound)."""
    if accountant not in ACCOUNTANTS:  # first: a misspelt name fails even where none is needed
        raise ValueError(f"unknown accountant '{accountant}': use one of {', '.join(ACCOUNTANTS)}")
    segments = _merge_adjacent([(z, q, n) for z, q, n in segments if n > 0])
    if not segments:
        return 0.0
    if any(z <= 0 for z, _, _ in segments):
        return math.inf
    tight = min(z for z, _, _ in segments) >= PRV_MIN_NOISE
    if accountant == "pld" and tight:
        return _pld_epsilon([(float(z), float(q), int(n)) for z, q, n in segments], delta)
    if accountant == "prv" and tight:
        prv = PRVAccountant()
        prv.history = list(segments)
        try:
            return float(prv.get_epsilon(delta))
        except (ValueError, RuntimeError, OverflowError, FloatingPointError, MemoryError):
            # PRV's discretisation can fail on extreme schedules; RDP is looser but always sound.
            return epsilon(segments, delta, "rdp")
    return _rdp_epsilon(segments, delta)


# The largest noise multiplier a calibration tries (opacus' own limit): a target that needs more
# cannot be certified, and a model trained at it would learn nothing.
MAX_NOISE = 1e6


class InfeasibleBudget(ValueError):
    """No noise multiplier up to MAX_NOISE lets the accountant certify the target epsilon."""

    def __init__(self, target: float, delta: float, q: float, steps: int, accountant: str):
        self.target, self.delta, self.q, self.steps, self.accountant = (
            target, delta, q, steps, accountant,
        )  # fmt: skip
        super().__init__(
            f"the {accountant} accountant cannot certify epsilon {target:g} for {steps} steps "
            f"at q = {q:.3g} and delta = {delta:.3g} at any noise multiplier up to {MAX_NOISE:g}"
        )


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld"
) -> float:
    """Smallest noise multiplier whose `steps` steps spend at most the target epsilon
    (``InfeasibleBudget`` when none up to MAX_NOISE does).

    Results are cached on disk (every private method of a pipeline run asks the same question,
    seconds each); a cached value is used only after checking that it spends at most the
    target, so a stale or edited cache can cost utility but never privacy.
    """
    key = "|".join(
        map(repr, (_CACHE_VERSION, accountant, target_epsilon, delta, sample_rate, steps))
    )
    cache = _read_cache()
    cached = cache.get(key)
    safe = isinstance(cached, float) and cached > 0
    if safe and epsilon([(cached, sample_rate, steps)], delta, accountant) <= target_epsilon:
        return cached
    sigma = _calibrate(target_epsilon, delta, sample_rate, steps, accountant)
    _write_cache({**cache, key: sigma})
    return sigma


# Bumped whenever calibration or the accountants' versions change what a key means.
_CACHE_VERSION = (1, metadata.version("opacus"), metadata.version("dp-accounting"))


def _cache_file() -> Path:
    base = os.environ.get("PRIVTUNE_CACHE_DIR") or Path.home() / ".cache" / "privtune"
    return Path(base) / "calibration.json"


def _read_cache() -> dict[str, float]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(data: dict[str, float]) -> None:
    try:
        from privtune.io import write_json

        write_json(_cache_file(), data)
    except OSError:
        pass  # a read-only home: calibrate again next time


def _calibrate(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    if accountant == "pld":
        return _calibrate_by_bisection(target_epsilon, delta, sample_rate, steps, accountant)
    with warnings.catch_warnings():
        # opacus' search starts at z = 10, where RDP's best order is its largest, and warns of
        # a loose bound there (of the smallest, doubling z past a target it cannot reach); the
        # z it returns is re-checked below at every order
        loose = "Optimal order is the (largest|smallest) alpha"
        warnings.filterwarnings("ignore", loose, UserWarning)
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        except ValueError as err:
            if "budget is too low" not in str(err):  # past opacus' own MAX_SIGMA
                raise
            raise InfeasibleBudget(target_epsilon, delta, sample_rate, steps, accountant) from err
    # opacus stops its bisection within tolerance on the safe side; re-check to be certain.
    while epsilon([(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        sigma *= 1.001
    return float(sigma)


def _calibrate_by_bisection(
    target: float, delta: float, q: float, steps: int, accountant: str, rtol: float = 1e-3
) -> float:
    """Geometric bisection on z (epsilon falls as z grows), bracketed by RDP's calibration:
    RDP is looser, so its z spends at most the target here too. Where RDP certifies nothing
    (its conversion has a floor: about 0.07 at 41 steps, delta 1e-4), doubling from z = 10
    brackets it instead."""
    try:
        high = _calibrate(target, delta, q, steps, "rdp")
    except InfeasibleBudget:
        high = 10.0
        while epsilon([(high, q, steps)], delta, accountant) > target:
            high *= 2
            if high > MAX_NOISE:
                raise InfeasibleBudget(target, delta, q, steps, accountant) from None
    low = high / 2
    while epsilon([(low, q, steps)], delta, accountant) <= target:
        high, low = low, low / 2
        if low < 1e-3:
            return high
    while high / low > 1 + rtol:
        mid = math.sqrt(low * high)
        if epsilon([(mid, q, steps)], delta, accountant) <= target:
            high = mid
        else:
            low = mid
    return float(high)


def composed_epsilon(
    gaussian: Sequence[Segment],
    lmo: Sequence[LMOSegment],
    delta: float,
    accountant: str = "pld",
) -> float:
    """Epsilon of Gaussian and LMO segments together; without LMO, exactly `epsilon`."""
    lmo = [(p, q, n) for p, q, n in lmo if n > 0]
    if not lmo:
        return epsilon(gaussian, delta, accountant)
    orders = orders_up_to(MAX_ORDER)
    total = np.zeros(len(orders))
    for params, q, n in lmo:
        total += segment_rdp(params, q, n)
    key = tuple(orders)
    for z, q, n in gaussian:
        if n <= 0:
            continue
        if z <= 0:
            return math.inf
        total += _rdp_step(float(z), float(q), key) * n
    return rdp_epsilon(total, orders, delta)


def compose(segments: Sequence[tuple], delta: float, accountant: str = "pld") -> float:
    """Epsilon of segments of any mechanism, in order: (z, q, n) for Gaussian steps and
    (LMOParams, q, n) for LMO-DP steps (which only RDP composes)."""
    gaussian = [s for s in segments if not isinstance(s[0], LMOParams)]
    lmo = [s for s in segments if isinstance(s[0], LMOParams)]
    return composed_epsilon(gaussian, lmo, delta, accountant)


def ledger_epsilon(ledger: PrivacyLedger, delta: float, accountant: str = "pld") -> float:
    """Epsilon spent by a ledger of any mix of Gaussian and LMO steps (an upper bound)."""
    gaussian, lmo = ledger.split_segments()
    return composed_epsilon(gaussian, lmo, delta, accountant)
