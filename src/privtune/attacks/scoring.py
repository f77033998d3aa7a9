"""Per-record membership scores from token log-probabilities.

Every score is oriented so that higher means "more likely a training member", so one ROC
routine serves all of them. Scores are numbers only: no text leaves this module.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from privtune.attacks.reference_cache import (
    ReferenceCache,
    read_scores,
    texts_digest,
    write_scores,
)
from privtune.data.tokenization import encode_records
from privtune.errors import DataError
from privtune.losses import next_token_logits, token_nll

SCORE_NAMES: tuple[str, ...] = ("loss", "reference", "zlib", "min_k")
"""The membership scores, in the order they are reported (metric keys use these names)."""


def model_max_length(model: torch.nn.Module) -> int:
    """Positions the model attends to (``n_positions`` or ``max_position_embeddings``)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


def record_texts(records: Sequence[dict], field: str) -> list[str]:
    """The ``text`` of each record; a bad record is named by its index, never by its content."""
    texts = []
    for index, record in enumerate(records):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise DataError(
                f"{field}[{index}]",
                "record has no non-empty string 'text'",
                "pass records with text",
            )
        texts.append(text)
    if not texts:
        raise DataError(field, "no records given", "pass at least one record")
    return texts


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """log p(token | earlier tokens) of every predicted token of each text ([bos] text [eos]).

    Records are batched by length (less padding); the result keeps the input order.
    ``on_batch(n)`` after each batch of n texts (a progress bar's advance).
    """
    if max_length is None:
        max_length = model_max_length(model)
    model.eval()
    device = next(model.parameters()).device
    data = encode_records(list(texts), tokenizer, max_length)
    order = torch.argsort(data.lengths, descending=True)
    out: list[np.ndarray] = [np.empty(0)] * len(data)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"])
        nll, mask = token_nll(logits, batch["labels"])
        for row, record in enumerate(index.tolist()):
            out[record] = -nll[row][mask[row]].double().cpu().numpy()
        if on_batch is not None:
            on_batch(len(index))
    return out


def zlib_bytes(text: str) -> int:
    """zlib-compressed length of the text in bytes: Carlini et al. (2021)'s zlib entropy."""
    return len(zlib.compress(text.encode("utf-8")))


def min_k_logprob(logprobs: np.ndarray, k: float = 0.2) -> float:
    """Mean log-prob of the k fraction least likely tokens (Min-K% Prob, Shi et al. 2024)."""
    if not 0 < k <= 1:
        raise ValueError(f"min_k fraction must be in (0, 1], got {k}")
    if logprobs.size == 0:
        return 0.0
    count = max(1, math.ceil(k * logprobs.size))
    return float(np.sort(logprobs)[:count].mean())


def membership_scores(
    model: torch.nn.Module,
    reference_model: torch.nn.Module | None,
    tokenizer,
    texts: Sequence[str],
    min_k: float = 0.2,
    max_length: int | None = None,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    reference_cache: ReferenceCache | None = None,
) -> dict[str, np.ndarray]:
    """All membership scores of each text (higher = more likely member), keyed by score name.

    ``reference`` (target loss minus reference loss, negated) is left out when no reference
    model is given. ``on_batch(n)`` after each batch of n texts through either model.
    ``reference_cache``: where the reference model's losses of these texts are kept (the same
    for every method fine-tuned from it: scored by the first attack, read by the others).
    """
    if max_length is None:
        max_length = model_max_length(model)
    target = token_logprobs(model, tokenizer, texts, max_length, batch_size, on_batch)
    loss = _mean_losses(target)
    scores = {
        "loss": -loss,
        "zlib": -loss / np.array([zlib_bytes(t) for t in texts], dtype=float),
        "min_k": np.array([min_k_logprob(lp, min_k) for lp in target]),
    }
    if reference_model is not None:
        ref_loss = _reference_losses(
            reference_model, tokenizer, texts, max_length, batch_size, on_batch, reference_cache
        )
        scores["reference"] = -(loss - ref_loss)
    return {name: scores[name] for name in SCORE_NAMES if name in scores}


def _mean_losses(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Each text's mean token loss (0 for a text with no predicted token)."""
    return np.array([-lp.mean() if lp.size else 0.0 for lp in logprobs])


def _reference_losses(
    reference_model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
    cache: ReferenceCache | None,
) -> np.ndarray:
    """The reference model's mean token loss of each text, from the cache when it holds them."""
    path = None
    if cache is not None:  # batch size too: a batch's padding changes the last bits
        path = cache.path("membership", texts_digest(texts), max_length, batch_size)
    cached = read_scores(
        path,
        lambda t: (
            isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == (len(texts),)
        ),
    )
    if cached is not None:
        if on_batch is not None:
            on_batch(len(texts))  # a progress bar counts them as scored
        return cached.numpy()
    reference = token_logprobs(reference_model, tokenizer, texts, max_length, batch_size, on_batch)
    losses = _mean_losses(reference)
    if path is not None:
        write_scores(path, torch.from_numpy(losses))
    return losses
