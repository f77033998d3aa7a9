"""Non-private pretraining of the base model on the public split only."""

from __future__ import annotations

import math

import torch
from transformers import get_cosine_schedule_with_warmup

from privtune.config import BaseParams
from privtune.data.tokenization import EncodedRecords
from privtune.losses import mean_token_loss, next_token_logits, per_sample_loss
from privtune.progress import progress_bar


def pretrain(
    model: torch.nn.Module,
    data: EncodedRecords,
    params: BaseParams,
    device: torch.device,
    show_progress: bool = True,
) -> list[float]:
    """Plain AdamW on public text; returns the loss every 10 steps."""
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, params.steps // 20), params.steps)
    losses: list[float] = []
    with progress_bar(show_progress) as progress:
        task = progress.add_task("pretrain base", total=params.steps, status="")
        for step in range(params.steps):
            index = torch.randint(len(data), (params.batch_size,), generator=generator)
            batch = {k: v.to(device) for k, v in data.batch(index).items()}
            logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"])
            loss = per_sample_loss(logits, batch["labels"], params.label_smoothing).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 10 == 0:
                losses.append(loss.item())
                progress.update(task, status=f"loss {losses[-1]:.3f}")
            progress.advance(task)
    model.eval()
    return losses


def public_perplexity(model: torch.nn.Module, data: EncodedRecords) -> float:
    return math.exp(mean_token_loss(model, data))
