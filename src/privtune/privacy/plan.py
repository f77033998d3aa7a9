"""The training plan: N, q, steps, delta and the calibrated noise, computed ONCE (by the stage,
before any output is written) and handed to the loop and the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

from privtune.config import FinetuneParams
from privtune.errors import ConfigError
from privtune.privacy import accountant
from privtune.privacy.gradient_canaries import included_count
from privtune.privacy.guard import MAX_NOISE


@dataclass(frozen=True)
class TrainingPlan:
    n_records: int
    sample_rate: float
    steps: int
    delta: float
    calibrated_noise: float  # 0 for non-private methods

    @property
    def expected_batch_size(self) -> float:
        """q * N: the public denominator of every step's gradient."""
        return self.sample_rate * self.n_records


def planned_records(n_texts: int, params: FinetuneParams) -> int:
    """N: the text records plus the IN gradient canaries of the white-box audit (each one is a
    record, sampled, clipped and accounted like the others)."""
    return n_texts + included_count(params.audit_canaries, params.seed)


def default_delta(n_records: int, max_delta: float | None = None) -> float:
    """1 / (10 N), capped by the registry's delta gate: a model trained with the default
    delta is never refused for it after every stage ran (small corpora: 1/(10 N) > 1e-4)."""
    delta = 1.0 / (10 * n_records)
    return delta if max_delta is None else min(delta, max_delta)


def _round_down(x: float, digits: int = 3) -> float:
    """``x`` cut (not rounded) to ``digits`` significant digits: a suggested delta printed
    rounded up could pass the gate it is meant to stay under."""
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.floor(x / scale * (1 + 1e-12)) * scale


def make_plan(
    n_records: int, params: FinetuneParams, private: bool, max_delta: float | None = None
) -> TrainingPlan:
    """Sampling rate q = B/N, steps = ceil(epochs / q), delta < 1/N, and the calibrated noise.

    ``n_records`` is N, audit canaries included (see :func:`planned_records`); ``max_delta``
    is the registry's delta gate (registry.gates.max_delta): the default delta stays under it
    and an explicit delta above it is refused here, before training, not at promotion."""
    if n_records < 2:
        raise ConfigError("data", f"only {n_records} training records", "provide more records")
    if params.batch_size > n_records:
        # q = B/N > 1 is no sampling rate: it would silently become q = 1 and a single step
        raise ConfigError(
            "finetune.batch_size",
            f"{params.batch_size} is larger than the N = {n_records} training records "
            "(audit canaries included)",
            f"set finetune.batch_size to at most {n_records} (typically N/10 to N/30)",
        )
    q = params.batch_size / n_records
    steps = max(1, math.ceil(params.epochs / q))
    delta = params.delta if params.delta is not None else default_delta(n_records, max_delta)
    if private and not delta < 1.0 / n_records:  # a run without noise claims no (ε, δ)
        raise ConfigError(
            "finetune.delta",
            f"{delta:g} is not below 1/N = {1.0 / n_records:.3g} for N = {n_records} records",
            f"set finetune.delta below {1.0 / n_records:.3g} (e.g. "
            f"{_round_down(default_delta(n_records, max_delta)):.3g}, or null for that default)",
        )
    if private and max_delta is not None and delta > max_delta:
        raise ConfigError(
            "finetune.delta",
            f"{delta:g} exceeds the registry's delta gate registry.gates.max_delta = "
            f"{max_delta:g}: the model would be trained and then refused promotion",
            f"set finetune.delta to at most {max_delta:g} (or null: 1/(10 N) capped by the "
            "gate), or raise registry.gates.max_delta if your privacy officer agrees",
        )
    try:
        noise = (
            accountant.calibrate_noise(params.epsilon, delta, q, steps, params.accountant)
            if private
            else 0.0
        )
    except accountant.InfeasibleBudget as err:
        other = "" if params.accountant == "pld" else ", or finetune.accountant: pld (tighter)"
        raise ConfigError(
            "finetune.epsilon",
            f"{params.epsilon:g} is out of reach: {err}",
            f"raise finetune.epsilon (private fine-tuning typically uses 1 to 8){other}",
        ) from None
    if noise > MAX_NOISE:  # the guard would admit no step: a model trained for none
        raise ConfigError(
            "finetune.epsilon",
            f"{params.epsilon:g} needs noise multiplier {noise:.3g} over {steps} steps at "
            f"q = {q:.3g}, above the {MAX_NOISE:g} the budget guard admits: each step's noise "
            "would bury the gradient, and the run would stop before its first step",
            "raise finetune.epsilon (private fine-tuning typically uses 1 to 8), or lower "
            "finetune.epochs",
        )
    return TrainingPlan(n_records, q, steps, delta, noise)
