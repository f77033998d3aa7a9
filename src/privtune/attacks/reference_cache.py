"""The reference (base) model's attack scores, kept for every method fine-tuned from it.

Calibrated exposure and the reference membership score need the base model's scores of the
same canaries and records for every method's attack; a project computes them once. A file is
keyed by everything its scores depend on (the base's files, what was scored, how it was
batched, the device kind and on CUDA the GPU model, privtune's code and the libraries that
score), none of which is a DVC input of the file: it lives in `.privtune/cache/`, outside the
stages' outputs. Files hold numbers under canary ids or in record order, never text.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privtune.io import atomic_file

CACHE_DIR = Path(".privtune/cache")  # a project's own, beside the checkpoints (git-ignored)


@dataclass(frozen=True)
class ReferenceCache:
    """Where one project keeps one reference model's scores on one kind of device."""

    directory: Path
    key: tuple[str, ...]

    @classmethod
    def for_project(cls, root: Path, base_sha256: str, device: torch.device) -> ReferenceCache:
        """The cache of the base model whose files hash to ``base_sha256``, scored on
        ``device`` by this checkout's code and libraries."""
        import tokenizers
        import transformers

        from privtune.io import code_sha256

        libraries = (torch.__version__, transformers.__version__, tokenizers.__version__)
        return cls(
            root / CACHE_DIR, (base_sha256, _device_model(device), code_sha256(), *libraries)
        )

    def path(self, kind: str, *parts: Any) -> Path:
        """The file of ``kind`` ("exposure", "membership") scores keyed by ``parts`` (what was
        scored and how: JSON-serialisable)."""
        digest = hashlib.sha256(json.dumps([*self.key, kind, *parts]).encode()).hexdigest()
        return self.directory / f"{kind}-reference-{digest[:32]}.pt"


def _device_model(device: torch.device) -> str:
    """The device's kind, and on CUDA its model and CUDA version: two GPU models (a checkout
    shared by an H100 and an H200 worker) score the same text to different last bits."""
    if device.type != "cuda":
        return device.type
    return f"cuda:{torch.cuda.get_device_name(device)}:{torch.version.cuda}"


def texts_digest(texts: Sequence[str]) -> str:
    """One hash of the scored texts, in order (a cache key that holds no text)."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def read_scores(path: Path | None, usable: Callable[[Any], bool]) -> Any | None:
    """The file's scores when it exists, loads and ``usable(scores)`` says they fit; None
    otherwise (they are scored again and the file rewritten)."""
    if path is None or not path.is_file():
        return None
    try:
        scores = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    return scores if usable(scores) else None


def write_scores(path: Path, scores: Any) -> None:
    """Write whole or not at all (a concurrent stage of another method writes the same)."""
    with atomic_file(path, "wb") as handle:
        torch.save(scores, handle)
