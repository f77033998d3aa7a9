"""Per-record utility scores, so that two models measured on the same records can be compared
with a confidence interval instead of by their two numbers alone.

A test perplexity or an accuracy on a hundred notes moves by more between two equally good
models than the differences a promotion decides on. Every utility metric here is a ratio of
per-record sums (perplexity: exp(summed token NLL / tokens scored); accuracy: correct / asked),
so keeping each record's numerator and denominator lets the registry resample records, the same
ones for both models (a paired bootstrap), and state how sure the difference is.

Only numbers leave this module: a record's summed NLL and token count, or whether a model's
choice was right; never a text.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privtune.config import METRICS_DIR

ARTIFACT = "evaluation/record_scores.json"  # in a registered version's logged model


def record_scores_path(name: str) -> Path:
    """Per-record parts of a method's utility metrics, beside its metrics (evaluate stage)."""
    return METRICS_DIR / f"record-scores-{name}.json"


@dataclass(frozen=True)
class RecordScores:
    """One metric's per-record parts: metric = link(sum(numerators) / sum(denominators))."""

    numerators: tuple[float, ...]  # summed token NLL, or 1.0 / 0.0 for a right / wrong choice
    denominators: tuple[float, ...]  # tokens scored, or 1.0 per question asked
    exponentiate: bool = False  # perplexity: exp of the ratio

    def __post_init__(self) -> None:
        if len(self.numerators) != len(self.denominators):
            raise ValueError("one numerator and one denominator per record")

    @classmethod
    def counts(cls, outcomes: Sequence[bool]) -> RecordScores:
        """An accuracy's parts: 1 for each right choice, out of 1 per record asked."""
        return cls(tuple(float(o) for o in outcomes), (1.0,) * len(outcomes))

    def __len__(self) -> int:
        return len(self.numerators)

    def value(self) -> float:
        ratio = math.fsum(self.numerators) / max(math.fsum(self.denominators), 1e-300)
        return math.exp(ratio) if self.exponentiate else ratio

    def to_dict(self) -> dict[str, Any]:
        return {
            "numerators": list(self.numerators),
            "denominators": list(self.denominators),
            "exponentiate": self.exponentiate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecordScores:
        return cls(
            tuple(float(x) for x in data["numerators"]),
            tuple(float(x) for x in data["denominators"]),
            bool(data.get("exponentiate", False)),
        )


def to_json(scores: dict[str, RecordScores]) -> dict[str, Any]:
    return {metric: s.to_dict() for metric, s in scores.items()}


def from_json(data: dict[str, Any]) -> dict[str, RecordScores]:
    return {metric: RecordScores.from_dict(s) for metric, s in data.items()}


def write_scores(path: Path, evaluated_on: str, scores: dict[str, RecordScores]) -> None:
    """The evaluate stage's file (and a version's artifact): what the scores were measured on
    and each metric's parts, compact (one number per record and part)."""
    from privtune import io

    io.write_json(path, {"evaluated_on": evaluated_on, "scores": to_json(scores)}, indent=None)


def parse_scores(data: Any) -> tuple[str, dict[str, RecordScores]]:
    """(evaluated_on, parts by metric) of such a file's content; ValueError when malformed."""
    try:
        return str(data["evaluated_on"]), from_json(data["scores"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"not per-record scores ({type(err).__name__})") from None


def read_scores(path: Path) -> tuple[str, dict[str, RecordScores]]:
    """:func:`parse_scores` of a file; OSError when it is not there, ValueError when unreadable."""
    from privtune import io

    return parse_scores(io.read_json(path))


@dataclass(frozen=True)
class Difference:
    """The challenger's metric minus the champion's on the same records, with the paired
    bootstrap's interval at `confidence` (two-sided; a gate reads its unfavourable end, a
    one-sided test at (1 + confidence) / 2)."""

    difference: float
    low: float
    high: float
    confidence: float
    records: int
    # the resampled differences the interval was read from (for a plot)
    distribution: tuple[float, ...] = field(default=(), compare=False, repr=False)


class NotPaired(ValueError):
    """The two sets of scores are not of the same records, or too few to resample."""


def _metric(num: np.ndarray, den: np.ndarray, exponentiate: bool, axis: int) -> np.ndarray:
    ratio = num.sum(axis=axis) / np.maximum(den.sum(axis=axis), 1e-300)
    return np.exp(ratio) if exponentiate else ratio


def seed_of(*parts: str) -> int:
    """A resampling seed from what is compared: the same comparison gives the same interval."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


def paired_difference(
    challenger: RecordScores,
    champion: RecordScores,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Difference:
    """Challenger minus champion and its percentile-bootstrap interval, resampling records
    (the same indices for both models: their errors on a hard note move together)."""
    from scipy import stats

    if len(challenger) != len(champion) or challenger.exponentiate != champion.exponentiate:
        raise NotPaired(
            f"the scores are not of the same records ({len(challenger)} against "
            f"{len(champion)}, or different metrics)"
        )
    if len(challenger) < 2:
        raise NotPaired(f"{len(challenger)} record(s): too few to resample")
    link = challenger.exponentiate
    data = tuple(
        np.asarray(x, dtype=float)
        for x in (
            challenger.numerators,
            challenger.denominators,
            champion.numerators,
            champion.denominators,
        )
    )

    def statistic(num_a, den_a, num_b, den_b, axis=-1):  # noqa: ANN001, ANN202 (scipy's call)
        return _metric(num_a, den_a, link, axis) - _metric(num_b, den_b, link, axis)

    difference = float(statistic(*data))
    if all(np.array_equal(data[i], data[i + 2]) for i in (0, 1)):
        low = high = difference  # one model twice: every resample agrees (scipy warns on it)
        distribution: tuple[float, ...] = (difference,)
    else:
        result = stats.bootstrap(
            data,
            statistic,
            paired=True,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            batch=max(1, min(resamples, 4_000_000 // len(challenger))),  # bounded memory
            rng=np.random.default_rng(seed),
        )
        low, high = (float(result.confidence_interval.low), float(result.confidence_interval.high))
        distribution = tuple(float(x) for x in result.bootstrap_distribution)
    return Difference(difference, low, high, confidence, len(challenger), distribution)
