"""Plots of the privacy spending and learning curves, for MLflow artifacts and reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(history: Sequence[dict[str, float]], target_epsilon: float, path: Path) -> Path:
    """Epsilon spent and loss over steps, side by side."""
    steps = [row["step"] for row in history]
    fig, (ax_eps, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    if any("epsilon" in row for row in history):
        ax_eps.plot(steps, [row.get("epsilon", float("nan")) for row in history], label="spent")
        ax_eps.axhline(target_epsilon, color="red", linestyle="--", label="target")
        ax_eps.legend()
    else:
        ax_eps.text(0.5, 0.5, "non-private: no privacy guarantee", ha="center", va="center")
    ax_eps.set(xlabel="step", ylabel="epsilon", title="Privacy spent")
    ax_loss.plot(steps, [row["loss"] for row in history], label="train (batch)")
    valid = [(row["step"], row["valid_loss"]) for row in history if "valid_loss" in row]
    if valid:
        ax_loss.plot(*zip(*valid, strict=True), marker="o", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax_loss.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
