"""Membership inference: can the attacker tell training records from unseen ones?

Members are private training records, non-members held-out records of the same distribution
(the test split), equal in number so that an AUC of 0.5 is chance.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from privtune.attacks.reference_cache import ReferenceCache
from privtune.attacks.roc import RocSummary, roc_summary
from privtune.attacks.scoring import membership_scores, record_texts
from privtune.data.canaries import Canary
from privtune.data.loaders import GROUP_NUMBER
from privtune.errors import DataError

T = TypeVar("T")


def without_canaries(records: Sequence[dict], canaries: Sequence[Canary]) -> list[dict]:
    """Records that contain no canary sentence.

    Why: a planted canary adds random digits that the test split never has, which shifts
    every score of those members (Min-K% most) and biases the membership AUC either way.
    """
    sentences = [c.text for c in canaries]
    return [r for r in records if not any(s in str(r.get("text", "")) for s in sentences)]


def balanced_sets(
    members: Sequence[T], non_members: Sequence[T], n: int | None, seed: int
) -> tuple[list[T], list[T]]:
    """Equal-size random subsets (n each, or as many as the smaller set has), reproducibly."""
    size = min(len(members), len(non_members))
    if n is not None:
        if n < 1:
            raise DataError("attack.n_records", f"must be >= 1, got {n}", "use e.g. 200 or null")
        size = min(size, n)
    if size < 1:
        raise DataError("attack members/non_members", "one of the sets is empty", "pass records")
    rng = random.Random(f"privtune.attacks.membership/{seed}")
    pick_members = sorted(rng.sample(range(len(members)), size))
    pick_non_members = sorted(rng.sample(range(len(non_members)), size))
    return [members[i] for i in pick_members], [non_members[i] for i in pick_non_members]


def membership_inference(
    model: torch.nn.Module,
    reference_model: torch.nn.Module | None,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    min_k: float = 0.2,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_length: int | None = None,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    reference_cache: ReferenceCache | None = None,
) -> tuple[dict[str, RocSummary], dict[str, tuple]]:
    """ROC summary of every score, and the raw (member, non-member) scores for plotting;
    ``on_batch(n)`` after each batch of n texts scored by either model; ``reference_cache``:
    where the reference model's scores are kept (:func:`membership_scores`)."""
    member_texts = record_texts(members, "members")
    non_member_texts = record_texts(non_members, "non_members")
    scores = membership_scores(
        model,
        reference_model,
        tokenizer,
        member_texts + non_member_texts,
        min_k=min_k,
        max_length=max_length,
        batch_size=batch_size,
        on_batch=on_batch,
        reference_cache=reference_cache,
    )
    n = len(member_texts)
    curves = {name: (values[:n], values[n:]) for name, values in scores.items()}
    patients = record_patients(members, non_members)
    summaries = {
        name: roc_summary(m, nm, resamples, confidence, seed, patients=patients)
        for name, (m, nm) in curves.items()
    }
    return summaries, curves


def record_patients(
    members: Sequence[dict], non_members: Sequence[dict]
) -> tuple[list[int], list[int]] | None:
    """Each member's and non-member's patient number (prepare writes ``GROUP_NUMBER`` when
    the corpus has prepare.group_column), or None when the records have none: the intervals
    then count notes as independent."""
    numbers = [[r.get(GROUP_NUMBER) for r in side] for side in (members, non_members)]
    if any(n is None for side in numbers for n in side):
        return None
    return numbers[0], numbers[1]
