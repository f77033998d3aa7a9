"""Token-level negative log-likelihood, shared by training and evaluation."""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _takes_logits_to_keep(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM under opacus' GradSampleModule and peft's PeftModel wrappers."""
    while True:
        if hasattr(model, "_module"):  # opacus GradSampleModule
            model = model._module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def next_token_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B, T-1, V) logits of positions 0..T-2, each predicting the next token.

    The last position predicts nothing: asking the model not to compute it (transformers'
    ``logits_to_keep``) also spares the backward pass a zero-filled copy of every logit,
    about a tenth of a small model's training step.
    """
    if _takes_logits_to_keep(type(_innermost(model))):
        keep = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction and its mask, both (B, T-1).

    ``logits`` are either the model's (B, T, V) or :func:`next_token_logits`' (B, T-1, V).
    """
    shift_logits = logits[:, :-1] if logits.shape[1] == labels.shape[1] else logits
    shift_logits = shift_logits.float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.clamp(min=0).reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view_as(shift_labels)
    return nll * mask, mask


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean token NLL of each record: the per-example loss whose gradient is clipped."""
    nll, mask = token_nll(logits, labels, label_smoothing)
    return nll.sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def record_token_nll(
    model: torch.nn.Module, data, batch_size: int = 32
) -> tuple[list[float], list[int]]:
    """Each record's summed token NLL and the number of tokens it scores (over EncodedRecords):
    the parts of the test perplexity that a paired comparison resamples."""
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(data), batch_size):
        batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"])
        nll, mask = token_nll(logits, batch["labels"])
        sums += nll.double().sum(1).tolist()
        counts += mask.sum(1).tolist()
    return sums, counts


def mean_token_loss(model: torch.nn.Module, data, batch_size: int = 32) -> float:
    """Token-level mean NLL over EncodedRecords (its exp is the perplexity)."""
    sums, counts = record_token_nll(model, data, batch_size)
    return math.fsum(sums) / max(sum(counts), 1)
