"""Stage `base`: the tokenizer and base model, pretrained here on public text, converted from
a packaged GGUF file, or loaded from a local directory."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import BASE_DIR, METRICS_DIR, SOURCE_BUILD, BaseParams, Params
from privtune.errors import ConfigError, ModelError
from privtune.stages.common import BASE_INFO, evaluated_split, read_split


def checked_source(b: BaseParams, root: Path):
    """`build`, a packaged GGUF's file, or a local directory: validated before any output."""
    from privtune.sources import PACKAGED, locate

    if b.source == SOURCE_BUILD:
        return SOURCE_BUILD
    if b.source in PACKAGED:
        return PACKAGED[b.source], locate(PACKAGED[b.source])
    path = Path(b.source)
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        known = ", ".join([SOURCE_BUILD, *PACKAGED])
        raise ModelError(
            "base.source",
            f"'{b.source}' is neither a known source ({known}) nor a directory",
            "name a known source or a directory written by save_pretrained",
        )
    from privtune.modeling import check_model_dir

    check_model_dir(path, "base.source")  # config and weights complete, before any output
    return path


def resolve_max_length(
    b: BaseParams, tokenizer, texts: list[str], limit: int | None = None
) -> tuple[int, str]:
    """Tokens per record, and how it was chosen: `auto` takes a high percentile of the train
    records' lengths ([bos] text [eos]) so that long outliers do not set every batch's width."""
    from privtune.data.tokenization import length_percentile

    if b.max_length == "auto":
        value = max(16, length_percentile(texts, tokenizer, b.max_length_percentile))
        rule = f"auto: {b.max_length_percentile:g}th percentile of {len(texts)} train records"
        if limit is not None and value > limit:
            value, rule = limit, rule + f", capped at the model's {limit} positions"
        return value, rule
    if limit is not None and b.max_length > limit:
        raise ConfigError(
            "base.max_length",
            f"{b.max_length} tokens exceed the model's {limit} positions",
            f"set it to at most {limit}, or to auto",
        )
    return b.max_length, "base.max_length"


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Bitwise-reproducible torch inside: deterministic algorithms and a fixed thread count
    (CPU kernels split their reductions by thread), so two machines or two fresh clones with
    the pinned environment write the same models/base."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def base(params: Params, root: Path = Path("."), show_progress: bool = True) -> dict[str, Any]:
    """Build the base model (pretrain a small GPT-2, convert a packaged GGUF, or load a local
    directory), save it, then evaluate it on the (bounded) test split."""
    import torch

    with deterministic(params.base.threads):
        # torch's default generator starts from a random seed: the model's initial weights
        # come from base.seed, not from the process
        torch.manual_seed(params.base.seed)
        return _base(params, root, show_progress)


def _base(params: Params, root: Path, show_progress: bool) -> dict[str, Any]:
    from privtune.data.tokenization import encode_records, train_tokenizer
    from privtune.downstream import check_task
    from privtune.evaluate import evaluate_model
    from privtune.modeling import build_gpt2, load_pretrained, position_limit, resolve_device
    from privtune.pretrain import pretrain, public_perplexity
    from privtune.sources import check_serialisable, convert_gguf

    b = params.base
    device = resolve_device(b.device, "base.device")
    source = checked_source(b, root)
    train = read_split(root, "train")
    train_texts = [r["text"] for r in train]
    test = evaluated_split(root, params)
    check_task(test, train, params.evaluate)  # before pretraining, not after
    metrics: dict[str, Any] = {}
    if source == SOURCE_BUILD:
        public = [r["text"] for r in read_split(root, "public")]
        tokenizer = train_tokenizer(public, b.vocab_size)
        max_length, rule = resolve_max_length(b, tokenizer, train_texts)
        b = b.model_copy(update={"max_length": max_length})
        model = build_gpt2(b, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        n_valid = max(1, len(public) // 20)
        encoded = encode_records(public, tokenizer, max_length)
        pretrain(model, encoded.slice(n_valid), b, device, show_progress)
        metrics["public_valid_perplexity"] = public_perplexity(model, encoded.slice(0, n_valid))
        metrics["source"] = "pretrained here on the public split"
    else:
        if isinstance(source, Path):
            model, tokenizer = load_pretrained(source)
        else:
            packaged, gguf_file = source
            start = time.perf_counter()
            model, tokenizer = convert_gguf(gguf_file, packaged.document_token)
            metrics["conversion_seconds"] = round(time.perf_counter() - start, 1)
        metrics["source"] = b.source
        max_length, rule = resolve_max_length(b, tokenizer, train_texts, position_limit(model))
    metrics["architecture"] = model.config.model_type
    metrics["max_length"] = max_length
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    with io.atomic_dir(root / BASE_DIR) as out:
        # Saved and checked before the evaluation, which is the expensive part on a CPU.
        model.to("cpu").save_pretrained(out)
        tokenizer.save_pretrained(out)
        check_serialisable(out)
        io.write_json(
            out / BASE_INFO,
            {"source": b.source, "max_length": max_length, "max_length_rule": rule},
        )
        model.to(device)
        metrics["test_records"] = len(test)
        metrics |= evaluate_model(
            model,
            tokenizer,
            test,
            max_length,
            params.evaluate.batch_size,
            task=params.evaluate,
            train_records=train,
        )
    io.write_json(root / METRICS_DIR / "base.json", metrics)
    return metrics
