"""What the training loop does besides training, as callbacks (after stable-baselines3's).

``on_step`` returns False to stop training. The loop calls, in order: ``on_decision`` after a
controller's decision, ``on_step`` after every optimizer step, ``on_training_end`` once. The
white-box audit is not a callback: it reads the released gradient, so it is the privacy
engine's release hook (privacy.engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


class ProgressCallback(Callback):
    """Steps, ETA and the latest loss (and epsilon) on the console."""

    def __init__(self, progress: Progress, description: str, total: int, logger: MetricsLogger):
        self.progress = progress
        self.task = progress.add_task(description, total=total, status="")
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
