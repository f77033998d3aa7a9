"""The privacy ledger: one entry per noisy step, the single source of truth for epsilon."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from privtune.io import read_json, write_json


@dataclass(frozen=True)
class LedgerEntry:
    step: int
    sample_rate: float
    noise_multiplier: float  # effective z of the whole step (see mechanisms.effective_noise)
    clip_thresholds: tuple[float, ...]
    noise_stds: tuple[float, ...]
    batch_size: int
    # Std of the noisy unclipped count released in the same step (adaptive quantile clipping);
    # None when no count was released. noise_multiplier already includes its cost.
    count_noise_std: float | None = None


@dataclass
class PrivacyLedger:
    """Append-only record of (sample rate, effective noise) per step, saved with the model."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def record(self, entry: LedgerEntry) -> None:
        if entry.noise_multiplier <= 0 or entry.sample_rate <= 0:
            raise ValueError("a private step needs noise_multiplier > 0 and sample_rate > 0")
        self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def segments(self) -> list[tuple[float, float, int]]:
        """Run-length encode to (noise_multiplier, sample_rate, steps), opacus' history form."""
        keyed = ((e.noise_multiplier, e.sample_rate) for e in self.entries)
        return [(z, q, sum(1 for _ in run)) for (z, q), run in groupby(keyed)]

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        entries = [
            LedgerEntry(
                step=e["step"],
                sample_rate=e["sample_rate"],
                noise_multiplier=e["noise_multiplier"],
                clip_thresholds=tuple(e["clip_thresholds"]),
                noise_stds=tuple(e["noise_stds"]),
                batch_size=e["batch_size"],
                count_noise_std=e.get("count_noise_std"),  # absent in ledgers saved before it
            )
            for e in state["entries"]
        ]
        return cls(entries)

    def save(self, path: str | Path) -> None:
        write_json(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        return cls.from_state_dict(read_json(path))
