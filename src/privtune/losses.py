"""Token-level negative log-likelihood, shared by training and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of next-token prediction and its mask, both (B, T-1)."""
    shift_logits = logits[:, :-1].float()
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
