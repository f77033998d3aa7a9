"""Extraction: does generating from a canary's prefix reproduce its secret verbatim?

Greedy decoding asks for the model's single best guess; sampling (temperature 1, no top-k or
top-p truncation) asks how often the model's own distribution emits the secret.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from privtune.attacks.scoring import model_max_length
from privtune.data.canaries import Canary
from privtune.data.tokenization import bos_id, ensure_pad_token
from privtune.modeling import quiet_padding_warning


@dataclass(frozen=True)
class CanaryExtraction:
    """How often one canary's secret came out (counts only, never the generated text)."""

    id: str
    repetitions: int
    greedy: bool
    sampled_hits: int
    samples: int


def reproduces(generated: str, secret: str) -> bool:
    """Whether generated text begins with the secret (after spacing) and does not run on."""
    text = generated.lstrip()
    if not text.startswith(secret):
        return False
    rest = text[len(secret) :]
    return not (rest[:1].isdigit())


@torch.no_grad()
def _generate(model, tokenizer, canary: Canary, samples: int, sample: bool) -> list[str]:
    stem = canary.prefix.rstrip()
    gap = canary.prefix[len(stem) :] or " "
    answer = tokenizer(gap + canary.secret, add_special_tokens=False)["input_ids"]
    new_tokens = len(answer) + 2
    prompt = [bos_id(tokenizer)] + tokenizer(stem, add_special_tokens=False)["input_ids"]
    prompt = prompt[-(model_max_length(model) - new_tokens) :]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    options = {"do_sample": False, "num_beams": 1}
    if sample:
        options = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    with quiet_padding_warning():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return tokenizer.batch_decode(out[:, len(prompt) :], skip_special_tokens=True)


def canary_extraction(
    model: torch.nn.Module,
    tokenizer,
    canaries: Sequence[Canary],
    samples: int = 4,
    seed: int = 0,
    on_canary: Callable[[], None] | None = None,
) -> list[CanaryExtraction]:
    """Greedy and ``samples`` seeded samples from each canary's prefix, scored for the secret.

    The global torch random state is left as it was.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    ensure_pad_token(tokenizer)
    model.eval()
    results = []
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for canary in canaries:
            greedy = reproduces(_generate(model, tokenizer, canary, 1, False)[0], canary.secret)
            hits = 0
            if samples:
                texts = _generate(model, tokenizer, canary, samples, True)
                hits = sum(reproduces(text, canary.secret) for text in texts)
            results.append(CanaryExtraction(canary.id, canary.repetitions, greedy, hits, samples))
            if on_canary is not None:
                on_canary()
    return results
