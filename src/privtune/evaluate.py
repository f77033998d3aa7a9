"""Utility metrics: test perplexity and medication-consistency accuracy (the generated notes'
downstream task; privtune.downstream declares tasks for any corpus).

Medication accuracy (the downstream task): for each test note, take its text up to the point
where the plan names the prescribed drug, score every drug name of the formulary as the
continuation (sum of token log-probabilities), and count the note correct when the top-scored
drug is a first-line treatment of the note's diagnosis. Chance level is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from privtune.data.tokenization import EncodedRecords, bos_id, encode_records
from privtune.losses import mean_token_loss, record_token_nll
from privtune.record_scores import RecordScores

if TYPE_CHECKING:
    from privtune.config import EvaluateParams


def perplexity(model: torch.nn.Module, data: EncodedRecords, batch_size: int = 32) -> float:
    return math.exp(mean_token_loss(model, data, batch_size))


def split_prompt(prompt: str) -> tuple[str, str]:
    """(stem, gap): whitespace before the answer belongs to the answer's first token in
    byte-level BPE, so it moves from the prompt to every continuation (a prompt without
    trailing whitespace gets a space)."""
    stem = prompt.rstrip()
    return stem, prompt[len(stem) :] or " "


def encode_continuations(tokenizer, gap: str, continuations: Sequence[str]) -> list[list[int]]:
    """Token ids of each continuation after ``gap``, in one batched tokenizer call (scoring the
    same candidates after many prompts can reuse them)."""
    texts = [gap + c for c in continuations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _encode_prompt(
    tokenizer, prompt: str, continuations: Sequence[str], limit: int, tails=None
) -> tuple[list[int], list[list[int]]]:
    stem, gap = split_prompt(prompt)
    prefix = [bos_id(tokenizer)] + tokenizer(stem, add_special_tokens=False)["input_ids"]
    if tails is None:
        tails = encode_continuations(tokenizer, gap, continuations)
    longest = max(len(t) for t in tails)
    return prefix[-(limit - longest) :], tails


def _position_limit(model: torch.nn.Module) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer,
    prompt: str,
    continuations: Sequence[str],
    tails: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Sum of log p(continuation tokens | prompt) for each continuation.

    The prompt is run once and its key/value cache shared by every continuation, so scoring
    50 drug names costs one long forward pass and one short batched one. ``tails`` may carry
    the continuations' ids from :func:`encode_continuations` (with the prompt's own gap).
    """
    device = next(model.parameters()).device
    limit = _position_limit(model)
    prefix, tails = _encode_prompt(tokenizer, prompt, continuations, limit, tails)
    n, width = len(tails), max(len(t) for t in tails)
    prompt_ids = torch.tensor([prefix], device=device)
    out = model(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    # transformers 5.2x names the key/value cache `cache`; earlier 5.x (GPU images) past_key_values
    name = "cache" if hasattr(out, "cache") else "past_key_values"
    cache = getattr(out, name)
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, len(prefix) + width, dtype=torch.long)
    mask[:, : len(prefix)] = 1
    for row, tail in enumerate(tails):
        ids[row, : len(tail)] = torch.tensor(tail)
        mask[row, len(prefix) : len(prefix) + len(tail)] = 1
    positions = torch.arange(len(prefix), len(prefix) + width).expand(n, -1)
    ids, mask = ids.to(device), mask.to(device)
    logits = (
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions.to(device),
            **{name: cache},
        )
        .logits[:, :-1]
        .float()
    )
    # log p(next token) = logit - logsumexp: no full log-softmax tensor (10k candidates x V).
    targets = ids[:, 1:]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    scored = mask[:, len(prefix) + 1 :].to(logp.dtype)  # tokens after each tail's first
    scores = first[ids[:, 0]] + (logp * scored).sum(-1)
    return scores.cpu()


@torch.no_grad()
def continuation_logprobs_uncached(
    model: torch.nn.Module, tokenizer, prompt: str, continuations: Sequence[str]
) -> torch.Tensor:
    """Reference implementation (prompt repeated per continuation), for tests."""
    device = next(model.parameters()).device
    prefix, tails = _encode_prompt(tokenizer, prompt, continuations, _position_limit(model))
    scores = []
    for tail in tails:
        ids = torch.tensor([prefix + tail], device=device)
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, len(prefix) :]
        scores.append(logp[len(prefix) - 1 :].gather(-1, targets[:, None]).sum())
    return torch.stack(scores).cpu()


def medication_choices(
    model: torch.nn.Module, tokenizer, records: Sequence[dict], candidates: Sequence[str]
) -> list[str]:
    """The drug the model scores highest after each record's prompt."""
    choices = []
    for record in records:
        scores = continuation_logprobs(model, tokenizer, record["med_prompt"], candidates)
        choices.append(candidates[int(scores.argmax())])
    return choices


def medication_outcomes(
    records: Sequence[dict], choices: Sequence[str], allowed: dict[str, Sequence[str]]
) -> tuple[list[bool], list[bool]]:
    """Per record: whether the choice is consistent with the diagnosis, and whether it is the
    drug the note named."""
    consistent = [c in allowed[r["icd10"]] for r, c in zip(records, choices, strict=True)]
    exact = [c == r["medication"] for r, c in zip(records, choices, strict=True)]
    return consistent, exact


def medication_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    candidates: Sequence[str],
    allowed: dict[str, Sequence[str]],
) -> dict[str, float]:
    """Top-1 accuracy (consistent with the diagnosis) and exact match of the drug choice."""
    choices = medication_choices(model, tokenizer, records, candidates)
    return medication_summary(records, choices, candidates, allowed)


def medication_summary(
    records: Sequence[dict],
    choices: Sequence[str],
    candidates: Sequence[str],
    allowed: dict[str, Sequence[str]],
) -> dict[str, float]:
    consistent, exact = medication_outcomes(records, choices, allowed)
    n = max(len(records), 1)
    chance = sum(len(allowed[r["icd10"]]) for r in records) / (n * len(candidates))
    return {
        "medication_accuracy": sum(consistent) / n,
        "medication_exact_match": sum(exact) / n,
        "medication_chance": chance,
    }


def evaluate_scored(
    model: torch.nn.Module,
    tokenizer,
    test_records: Sequence[dict],
    max_length: int,
    batch_size: int = 32,
    task: EvaluateParams | None = None,
    train_records: Sequence[dict] = (),
) -> tuple[dict[str, Any], dict[str, RecordScores]]:
    """:func:`evaluate_model`'s metrics and, for each metric a promotion may compare, its
    per-record parts (record_scores: what a paired comparison of two models resamples)."""
    from privtune.downstream import downstream_evaluation

    model.eval()
    data = encode_records([r["text"] for r in test_records], tokenizer, max_length)
    sums, counts = record_token_nll(model, data, batch_size)
    perplexity_scores = RecordScores(tuple(sums), tuple(map(float, counts)), exponentiate=True)
    metrics: dict[str, Any] = {"test_perplexity": perplexity_scores.value()}
    scores = {"test_perplexity": perplexity_scores}
    found, task_scores = downstream_evaluation(model, tokenizer, test_records, train_records, task)
    return metrics | found, scores | task_scores


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    test_records: Sequence[dict],
    max_length: int,
    batch_size: int = 32,
    task: EvaluateParams | None = None,
    train_records: Sequence[dict] = (),
) -> dict[str, Any]:
    """Test perplexity and the downstream task (``task``: the `evaluate` params; None = the
    medication task where the records carry its fields) of one model on the test split."""
    return evaluate_scored(
        model, tokenizer, test_records, max_length, batch_size, task, train_records
    )[0]
