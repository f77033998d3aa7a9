"""ROC metrics of a membership attack: AUC with a bootstrap interval, TPR at low FPR, plots."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from privtune.io import atomic_file  # noqa: E402

LOW_FPRS: tuple[float, ...] = (0.001, 0.01)
"""False-positive rates at which the attack's true-positive rate is reported."""


@dataclass(frozen=True)
class RocSummary:
    """What the metrics file reports for one score.

    ``tpr_at_fpr`` holds None at a rate the non-members cannot resolve (fewer than 1/FPR of
    them: one false positive is already more than that rate); ``tpr_ci_low`` is the lower
    confidence bound of each resolved TPR (Clopper-Pearson over the members). With patients
    (``patients``: members', non-members'), both intervals count a patient's notes as one
    draw: the AUC's bootstrap resamples patients, the TPR's bound uses the members' effective
    number (:func:`effective_members`).
    """

    auc: float
    auc_ci_low: float
    auc_ci_high: float
    tpr_at_fpr: dict[float, float | None]
    tpr_ci_low: dict[float, float] = field(default_factory=dict)
    members: int = 0
    non_members: int = 0
    patients: tuple[int, int] | None = None


def resolvable(fpr: float, non_members: int) -> bool:
    """Whether ``non_members`` can measure a false-positive rate of ``fpr``: at least 1/fpr."""
    return non_members * fpr >= 1 - 1e-9


def non_members_needed(fpr: float) -> int:
    """The fewest non-members that can measure a false-positive rate of ``fpr``: 1/fpr."""
    return math.ceil(1 / fpr - 1e-9)


def unresolved_reason(fpr: float, non_members: int) -> str:
    """Why a TPR at ``fpr`` is null, and the fix."""
    need = non_members_needed(fpr)
    return (
        f"TPR at {fpr:g} FPR needs at least {need} non-members, the attack had {non_members}: "
        f"raise attack.members to {need} (and the corpus with it) to measure it"
    )


def tpr_lower_bound(tpr: float, members: float, confidence: float) -> float:
    """Lower end of the two-sided Clopper-Pearson interval of a TPR measured on ``members``
    (a float: an effective number, whose hits tpr x members may be fractional too; the
    binomial interval's beta quantile takes both)."""
    if isinstance(members, int):
        hits = round(tpr * members)
        return float(stats.binomtest(hits, members).proportion_ci(confidence, "exact").low)
    hits = tpr * members
    if hits <= 0:
        return 0.0
    return float(stats.beta.ppf((1 - confidence) / 2, hits, members - hits + 1))


def _patient_index(groups: Sequence[Hashable]) -> tuple[np.ndarray, int]:
    """Each note's patient as 0..k-1 (ids compared as text), and k."""
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return index, int(index.max()) + 1


def effective_members(hits: Sequence[bool], groups: Sequence[Hashable]) -> float:
    """How many independent members ``hits`` (one per note) are worth when notes of a patient
    (``groups``) are alike: n over Kish's design effect 1 + (m - 1) rho, with rho the
    one-way ANOVA intra-patient correlation of the hits (clamped to [0, 1]) and m the
    notes-weighted mean number of notes a patient has. One note per patient: n."""
    values = np.asarray(hits, dtype=float)
    index, k = _patient_index(groups)
    n = values.size
    if k == n:
        return float(n)
    if k == 1:
        return 1.0  # one patient: its notes may be one draw
    sizes = np.bincount(index, minlength=k)
    means = np.bincount(index, weights=values, minlength=k) / sizes
    between = float(np.sum(sizes * (means - values.mean()) ** 2) / (k - 1))
    within = float(np.sum((values - means[index]) ** 2) / (n - k))
    m0 = (n - float(np.sum(sizes**2)) / n) / (k - 1)
    denominator = between + (m0 - 1) * within
    rho = 0.0 if denominator <= 0 else min(1.0, max(0.0, (between - within) / denominator))
    weighted_size = float(np.sum(sizes**2)) / n
    return n / (1 + (weighted_size - 1) * rho)


def _labelled(member_scores: Sequence[float], non_member_scores: Sequence[float]):
    members = np.asarray(member_scores, dtype=float)
    non_members = np.asarray(non_member_scores, dtype=float)
    if members.size == 0 or non_members.size == 0:
        raise ValueError("ROC needs at least one member and one non-member score")
    if not (np.isfinite(members).all() and np.isfinite(non_members).all()):
        raise ValueError("membership scores must be finite")
    labels = np.r_[np.ones(members.size), np.zeros(non_members.size)]
    return labels, np.r_[members, non_members]


def tpr_at_fpr(
    member_scores: Sequence[float], non_member_scores: Sequence[float], fpr: float
) -> float:
    """Highest TPR of a threshold rule "member if score >= t" whose FPR is at most ``fpr``.

    A step (not linear) reading of sklearn's ROC: only rates a real threshold achieves count.
    """
    return _best_rule(member_scores, non_member_scores, fpr)[0]


def _best_rule(
    member_scores: Sequence[float], non_member_scores: Sequence[float], fpr: float
) -> tuple[float, float]:
    """(TPR, threshold t) of tpr_at_fpr's rule "member if score >= t"."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    labels, scores = _labelled(member_scores, non_member_scores)
    fprs, tprs, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    allowed = np.flatnonzero(fprs <= fpr + 1e-12)
    best = allowed[np.argmax(tprs[allowed])]  # the first (highest threshold) of the best
    return float(tprs[best]), float(thresholds[best])


def _auc_statistic(members: np.ndarray, non_members: np.ndarray, axis: int = -1) -> np.ndarray:
    # AUC = Mann-Whitney U / (n1 n0) (ties count 1/2); scipy's U is vectorised over resamples,
    # which sklearn's roc_auc_score is not (1000 separate calls per score).
    u = stats.mannwhitneyu(members, non_members, axis=axis).statistic
    return u / (members.shape[axis] * non_members.shape[axis])


def _patient_draws(groups: Sequence[Hashable], resamples: int, rng) -> np.ndarray:
    """(resamples, notes): how often each note is in each resample when its patients are
    drawn with replacement (a patient drawn twice brings its notes twice)."""
    index, patients = _patient_index(groups)
    drawn = rng.integers(0, patients, size=(resamples, patients))
    counts = np.zeros((resamples, patients))
    np.add.at(counts, (np.arange(resamples)[:, None], drawn), 1)
    return counts[:, index]


def _patient_bootstrap(
    members: np.ndarray,
    non_members: np.ndarray,
    groups: tuple[Sequence[Hashable], Sequence[Hashable]],
    resamples: int,
    confidence: float,
    rng,
) -> tuple[float, float]:
    """Percentile interval of the AUC over resamples of patients, members' and non-members'
    apart. Why not scipy.stats.bootstrap: it resamples observations, not clusters of them."""
    if len(groups[0]) != members.size or len(groups[1]) != non_members.size:
        raise ValueError("every member and non-member needs its patient")
    # wins[i, j]: member i above non-member j (a tie counts 1/2), so a resample's AUC is the
    # weighted mean of wins under its draw counts
    wins = (members[:, None] > non_members[None, :]) + 0.5 * (
        members[:, None] == non_members[None, :]
    )
    w_members = _patient_draws(groups[0], resamples, rng)
    w_non = _patient_draws(groups[1], resamples, rng)
    aucs = np.sum((w_members @ wins) * w_non, axis=1) / (w_members.sum(axis=1) * w_non.sum(axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return float(low), float(high)


def auc_confidence_interval(
    member_scores: Sequence[float],
    non_member_scores: Sequence[float],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    patients: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, members and non-members resampled separately
    (with ``patients``, each note's patient on either side: whole patients resampled)."""
    members = np.asarray(member_scores, dtype=float)
    non_members = np.asarray(non_member_scores, dtype=float)
    if members.size < 2 or non_members.size < 2:
        raise ValueError("a bootstrap interval needs at least two members and two non-members")
    if patients is not None:
        rng = np.random.default_rng(seed)
        return _patient_bootstrap(members, non_members, patients, resamples, confidence, rng)
    result = stats.bootstrap(
        (members, non_members),
        _auc_statistic,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def roc_summary(
    member_scores: Sequence[float],
    non_member_scores: Sequence[float],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    fprs: Sequence[float] = LOW_FPRS,
    patients: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
) -> RocSummary:
    """AUC (sklearn), its bootstrap interval, and the TPR (with its lower bound) at each low
    FPR the non-members can resolve (None at the others). ``patients``: each member's and
    non-member's patient, when a patient can have several notes (see RocSummary)."""
    labels, scores = _labelled(member_scores, non_member_scores)
    low, high = auc_confidence_interval(
        member_scores, non_member_scores, resamples, confidence, seed, patients
    )
    n_members, n_non_members = len(member_scores), len(non_member_scores)
    tprs: dict[float, float | None] = {}
    bounds = {}
    for f in fprs:
        if not resolvable(f, n_non_members):
            tprs[f] = None
            continue
        tprs[f], rule = _best_rule(member_scores, non_member_scores, f)
        effective: float = n_members
        if patients is not None:  # how many draws the members at or above the rule are
            hits = np.asarray(member_scores, dtype=float) >= rule
            effective = effective_members(hits, patients[0])
        bounds[f] = tpr_lower_bound(tprs[f], effective, confidence)
    return RocSummary(
        auc=float(roc_auc_score(labels, scores)),
        auc_ci_low=low,
        auc_ci_high=high,
        tpr_at_fpr=tprs,
        tpr_ci_low=bounds,
        members=n_members,
        non_members=n_non_members,
        patients=None if patients is None else tuple(_patient_index(g)[1] for g in patients),
    )


def plot_roc(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, path: Path
) -> Path:
    """ROC curves of several scores on log-log axes (where low-FPR attacks show), chance dashed.

    ``curves`` maps a score name to (member scores, non-member scores); only rates are drawn.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1.0
    for name, (members, non_members) in curves.items():
        labels, scores = _labelled(members, non_members)
        fprs, tprs, _ = roc_curve(labels, scores)
        auc = roc_auc_score(labels, scores)
        ax.plot(fprs, tprs, label=f"{name} (AUC {auc:.3f})")
        floor = min(floor, 0.5 / max(len(members), len(non_members)))
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05))
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, mode="wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)
    return path
