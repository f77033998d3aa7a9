"""The privacy loss distribution of one Poisson-subsampled Gaussian step, built fast.

dp-accounting's own construction (connect-the-dots, pessimistic), with one change: the
hockey-stick divergences at the discretised privacy losses are computed in one vectorised
pass. The library inverts the privacy loss point by point in Python (about 16,000 calls per
step PLD at our discretisation, 0.1 s), and a controller that varies the noise (RLDP, the
budget guard's search) builds dozens of step PLDs per run. The inversion below is the
library's closed form for the Gaussian (privacy_loss_mechanism.GaussianPrivacyLoss and
AdditiveNoisePrivacyLoss._inverse_privacy_loss_add/_remove); a test checks that the PLD equals
the library's (to 1e-7 relative: its masses are second differences of delta curves that
agree to 1e-15), and without the library internals it uses the library's slow path.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld
from dp_accounting.pld import privacy_loss_mechanism as plm

_build_pmf = getattr(pld, "_create_pld_pmf_from_monotone_privacy_loss", None)
_for_subsampled = getattr(pld, "_pld_for_subsampled_mechanism", None)
ISCLOSE_RTOL = 1e-9  # math.isclose's default, as the library uses it


def _log_a_exp_b_plus_c(a: float, b: np.ndarray, c: float) -> np.ndarray:
    """log(a e^b + c) for a > 0 > c, elementwise (dp_accounting.pld.common's formula)."""
    d = b + math.log(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, math.log(a + c), d + np.log1p(-np.exp(math.log(-c) - d)))


class VectorisedGaussianLoss(plm.GaussianPrivacyLoss):
    """GaussianPrivacyLoss whose get_delta_for_epsilon inverts the loss in one pass."""

    def get_delta_for_epsilon(self, epsilon: float | Sequence[float]) -> float | np.ndarray:
        q = self.sampling_prob
        add = self.adjacency_type == plm.AdjacencyType.ADD
        remove = self.adjacency_type == plm.AdjacencyType.REMOVE
        if isinstance(epsilon, numbers.Number) or q == 1.0 or not (add or remove):
            return super().get_delta_for_epsilon(epsilon)
        epsilons = np.asarray(epsilon, dtype=float)
        deltas = np.zeros_like(epsilons)
        s, var = self.sensitivity, self.standard_deviation**2
        if add:
            bound = -math.log1p(-q)
            inside = epsilons < bound
            eps = epsilons[inside]
            unsampled = -_log_a_exp_b_plus_c(1 / q, -eps, 1 - 1 / q)
            x = s + (-0.5 * s - unsampled * var / s)
            at_bound = -math.inf  # inverse of the unsubsampled loss at +inf, shifted
        else:
            bound = math.log1p(-q)
            inside = epsilons > bound
            deltas[~inside] = -np.expm1(epsilons[~inside])
            eps = epsilons[inside]
            unsampled = _log_a_exp_b_plus_c(1 / q, eps, 1 - 1 / q)
            x = -0.5 * s - unsampled * var / s
            at_bound = math.inf  # inverse of the unsubsampled loss at -inf
        x = np.where(np.isclose(eps, bound, rtol=ISCLOSE_RTOL, atol=0.0), at_bound, x)
        deltas[inside] = self.mu_upper_cdf(x) - np.exp(eps + self.mu_lower_log_cdf(x))
        return np.clip(deltas, 0, 1)


def gaussian_step_pld(
    noise_multiplier: float, sampling_prob: float, interval: float
) -> pld.PrivacyLossDistribution:
    """pld.from_gaussian_mechanism(noise_multiplier, sampling_prob=...,
    value_discretization_interval=interval, pessimistic_estimate=True), faster."""
    if _build_pmf is None or _for_subsampled is None or sampling_prob == 1.0:
        return pld.from_gaussian_mechanism(
            standard_deviation=noise_multiplier,
            sampling_prob=sampling_prob,
            value_discretization_interval=interval,
            pessimistic_estimate=True,
        )

    def single(adjacency: plm.AdjacencyType):
        loss = VectorisedGaussianLoss(
            noise_multiplier,
            sensitivity=1,
            pessimistic_estimate=True,
            sampling_prob=sampling_prob,
            adjacency_type=adjacency,
        )
        return _build_pmf(
            loss,
            pessimistic_estimate=True,
            value_discretization_interval=interval,
            use_connect_dots=True,
        )

    return _for_subsampled(single, sampling_prob)
