"""Sound RDP accounting for LMO-DP noise on L1-clipped, Poisson-subsampled gradient sums.

Why this is an upper bound (units of the clip C; Delta = shift of one coordinate):

1. One coordinate, fixed inverse scale e: Laplace(0, 1/e) shifted by Delta >= 0 has
   exp((alpha-1) D_alpha) = alpha/(2alpha-1) e^{(alpha-1) e Delta} + (alpha-1)/(2alpha-1)
   e^{-alpha e Delta} (Mironov 2017, Prop. 6), the same in both directions by symmetry.
2. Random scale: both neighbours mix the SAME data-independent law of e, and
   (P, Q) -> int P^alpha Q^(1-alpha) is jointly convex, so the mixture's exp((alpha-1) D)
   is <= E_e[...] of step 1. Hence D_alpha <= f(alpha, Delta) =
   1/(alpha-1) log E_e[alpha/(2alpha-1) e^{(alpha-1) e Delta} + (alpha-1)/(2alpha-1)
   e^{-alpha e Delta}]. With the MGF M of e, at Delta = 1 this is
   f(alpha, 1) = 1/(alpha-1) log[(alpha M(alpha-1) + (alpha-1) M(-alpha)) /
   (2alpha-1)], finite only where M(alpha-1) is (a1 theta (alpha-1) < 1, a3 (alpha-1) < lam).
3. Vector: coordinates draw independent scales and noise, so D_alpha of the product is the
   sum over coordinates, <= sum_i f(alpha, |Delta_i|). f(alpha, .) is (alpha-1)^-1 times the log
   of a positive mixture of exponentials exp(s Delta) (a log-Laplace transform), hence convex
   in Delta, with f(alpha, 0) = 0; a convex function vanishing at 0 is superadditive on
   [0, inf) and non-decreasing there, so sum_i f(alpha, |Delta_i|) <= f(alpha, sum_i |Delta_i|)
   <= f(alpha, 1) whenever ||Delta||_1 <= 1: L1 clipping to C makes the per-coordinate 1-D bound
   cover the whole d-dimensional release. (With L2 clipping ||Delta||_1 can reach sqrt(d) C.)
4. Poisson subsampling with add/remove neighbours: the GENERAL upper bound of Zhu & Wang,
   "Poisson Subsampled Renyi Differential Privacy", ICML 2019 (PMLR 97, zhu19c), Theorem 5,
   at integer alpha, from the base RDP at orders 2..alpha; it needs no property of the base
   mechanism. (Their Theorem 6 is the lower bound, tight only for mechanisms meeting the
   condition of their Theorem 8, as Gaussian and Laplace do; we do not assume it for the
   mixture.) Subsampling never hurts (joint convexity), so the min with the base RDP is also
   a bound.
5. Composition over steps is additive in RDP; (epsilon, delta) by opacus' conversion.

paper_epsilon() reproduces what the authors' code prints; it is NOT a privacy guarantee.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.special import gammaln, logsumexp

from privtune.privacy.lmo_mechanism import LMOParams, log_mgf_arrays

MAX_ORDER = 128


def orders_up_to(max_order: int = MAX_ORDER) -> np.ndarray:
    if max_order < 2:
        raise ValueError("max_order must be >= 2")
    return np.arange(2, max_order + 1)


def rdp_arrays(p: dict[str, np.ndarray], orders: np.ndarray) -> np.ndarray:
    """Per-step RDP f(alpha, 1) for candidate arrays (shape (N,)) at orders (A,): (N, A)."""
    alpha = np.asarray(orders, dtype=float)
    cols = {key: np.atleast_1d(value)[:, None] for key, value in p.items()}
    up = log_mgf_arrays(cols, alpha - 1.0)  # +inf where the MGF diverges
    down = log_mgf_arrays(cols, -alpha)
    with np.errstate(invalid="ignore"):
        inner = np.logaddexp(np.log(alpha) + up, np.log(alpha - 1.0) + down)
        rdp = (inner - np.log(2.0 * alpha - 1.0)) / (alpha - 1.0)
    # Floor at 0: the exact value is >= 0; tiny negative rounding would confuse conversions.
    return np.where(np.isfinite(up), np.maximum(rdp, 0.0), np.inf)


def rdp_at_shift(params: LMOParams, orders: np.ndarray | list[int], shift: float) -> np.ndarray:
    """f(alpha, shift): the 1-D bound for one coordinate moved by `shift` clips (step 2 above)."""
    alpha = np.asarray(orders, dtype=float)
    if shift < 0:
        raise ValueError("shift must be >= 0 (the bound is symmetric)")
    p = params.arrays()
    up = log_mgf_arrays(p, (alpha - 1.0) * shift)
    down = log_mgf_arrays(p, -alpha * shift)
    inner = np.logaddexp(np.log(alpha) + up, np.log(alpha - 1.0) + down)
    return np.where(np.isfinite(up), (inner - np.log(2.0 * alpha - 1.0)) / (alpha - 1.0), np.inf)


def valid_orders(params: LMOParams, max_order: int = MAX_ORDER) -> np.ndarray:
    """Integer orders in 2..max_order at which the MGF in the bound is finite."""
    orders = orders_up_to(max_order)
    finite = np.isfinite(log_mgf_arrays(params.arrays(), orders - 1.0))
    return orders[finite]


def rdp_per_step(params: LMOParams, orders: np.ndarray | list[int]) -> np.ndarray:
    """RDP of one non-subsampled release (L1 sensitivity = clip) at each order; inf if invalid."""
    orders = np.asarray(orders, dtype=float)
    if np.any(orders <= 1):
        raise ValueError("Renyi orders must be > 1")
    return rdp_arrays(params.arrays(), orders)[0]


def subsampled_rdp(base: np.ndarray, sample_rate: float) -> np.ndarray:
    """Poisson-subsampled RDP at orders 2..A+1 from base RDP there: Zhu & Wang, ICML 2019,
    Theorem 5 ("general upper bound", any base mechanism, add/remove neighbours).

    base has shape (..., A) with base[..., j] the RDP at order j + 2 (inf allowed). For integer
    alpha: exp((alpha-1) eps'(alpha)) <= (1-q)^(alpha-1) (alpha q - q + 1)
    + C(alpha,2) q^2 (1-q)^(alpha-2) e^{eps(2)} + 3 sum_{l=3}^{alpha} C(alpha,l) q^l
    (1-q)^(alpha-l) e^{(l-1) eps(l)}.
    Checked against the paper's abstract (the general bound is within log(3)/(alpha-1) of the
    lower bound, Theorem 6, which is this sum without the factor 3) and against two public
    implementations that cite it (Theorem 5 with the factor 3; Theorem 6 as the tight form
    under Theorem 8's condition). Hand-written (log-space, vectorised over candidates):
    opacus' analysis is Gaussian-only, and autodp's general Poisson routine
    (compose_poisson_subsampled_mechanisms1) uses e^{l eps(l+1)} without the factor 3 for
    l >= 3, which is not the published statement.
    """
    base = np.asarray(base, dtype=float)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate == 1:
        return base.copy()
    q = sample_rate
    log_q, log_1mq = math.log(q), math.log1p(-q)
    n_orders = base.shape[-1]
    out = np.empty_like(base)
    for j in range(n_orders):
        alpha = j + 2
        ells = np.arange(2, alpha + 1)
        log_binom = gammaln(alpha + 1) - gammaln(ells + 1) - gammaln(alpha - ells + 1)
        coef = log_binom + ells * log_q + (alpha - ells) * log_1mq
        coef = coef + np.where(ells >= 3, math.log(3.0), 0.0)
        terms = coef + (ells - 1) * base[..., : alpha - 1]
        head = (alpha - 1) * log_1mq + math.log1p((alpha - 1) * q)
        stacked = np.concatenate([np.broadcast_to(head, terms.shape[:-1] + (1,)), terms], -1)
        out[..., j] = logsumexp(stacked, axis=-1) / (alpha - 1)
    return np.minimum(out, base)


@lru_cache(maxsize=256)
def _subsampled_step_rdp(params: LMOParams, sample_rate: float, max_order: int) -> np.ndarray:
    rdp = subsampled_rdp(rdp_per_step(params, orders_up_to(max_order)), sample_rate)
    rdp.setflags(write=False)  # shared by the cache
    return rdp


def segment_rdp(
    params: LMOParams, sample_rate: float, steps: int, max_order: int = MAX_ORDER
) -> np.ndarray:
    """RDP at orders 2..max_order of `steps` Poisson-subsampled LMO steps (composition adds)."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return _subsampled_step_rdp(params, float(sample_rate), max_order) * steps


def rdp_to_epsilon_arrays(rdp: np.ndarray, orders: np.ndarray, delta: float) -> np.ndarray:
    """opacus' RDP -> (epsilon, delta) conversion (Balle et al. 2020), vectorised over alpha."""
    alpha = np.asarray(orders, dtype=float)
    eps = rdp - (math.log(delta) + np.log(alpha)) / (alpha - 1) + np.log((alpha - 1) / alpha)
    return np.maximum(np.min(np.where(np.isnan(eps), np.inf, eps), axis=-1), 0.0)


def _check_plan(sample_rate: float, steps: int, delta: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon(
    params: LMOParams, sample_rate: float, steps: int, delta: float, max_order: int = MAX_ORDER
) -> float:
    """Sound epsilon of `steps` Poisson-subsampled LMO-DP steps on L1-clipped sums (inf if none)."""
    _check_plan(sample_rate, steps, delta)
    total = segment_rdp(params, sample_rate, steps, max_order)
    return rdp_epsilon(total, orders_up_to(max_order), delta)


def rdp_epsilon(total: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of a composed RDP curve over ``orders`` (inf where every order is)."""
    if not np.isfinite(total).any():
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns when the best order is an end point
        eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return max(float(eps), 0.0)


# ------------------------------------------------------------ what the authors' code reports


@dataclass(frozen=True)
class PaperEpsilon:
    """Numbers as the LMO-DP code prints them. NOT a privacy guarantee (see module docstring)."""

    per_step: float  # 1-D, 1 step, orders 2..128 evaluated without the MGF domain check
    per_step_order: int
    composed_no_subsampling: float  # per-step RDP * steps, no amplification
    proxy_sigma: float  # sqrt(2 ln(1.25/delta)) / round_epsilon: the Gaussian "classical" sigma
    gaussian_proxy: float  # that sigma's subsampled-Gaussian epsilon, credited to LMO by the paper


def _paper_rdp(params: LMOParams, orders: np.ndarray) -> np.ndarray:  # pragma: no mutate block
    """The authors' closed forms in real arithmetic, beyond the MGF poles (the unsound part)."""
    p = params
    alpha = orders.astype(float)

    def closed_mgf(t: np.ndarray) -> np.ndarray:
        # Real powers: a negative base gives nan for fractional k (the code then reports inf).
        gamma = (1 - p.a1 * t * p.theta) ** (-p.k)
        exponential = p.lam / (p.lam - p.a3 * t)
        uniform = (np.exp(p.a4 * t * p.b) - np.exp(p.a4 * t * p.a)) / (p.a4 * t * (p.b - p.a))
        return gamma * exponential * uniform

    with np.errstate(all="ignore"):
        rdp = np.log(
            (alpha * closed_mgf(alpha - 1) + (alpha - 1) * closed_mgf(-alpha)) / (2 * alpha - 1)
        ) / (alpha - 1)
    return np.where(np.isfinite(rdp) & (rdp > 0), rdp, np.inf)


def paper_epsilon(
    params: LMOParams,
    sample_rate: float,
    steps: int,
    delta: float,
    round_epsilon: float | None = None,
) -> PaperEpsilon:  # pragma: no mutate block
    """Reproduce the paper code's numbers (check_privacy_and_statistics.py). NOT a guarantee.

    round_epsilon: the per-round label fed to the Gaussian proxy (the paper's run label, e.g.
    0.3); None uses the code's own per-step epsilon, as its __main__ does.
    """
    _check_plan(sample_rate, steps, delta)
    p = params
    orders = orders_up_to(MAX_ORDER)
    nan = math.nan
    # The code checks the MGF domain at alpha = 2 only, and returns nothing if that fails.
    if not (p.a1 * 1 < 1 / p.theta and p.a3 * 1 < p.lam):
        return PaperEpsilon(math.inf, 0, math.inf, nan, nan)
    rdp = _paper_rdp(params, orders)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_step, order = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        composed, _ = get_privacy_spent(orders=orders, rdp=rdp * steps, delta=delta)
        label = per_step if round_epsilon is None else round_epsilon
        sigma = math.sqrt(2 * math.log(1.25 / delta)) / label
        proxy_rdp = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
        proxy, _ = get_privacy_spent(orders=orders, rdp=proxy_rdp, delta=delta)
    return PaperEpsilon(float(per_step), int(order), float(composed), float(sigma), float(proxy))
