"""Readers shared by stages: prepared splits, the data hash and the base model."""

from __future__ import annotations

from pathlib import Path

from privtune import io
from privtune.config import (
    BASE_DIR,
    CHECKPOINTS_DIR,
    METRICS_DIR,
    MODELS_DIR,
    PLOTS_DIR,
    PREPARED_DIR,
    Params,
)
from privtune.errors import DataError, ModelError
from privtune.io import read_input  # the stages import it from here

OUTPUT_FOLDERS = (PREPARED_DIR.parent, MODELS_DIR, METRICS_DIR, PLOTS_DIR, Path("reports"))


def remove_stale_outputs(root: Path) -> list[Path]:
    """The temporary outputs (`.<name>.tmp-<pid>-*`) and checkpoint files of processes that
    were killed while writing them: removed when the next stage starts."""
    removed = []
    for folder in (*OUTPUT_FOLDERS, CHECKPOINTS_DIR):
        removed += io.remove_stale_tmp(root / folder)
    return removed


BASE_INFO = "privtune.json"
"""In models/base: the source and the max_length the base stage fixed (`auto` resolved)."""


PREPARE_AGAIN = "rebuild it: `dvc repro prepare` (or `dvc checkout` the tracked version)"


def read_split(root: Path, name: str) -> list[dict]:
    path = root / PREPARED_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(str(path), "missing prepared split", "run `dvc repro prepare` first")
    return read_input(path, io.read_jsonl, PREPARE_AGAIN)


def evaluated_split(root: Path, params: Params) -> list[dict]:
    """The test notes every evaluation scores: the first `evaluate.max_records` (all: null)."""
    return read_split(root, "test")[: params.evaluate.max_records]


def data_hash(root: Path) -> str:
    card = root / PREPARED_DIR / "data_card.json"
    if not card.is_file():
        raise DataError(str(card), "missing data card", "run `dvc repro prepare` first")
    return read_input(card, _content_sha256, PREPARE_AGAIN)


def _content_sha256(card: Path) -> str:
    return str(io.read_json(card)["content_sha256"])


def fine_tuned_dir(root: Path, name: str) -> tuple[Path, str]:
    """``models/<name>`` of a finished fine-tuning whose adapter weights are complete (a copy
    cut short is named, not loaded), and the fix to name should a file in it be unreadable."""
    from privtune.modeling import check_weights

    model_dir = root / MODELS_DIR / name
    if not (model_dir / "finetune.json").is_file():
        raise ModelError(
            str(model_dir), "fine-tuned model missing", f"run `dvc repro finetune@{name}` first"
        )
    weights = model_dir / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(
            str(model_dir), "adapter weights missing", f"run `dvc repro finetune@{name}` again"
        )
    check_weights(weights, str(model_dir))
    again = f"rebuild it: `dvc repro finetune@{name}` (or `dvc checkout` the tracked version)"
    return model_dir, again


def load_base(root: Path):
    from privtune.modeling import load_pretrained

    if not (root / BASE_DIR).is_dir():
        raise ModelError(str(BASE_DIR), "base model missing", "run `dvc repro base` first")
    return load_pretrained(root / BASE_DIR, field=str(BASE_DIR))


def resolved_max_length(params: Params, root: Path) -> int:
    """Tokens per record for every stage after `base`: base.max_length, or for `auto` the
    value the base stage derived from the data."""
    if params.base.max_length != "auto":
        return params.base.max_length
    info = root / BASE_DIR / BASE_INFO
    if not info.is_file():
        raise ModelError(
            str(BASE_DIR),
            "base.max_length is auto but the base model has no resolved value",
            "run `dvc repro base` first",
        )
    return read_input(info, _max_length, "rebuild it: `dvc repro base`", ModelError)


def _max_length(info: Path) -> int:
    return int(io.read_json(info)["max_length"])
