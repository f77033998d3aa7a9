"""One-run privacy audit (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

m audit canaries are each put into the training set independently with probability 1/2. After
the one training run, the auditor guesses IN for the k+ highest-scored canaries, OUT for the k-
lowest and abstains on the rest. Under (eps, delta)-DP the number of correct guesses among r
is (nearly) dominated by Binomial(r, e^eps / (1 + e^eps)) (their Theorem 5.2 / Algorithm 2),
so many correct guesses reject small eps: the largest rejected eps is a lower bound on the
true epsilon that holds with the stated confidence.

Written here because no installed library has it (jax_privacy has, but needs JAX).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

EPS_SEARCH_MAX = 100.0
"""Bisection ceiling; at this eps randomized response is exact in float64, so p = 1 above it."""


def make_guesses(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """+1 (IN) for the k_pos highest scores, -1 (OUT) for the k_neg lowest, 0 (abstain) else."""
    scores = np.asarray(scores, dtype=float)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > scores.size:
        raise ValueError(
            f"need 0 <= k_pos, k_neg and k_pos + k_neg <= m = {scores.size}, got {k_pos}, {k_neg}"
        )
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(scores.size, dtype=int)
    guesses[order[:k_pos]] = 1
    guesses[order[scores.size - k_neg :]] = -1
    return guesses


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v of r guesses correct] under (eps, delta)-DP: their Algorithm 2's p-value.

    beta = P[Bin(r, q) >= v] with q = e^eps / (1 + e^eps); delta adds
    2 m delta max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps}, delta={delta}")
    q = special.expit(eps)
    beta = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, v + 1)
    alpha = np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i)
    return float(min(beta + 2 * m * delta * alpha, 1.0))


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Largest eps that v correct of r guesses reject at this confidence (0 if none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    significance = 1 - confidence

    def margin(eps: float) -> float:  # > 0 while (eps, delta)-DP is rejected
        return significance - p_value(m, r, v, eps, delta)

    if margin(0.0) <= 0:
        return 0.0
    if margin(EPS_SEARCH_MAX) > 0:
        return EPS_SEARCH_MAX
    tolerance = 1e-6
    eps = float(optimize.bisect(margin, 0.0, EPS_SEARCH_MAX, xtol=tolerance))
    while eps > 0 and margin(eps) <= 0:  # report an eps that is itself rejected
        eps = max(0.0, eps - tolerance)
    return eps


@dataclass(frozen=True)
class AuditResult:
    """The audit's outcome: the bound and the guess counts behind it (no canary text)."""

    epsilon_lower_bound: float
    m: int
    guesses: int
    correct: int
    k_pos: int
    k_neg: int
    confidence: float


def default_k_choices(m: int) -> list[tuple[int, int]]:
    """A few (k+, k-) pairs: from few confident guesses to guessing on every canary, and
    IN-only guesses (an IN canary the run never sampled looks OUT, so guessing OUT is where
    errors concentrate; guessing only the top scores avoids them)."""
    choices = []
    for fraction in (0.05, 0.1, 0.25, 0.5):
        k = max(1, round(fraction * m))
        if 2 * k <= m and (k, k) not in choices:
            choices.append((k, k))
    for fraction in (0.1, 0.25, 0.4):
        k = max(1, round(fraction * m))
        if k <= m and (k, 0) not in choices:
            choices.append((k, 0))
    return choices or [(1, 0)]


def one_run_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    k_choices: Sequence[tuple[int, int]] | None = None,
    confidence: float = 0.95,
) -> AuditResult:
    """Epsilon lower bound from attack scores of the audit canaries (higher = guessed IN).

    Every (k+, k-) in ``k_choices`` is tried at significance (1 - confidence) / len(k_choices)
    (Bonferroni), so the best of them is still a valid bound at ``confidence``.
    """
    scores = np.asarray(scores, dtype=float)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    if scores.shape != truth.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {truth.shape} must be equal 1-d")
    m = scores.size
    choices = list(k_choices) if k_choices is not None else default_k_choices(m)
    if not choices:
        raise ValueError("k_choices must not be empty")
    per_choice = 1 - (1 - confidence) / len(choices)
    best = None
    for k_pos, k_neg in choices:
        guesses = make_guesses(scores, k_pos, k_neg)
        r = int(np.count_nonzero(guesses))
        v = int(np.sum(guesses == truth))
        bound = epsilon_lower_bound(m, r, v, delta, per_choice)
        if best is None or bound > best.epsilon_lower_bound:
            best = AuditResult(bound, m, r, v, k_pos, k_neg, confidence)
    assert best is not None
    return best
