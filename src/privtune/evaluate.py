"""Utility metrics: test perplexity and medication-consistency accuracy.

Medication accuracy (the downstream task): for each test note, take its text up to the point
where the plan names the prescribed drug, score every drug name of the formulary as the
continuation (sum of token log-probabilities), and count the note correct when the top-scored
drug is a first-line treatment of the note's diagnosis. Chance level is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from privtune.data.tokenization import EncodedRecords, encode_records
from privtune.train import mean_token_loss


def perplexity(model: torch.nn.Module, data: EncodedRecords, batch_size: int = 32) -> float:
    return math.exp(mean_token_loss(model, data, batch_size))


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module, tokenizer, prompt: str, continuations: Sequence[str]
) -> torch.Tensor:
    """Sum of log p(continuation tokens | prompt) for each continuation, in one batch."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    # Whitespace before the answer belongs to the answer's first token in byte-level BPE.
    stem = prompt.rstrip()
    gap = prompt[len(stem) :] or " "
    prefix = [bos] + tokenizer(stem, add_special_tokens=False)["input_ids"]
    tails = [tokenizer(gap + c, add_special_tokens=False)["input_ids"] for c in continuations]
    limit = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", 1024
    )
    longest = max(len(t) for t in tails)
    prefix = prefix[-(limit - longest) :]
    width = len(prefix) + longest
    ids = torch.full((len(tails), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tail in enumerate(tails):
        seq = prefix + tail
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:].to(device)
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    scores = []
    start = len(prefix) - 1  # position predicting the first tail token
    for row, tail in enumerate(tails):
        scores.append(token_logp[row, start : start + len(tail)].sum())
    return torch.stack(scores).cpu()


def medication_accuracy(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    candidates: Sequence[str],
    allowed: dict[str, Sequence[str]],
) -> dict[str, float]:
    """Top-1 accuracy (consistent with the diagnosis) and exact match of the drug choice."""
    consistent = exact = 0
    for record in records:
        scores = continuation_logprobs(model, tokenizer, record["med_prompt"], candidates)
        choice = candidates[int(scores.argmax())]
        consistent += choice in allowed[record["icd10"]]
        exact += choice == record["medication"]
    n = max(len(records), 1)
    chance = sum(len(allowed[r["icd10"]]) for r in records) / (n * len(candidates))
    return {
        "medication_accuracy": consistent / n,
        "medication_exact_match": exact / n,
        "medication_chance": chance,
    }


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    test_records: Sequence[dict],
    max_length: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """All utility metrics of one model on the private test split."""
    from privtune.data.generator import ALL_MEDICATION_NAMES, CONDITIONS

    model.eval()
    data = encode_records([r["text"] for r in test_records], tokenizer, max_length)
    metrics = {"test_perplexity": perplexity(model, data, batch_size)}
    task = [r for r in test_records if r.get("med_prompt") and r.get("icd10")]
    if task:
        allowed = {c.icd10: c.medications for c in CONDITIONS}
        task = [r for r in task if r["icd10"] in allowed]
        metrics |= medication_accuracy(model, tokenizer, task, ALL_MEDICATION_NAMES, allowed)
    return metrics
