"""Readers shared by stages: prepared splits, the data hash and the base model."""

from __future__ import annotations

from pathlib import Path

from privtune import io
from privtune.config import BASE_DIR, PREPARED_DIR
from privtune.errors import DataError, ModelError


def read_split(root: Path, name: str) -> list[dict]:
    path = root / PREPARED_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(str(path), "missing prepared split", "run `dvc repro prepare` first")
    return io.read_jsonl(path)


def data_hash(root: Path) -> str:
    return io.read_json(root / PREPARED_DIR / "data_card.json")["content_sha256"]


def load_base(root: Path):
    from privtune.modeling import load_pretrained

    if not (root / BASE_DIR).is_dir():
        raise ModelError(str(BASE_DIR), "base model missing", "run `dvc repro base` first")
    return load_pretrained(root / BASE_DIR, field=str(BASE_DIR))
