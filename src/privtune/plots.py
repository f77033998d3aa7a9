"""Plots of the privacy spending and learning curves, for MLflow artifacts and reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from privtune.record_scores import Difference, RecordScores


def plot_training(history: Sequence[dict[str, float]], target_epsilon: float, path: Path) -> Path:
    """Epsilon spent, loss, and the clipping/noise schedule over steps, side by side."""
    steps = [row["step"] for row in history]
    fig, (ax_eps, ax_loss, ax_sched) = plt.subplots(1, 3, figsize=(15, 3.8))
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
    rows = [row for row in history if "noise_multiplier" in row]
    if rows:
        clip_keys = sorted({k for row in rows for k in row if k.startswith("clip/")})
        for key in clip_keys:
            ax_sched.plot([r["step"] for r in rows], [r[key] for r in rows], label=key[5:])
        ax_sched.set(xlabel="step", ylabel="clipping threshold C_k", title="Schedule")
        ax_noise = ax_sched.twinx()
        ax_noise.plot(
            [r["step"] for r in rows],
            [r["noise_multiplier"] for r in rows],
            color="black",
            linestyle="--",
            label="noise z",
        )
        ax_noise.set_ylabel("noise multiplier z (dashed)")
        if len(clip_keys) <= 8:
            ax_sched.legend(fontsize=6, loc="upper left")
    else:
        ax_sched.text(0.5, 0.5, "no clipping or noise", ha="center", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_paired(
    challenger: RecordScores,
    champion: RecordScores,
    difference: Difference,
    labels: tuple[str, str],
    metric: str,
    path: Path,
) -> Path:
    """A promotion's utility comparison: each test note's score under both models (the
    diagonal: no difference) and the bootstrap distribution of the difference, with its
    interval and zero, so a reviewer sees how the gate's interval came about."""
    import numpy as np

    fig, (ax_notes, ax_boot) = plt.subplots(1, 2, figsize=(11, 4.2))
    mine = np.asarray(challenger.numerators) / np.maximum(challenger.denominators, 1e-300)
    theirs = np.asarray(champion.numerators) / np.maximum(champion.denominators, 1e-300)
    unit = "NLL per token" if challenger.exponentiate else "right (1) or wrong (0)"
    ax_notes.scatter(theirs, mine, s=12, alpha=0.6)
    low, high = float(min(mine.min(), theirs.min())), float(max(mine.max(), theirs.max()))
    ax_notes.plot([low, high], [low, high], color="black", linewidth=1, label="no difference")
    ax_notes.set(
        xlabel=f"{labels[1]}: {unit}",
        ylabel=f"{labels[0]}: {unit}",
        title=f"Each of the {len(challenger)} test notes",
    )
    ax_notes.legend(loc="upper left")
    ax_boot.hist(difference.distribution, bins=40, color="tab:blue", alpha=0.7)
    for bound in (difference.low, difference.high):
        ax_boot.axvline(bound, color="tab:red", linestyle="--")
    ax_boot.axvline(0.0, color="black", linewidth=1)
    ax_boot.set(
        xlabel=f"{metric}: {labels[0]} − {labels[1]}",
        ylabel="resamples",
        title=(
            f"{difference.difference:+.4g}, {difference.confidence:.0%} interval "
            f"[{difference.low:+.4g}, {difference.high:+.4g}] (dashed)"
        ),
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
