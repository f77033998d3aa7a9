"""What the training loop does besides training, as callbacks (after stable-baselines3's).

``on_step`` returns False to stop training. The loop calls, in order: ``on_decision`` after a
controller's decision, ``on_step`` after every optimizer step, ``on_training_end`` once. The
white-box audit is not a callback: it reads the released gradient, so it is the privacy
engine's release hook (privacy.engine).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from privtune.data.tokenization import EncodedRecords
from privtune.losses import mean_token_loss
from privtune.privacy.engine import PrivacyEngine
from privtune.privacy.mechanisms import StepStats

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class StepInfo:
    loss: float  # mean per-record training loss of the batch (logs only: not DP)
    lr: float
    stats: StepStats
    last: bool  # the plan's last step


class Callback:
    def on_decision(self, step: int, metrics: dict[str, float]) -> None:
        """A controller decided (``metrics``: its reward, fallbacks...)."""

    def on_step(self, step: int, info: StepInfo) -> bool:
        return True

    def on_training_end(self) -> None:
        """Training is over (the final evaluation and accounting follow)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of this callback (checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class CallbackList(Callback):
    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_decision(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_decision(step, metrics)

    def on_step(self, step: int, info: StepInfo) -> bool:
        # every callback sees every step, even after one of them asked to stop
        return all([callback.on_step(step, info) for callback in self.callbacks])

    def on_training_end(self) -> None:
        for callback in self.callbacks:
            callback.on_training_end()

    def state_dict(self) -> dict[str, Any]:
        return {"callbacks": [callback.state_dict() for callback in self.callbacks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback, saved in zip(self.callbacks, state["callbacks"], strict=True):
            callback.load_state_dict(saved)


class Validation(Callback):
    """Validation loss every ``every`` steps and at the last step, on ``data``."""

    def __init__(self, model: torch.nn.Module, data: EncodedRecords, every: int) -> None:
        self.model = model
        self.data = data
        self.every = every
        self.last = math.nan  # the latest validation loss
        self.fresh = False  # measured at this step

    def on_step(self, step: int, info: StepInfo) -> bool:
        self.fresh = step % self.every == 0 or info.last
        if self.fresh:
            self.last = mean_token_loss(self.model, self.data)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = state["last"]


class MetricsLogger(Callback):
    """The run's history (rows every ``every`` steps and at every validation), sent to
    ``sink`` (MLflow) with the controllers' decision metrics."""

    def __init__(
        self,
        engine: PrivacyEngine,
        validation: Validation,
        every: int,
        sink: LogFn | None = None,
    ) -> None:
        self.engine = engine
        self.validation = validation
        self.every = every
        self.sink = sink
        self.history: list[dict[str, float]] = []
        self.row: dict[str, float] | None = None  # the row of this step, if any

    def on_decision(self, step: int, metrics: dict[str, float]) -> None:
        if self.sink and metrics:
            self.sink(metrics, step)

    def on_step(self, step: int, info: StepInfo) -> bool:
        self.row = None
        if step % self.every == 0 or self.validation.fresh:
            row: dict[str, float] = {"step": step, "loss": info.loss, "lr": info.lr}
            if self.validation.fresh:
                row["valid_loss"] = self.validation.last
            row |= self.engine.step_metrics(info.stats)
            self.history.append(row)
            if self.sink:
                self.sink({k: v for k, v in row.items() if k != "step"}, step)
            self.row = row
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


class ProgressCallback(Callback):
    """Steps, ETA and the latest loss (and epsilon) on the console."""

    def __init__(
        self,
        progress: Progress,
        description: str,
        total: int,
        logger: MetricsLogger,
        completed: int = 0,
    ) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total, completed=completed, status="")
        self.logger = logger

    def on_step(self, step: int, info: StepInfo) -> bool:
        row = self.logger.row
        if row is not None:
            status = f"loss {row['loss']:.3f}"
            if "epsilon" in row:
                status += f" eps {row['epsilon']:.2f}"
            self.progress.update(self.task, status=status)
        self.progress.advance(self.task)
        return True


class Checkpoint(Callback):
    """Saves the whole run every ``every`` steps (not at the last: the outputs follow), so a
    run killed at step 900 of 1000 resumes from step 900 (see train(checkpoint=...)).

    Written to a temporary file and renamed: a kill mid-write leaves the previous checkpoint.
    ``state`` builds the dict to save (the trainer's and the callbacks' state).
    """

    def __init__(self, path: Path, every: int, state: Callable[[int], dict[str, Any]]) -> None:
        self.path = Path(path)
        self.every = every
        self.state = state

    def on_step(self, step: int, info: StepInfo) -> bool:
        if self.every and (step + 1) % self.every == 0 and not info.last:
            save_checkpoint(self.path, self.state(step))
        return True


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Owner-only (0600): the sampler's and the noise's generator states are the run's secret
    (they give every batch's members and every noise draw), so is the adapter before release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # also a leftover temporary file's
        torch.save(state, handle)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to the run ``key`` (same inputs), else None."""
    if not path.is_file():
        return None
    # our own file, written by save_checkpoint: it holds pickled controllers (SB3's SAC)
    state = torch.load(path, weights_only=False)
    return state if state.get("key") == key else None
