"""The paired comparison the utility gate reads: per-record parts of a metric, resampled in
pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.record_scores import NotPaired, RecordScores, paired_difference, seed_of


def _perplexity(nll_per_token: list[float], tokens: list[int]) -> RecordScores:
    return RecordScores(
        tuple(n * t for n, t in zip(nll_per_token, tokens, strict=True)),
        tuple(map(float, tokens)),
        exponentiate=True,
    )


def test_value_is_the_metric_of_the_summed_parts():
    scores = _perplexity([1.0, 3.0], [3, 1])
    assert scores.value() == pytest.approx(math.exp((3.0 + 3.0) / 4))  # token-weighted
    assert RecordScores.counts([True, False, True, True]).value() == 0.75
    assert RecordScores.from_dict(scores.to_dict()) == scores


records = st.lists(
    st.tuples(st.floats(0.5, 6.0), st.floats(-1.0, 1.0), st.integers(1, 60)),
    min_size=2,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(records=records, seed=st.integers(0, 2**32))
def test_interval_holds_the_difference_and_swapping_the_models_mirrors_it(records, seed):
    champion = _perplexity([r[0] for r in records], [r[2] for r in records])
    challenger = _perplexity([r[0] + r[1] for r in records], [r[2] for r in records])
    ahead = paired_difference(challenger, champion, resamples=200, seed=seed)
    assert ahead.difference == pytest.approx(challenger.value() - champion.value())
    slack = 1e-9 * max(1.0, abs(ahead.difference))
    assert ahead.low - slack <= ahead.difference <= ahead.high + slack
    behind = paired_difference(champion, challenger, resamples=200, seed=seed)
    assert behind.low == pytest.approx(-ahead.high) and behind.high == pytest.approx(-ahead.low)
    assert paired_difference(challenger, champion, resamples=200, seed=seed) == ahead


def test_one_model_against_itself_differs_by_nothing():
    scores = _perplexity([2.0, 2.5, 3.0], [10, 12, 9])
    same = paired_difference(scores, scores)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)


def test_pairing_sees_a_consistent_gain_that_unpaired_numbers_would_call_noise():
    """Notes differ widely in difficulty; a challenger better by the same small amount on
    every one of them is better for sure, though the gain is far below the spread."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(1.0, 5.0, 100).tolist()
    tokens = [50] * 100
    champion = _perplexity(difficulty, tokens)
    better = _perplexity([d - 0.01 for d in difficulty], tokens)
    diff = paired_difference(better, champion, seed=1)
    assert diff.high < 0 and diff.records == 100  # lower perplexity, beyond the noise
    assert len(diff.distribution) == 2000  # the resampled differences it was read from
    inside = np.mean([diff.low <= d <= diff.high for d in diff.distribution])
    assert 0.94 <= inside <= 0.96
    noisy = _perplexity([d + rng.normal(0, 0.3) for d in difficulty], tokens)
    wide = paired_difference(noisy, champion, seed=1)
    assert wide.low < 0 < wide.high  # a shuffle of errors: no verdict


def test_scores_of_other_records_are_not_paired():
    with pytest.raises(NotPaired, match="not of the same records"):
        paired_difference(_perplexity([1.0, 2.0], [3, 3]), _perplexity([1.0], [3]))
    with pytest.raises(NotPaired, match="not of the same records"):
        paired_difference(RecordScores.counts([True, False]), _perplexity([1.0, 2.0], [3, 3]))
    with pytest.raises(NotPaired, match="too few"):
        paired_difference(RecordScores.counts([True]), RecordScores.counts([False]))


def test_the_seed_depends_on_what_is_compared():
    assert seed_of("2", "1", "abc", "test_perplexity") == seed_of(
        "2", "1", "abc", "test_perplexity"
    )
    assert seed_of("3", "1", "abc", "test_perplexity") != seed_of(
        "2", "1", "abc", "test_perplexity"
    )
