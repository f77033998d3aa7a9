"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

The secret's log-likelihood after its prefix is ranked among random candidate secrets of the
same format; exposure = log2(n_candidates + 1) - log2(rank), so rank 1 gives the maximum and a
model that knows nothing gives about 1/ln 2 = 1.44 bits on average.

With a reference model (the base), a calibrated exposure ranks the fine-tuned model's
log-likelihood minus the reference's: what fine-tuning added. A BPE tokenizer splits the
secrets' digits unevenly (a "50" in the notes' ages becomes one token), so the raw ranking
mostly says how few tokens a secret takes. Measured on a user's 300 notes: held-out canaries
at 5.2 bits on average (one at 10.1) and the 16-times ones at 1.0; calibrated, 1.3 and 3.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from privtune.attacks.reference_cache import ReferenceCache, read_scores, write_scores
from privtune.data.canaries import Canary, candidate_secrets
from privtune.evaluate import continuation_logprobs, encode_continuations, split_prompt

LOGITS_BUDGET_BYTES = 256 * 2**20
"""Memory allowed for one chunk's float32 logits (continuations x tokens x vocabulary)."""
CUDA_LOGITS_BUDGET_BYTES = 4 * 2**30
"""The same on a GPU, at most (and at most a quarter of its free memory): a pass there costs
about the same for 56 continuations as for 1,000, so fewer, larger chunks."""


def logits_budget(device: torch.device) -> int:
    """Bytes one chunk's logits may take on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(LOGITS_BUDGET_BYTES, min(CUDA_LOGITS_BUDGET_BYTES, free // 4))
    return LOGITS_BUDGET_BYTES


def default_chunk_size(model: torch.nn.Module, tokens_per_continuation: int = 12) -> int:
    """Continuations per forward pass so that the logits (and their log-softmax) fit the budget
    of the model's device."""
    vocab = int(model.config.vocab_size)
    budget = logits_budget(next(model.parameters()).device)
    return max(16, budget // (2 * 4 * vocab * tokens_per_continuation))


def chunked_continuation_logprobs(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    continuations: Sequence[str],
    chunk_size: int | None = None,
    tails: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """:func:`privtune.evaluate.continuation_logprobs` over chunks, for bounded memory.

    Each chunk re-runs the (short) prompt once and shares its KV cache within the chunk.
    ``tails``: the continuations' ids after the prompt's gap, when the caller has them.
    """
    size = chunk_size or default_chunk_size(model)
    if tails is None:
        tails = encode_continuations(tokenizer, _gap(prompt), continuations)
    parts = [
        continuation_logprobs(
            model,
            tokenizer,
            prompt,
            continuations[start : start + size],
            tails[start : start + size],
        )
        for start in range(0, len(continuations), size)
    ]
    return torch.cat(parts) if parts else torch.empty(0)


def _gap(prompt: str) -> str:
    return split_prompt(prompt)[1]


def secret_rank(secret_score: float, candidate_scores: np.ndarray) -> float:
    """1 + number of candidates scored above the secret; ties share the average rank."""
    candidate_scores = np.asarray(candidate_scores, dtype=float)
    above = np.sum(candidate_scores > secret_score)
    return float(1 + above + 0.5 * np.sum(candidate_scores == secret_score))


def exposure_from_scores(secret_score: float, candidate_scores: np.ndarray) -> float:
    """Exposure of a secret among candidates: log2(n + 1) - log2(rank)."""
    rank = secret_rank(secret_score, candidate_scores)
    return math.log2(np.size(candidate_scores) + 1) - math.log2(rank)


@dataclass(frozen=True)
class CanaryExposure:
    """Exposure of one canary (identified by id and repetitions, never by its text);
    ``calibrated``: against the reference model's log-likelihoods (None: no reference)."""

    id: str
    repetitions: int
    exposure: float
    rank: float
    calibrated: float | None = None


def canary_exposures(
    model: torch.nn.Module,
    tokenizer,
    canaries: Sequence[Canary],
    n_candidates: int = 10_000,
    seed: int = 0,
    chunk_size: int | None = None,
    on_canary: Callable[[], None] | None = None,
    reference: torch.nn.Module | None = None,
    reference_cache: ReferenceCache | None = None,
) -> list[CanaryExposure]:
    """Exposure of every canary against the same ``n_candidates`` random secrets, and with a
    ``reference`` model (same tokenizer) the calibrated exposure too. ``reference_cache``: where
    the reference's scores are kept (read when the file holds every canary's, written
    otherwise): they are the same for every method fine-tuned from it, so the attack stages
    after the first score only their own model.

    Candidates exclude all canaries' secrets, so no canary competes with another's secret.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    model.eval()
    # one size for both models and the key: a pass's batch changes the scores' last bits
    chunk_size = chunk_size or default_chunk_size(model)
    path = None
    if reference is not None and reference_cache is not None:
        canary_key = [(c.id, c.prefix, c.secret) for c in canaries]
        path = reference_cache.path("exposure", canary_key, n_candidates, seed, chunk_size)

    def holds_every_canary(scores: object) -> bool:
        return isinstance(scores, dict) and all(
            isinstance(scores.get(c.id), torch.Tensor) and scores[c.id].shape == (n_candidates + 1,)
            for c in canaries
        )

    cached = read_scores(path, holds_every_canary)
    complete = cached is not None  # read whole from the file: nothing to write back
    cached = cached or {}
    if reference is not None:
        reference.eval()
    candidates = candidate_secrets(n_candidates, seed, exclude={c.secret for c in canaries})
    encoded: dict[str, list[list[int]]] = {}  # candidates' ids per gap, shared by canaries
    results = []
    for canary in canaries:
        gap = _gap(canary.prefix)
        if gap not in encoded:
            encoded[gap] = encode_continuations(tokenizer, gap, candidates)
        tails = [*encode_continuations(tokenizer, gap, [canary.secret]), *encoded[gap]]
        continuations = [canary.secret, *candidates]
        scores = chunked_continuation_logprobs(
            model, tokenizer, canary.prefix, continuations, chunk_size, tails
        ).double()
        secret, others = float(scores[0]), scores[1:].numpy()
        rank = secret_rank(secret, others)
        calibrated = None
        if reference is not None:
            if canary.id not in cached:
                cached[canary.id] = chunked_continuation_logprobs(
                    reference, tokenizer, canary.prefix, continuations, chunk_size, tails
                ).double()
            gained = scores - cached[canary.id]
            calibrated = exposure_from_scores(float(gained[0]), gained[1:].numpy())
        exposure = exposure_from_scores(secret, others)
        results.append(CanaryExposure(canary.id, canary.repetitions, exposure, rank, calibrated))
        if on_canary is not None:
            on_canary()
    if path is not None and not complete:
        write_scores(path, cached)
    return results
