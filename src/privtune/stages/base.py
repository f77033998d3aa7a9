"""Stage `base`: the tokenizer and base model, pretrained here on public text or loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import BASE_DIR, METRICS_DIR, Params
from privtune.stages.common import read_split


def base(params: Params, root: Path = Path("."), show_progress: bool = True) -> dict[str, Any]:
    """Build the base model: pretrain a small GPT-2 on public text, or load a local model."""
    from privtune.data.tokenization import encode_records, train_tokenizer
    from privtune.evaluate import evaluate_model
    from privtune.modeling import build_gpt2, load_pretrained, resolve_device
    from privtune.pretrain import pretrain, public_perplexity

    b = params.base
    device = resolve_device(b.device)
    public = [r["text"] for r in read_split(root, "public")]
    metrics: dict[str, Any] = {}
    if b.pretrained_path:
        path = Path(b.pretrained_path)
        model, tokenizer = load_pretrained(path if path.is_absolute() else root / path)
        metrics["source"] = str(b.pretrained_path)
    else:
        tokenizer = train_tokenizer(public, b.vocab_size)
        model = build_gpt2(b, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        n_valid = max(1, len(public) // 20)
        encoded = encode_records(public, tokenizer, b.max_length)
        pretrain(model, encoded.slice(n_valid), b, device, show_progress)
        metrics["public_valid_perplexity"] = public_perplexity(model, encoded.slice(0, n_valid))
        metrics["source"] = "pretrained here on the public split"
    model.to(device)
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics |= evaluate_model(
        model, tokenizer, read_split(root, "test"), b.max_length, params.evaluate.batch_size
    )
    with io.atomic_dir(root / BASE_DIR) as out:
        model.to("cpu").save_pretrained(out)
        tokenizer.save_pretrained(out)
    io.write_json(root / METRICS_DIR / "base.json", metrics)
    return metrics
