"""The privacy ledger: one entry per noisy step, the single source of truth for epsilon.

Two noise mechanisms can appear: "gaussian" (the default; the entry's noise_multiplier is the
step's effective z) and "lmo" (LMO-DP noise on an L1-clipped sum; the entry carries the noise
law's parameters, in units of its clip, and noise_multiplier is only the per-coordinate noise
std over the clip, for logs). The accountant composes both (see accountant.ledger_epsilon).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from privtune.io import read_json, write_json
from privtune.privacy.lmo_mechanism import LMOParams

MECHANISMS = ("gaussian", "lmo")
GaussianSegment = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
LMOSegment = tuple[LMOParams, float, int]  # (noise law, sample rate, steps)


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
    mechanism: str = "gaussian"
    # How many counts of that std the step released (1: the unclipped count; K*L: a histogram)
    count_dims: int = 1
    # LMO steps only: LMOParams.to_dict() of the law drawn, in units of the (L1) clip.
    lmo_params: dict[str, float] | None = None

    def lmo(self) -> LMOParams:
        """The LMO noise law of an "lmo" step; a clear error for a malformed entry."""
        if self.mechanism != "lmo":
            raise ValueError(f"ledger step {self.step} is a {self.mechanism} step, not lmo")
        if not self.lmo_params:
            raise ValueError(f"ledger step {self.step}: an lmo step needs its lmo_params")
        try:
            return LMOParams.from_dict(self.lmo_params)
        except (KeyError, TypeError) as err:
            raise ValueError(f"ledger step {self.step}: malformed lmo_params ({err})") from None


@dataclass
class PrivacyLedger:
    """Append-only record of (sample rate, noise) per step, saved with the model."""

    entries: list[LedgerEntry] = field(default_factory=list)

    def record(self, entry: LedgerEntry) -> None:
        if not (entry.noise_multiplier > 0 and entry.sample_rate > 0):  # NaN fails too
            raise ValueError("a private step needs noise_multiplier > 0 and sample_rate > 0")
        if entry.mechanism not in MECHANISMS:
            raise ValueError(
                f"unknown noise mechanism '{entry.mechanism}': use one of {', '.join(MECHANISMS)}"
            )
        if entry.mechanism == "lmo":
            entry.lmo()  # refuse a step the accountant could not compose
        elif entry.lmo_params is not None:
            raise ValueError("a gaussian step must not carry lmo_params")
        self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def segments(self) -> list[GaussianSegment]:
        """Run-length encode to (noise_multiplier, sample_rate, steps), opacus' history form.

        Gaussian ledgers only: an LMO step has no noise multiplier to compose, so a ledger
        holding one is refused (use split_segments / accountant.ledger_epsilon)."""
        if any(e.mechanism != "gaussian" for e in self.entries):
            raise ValueError(
                "this ledger holds non-Gaussian (lmo) steps: compose it with "
                "accountant.ledger_epsilon, not as Gaussian segments"
            )
        keyed = ((e.noise_multiplier, e.sample_rate) for e in self.entries)
        return [(z, q, sum(1 for _ in run)) for (z, q), run in groupby(keyed)]

    def split_segments(self) -> tuple[list[GaussianSegment], list[LMOSegment]]:
        """Run-length encoded Gaussian and LMO steps (RDP composition does not need order)."""
        gaussian: list[GaussianSegment] = []
        lmo: list[LMOSegment] = []
        for key, run in groupby(self.entries, key=_segment_key):
            n = sum(1 for _ in run)
            if key[0] == "lmo":
                lmo.append((key[1], key[2], n))
            else:
                gaussian.append((key[1], key[2], n))
        return gaussian, lmo

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        ledger = cls()
        for e in state["entries"]:
            ledger.record(
                LedgerEntry(
                    step=e["step"],
                    sample_rate=e["sample_rate"],
                    noise_multiplier=e["noise_multiplier"],
                    clip_thresholds=tuple(e["clip_thresholds"]),
                    noise_stds=tuple(e["noise_stds"]),
                    batch_size=e["batch_size"],
                    count_noise_std=e.get("count_noise_std"),  # absent in ledgers saved before
                    mechanism=e.get("mechanism", "gaussian"),
                    lmo_params=e.get("lmo_params"),
                    count_dims=e.get("count_dims", 1),
                )
            )
        return ledger

    def save(self, path: str | Path) -> None:
        write_json(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        return cls.from_state_dict(read_json(path))


def _segment_key(entry: LedgerEntry) -> tuple[Any, ...]:
    if entry.mechanism == "lmo":
        return ("lmo", entry.lmo(), entry.sample_rate)
    return ("gaussian", entry.noise_multiplier, entry.sample_rate)
