"""All attacks on one model, summarised as the flat metrics the registry gates on."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from privtune.attacks.audit import AuditResult, one_run_audit
from privtune.attacks.exposure import CanaryExposure, canary_exposures
from privtune.attacks.extraction import CanaryExtraction, canary_extraction
from privtune.attacks.membership import membership_inference
from privtune.attacks.reference_cache import ReferenceCache
from privtune.attacks.roc import RocSummary, plot_roc, unresolved_reason
from privtune.attacks.scoring import SCORE_NAMES, membership_scores
from privtune.data.canaries import Canary
from privtune.errors import ConfigError
from privtune.privacy.gradient_canaries import GradientCanaries
from privtune.progress import notice, progress_bar


@dataclass(frozen=True)
class AttackConfig:
    """Knobs of the attack stage (defaults follow the papers; tests shrink the expensive ones).

    Attributes:
        min_k: Fraction of least likely tokens averaged by the Min-K% score.
        bootstrap_resamples: Resamples of the AUC confidence interval.
        confidence: Level of the AUC interval and of the audit's epsilon bound.
        seed: Seeds the bootstrap, candidate secrets and sampling.
        n_candidates: Random secrets each canary is ranked against (exposure).
        chunk_size: Candidates per forward pass; None sizes chunks from the vocabulary.
        samples: Sampled generations per canary (extraction), besides the greedy one.
        audit_delta: Delta of the audited (eps, delta) claim; needed when auditing.
        audit_score: Membership score used to guess audit canaries ("reference" or "loss").
        audit_k_choices: (k+, k-) pairs tried, Bonferroni-corrected; None = a default grid.
        max_length: Token limit when scoring records; None = the model's context.
        batch_size: Records per forward pass when scoring.
        progress: Show rich progress bars (counts only, never text).
        reference_cache: Where the reference model's scores (exposure, membership) are kept
            for every method's attack (`reference_cache.ReferenceCache`); None = score them
            each time.
    """

    min_k: float = 0.2
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    n_candidates: int = 10_000
    chunk_size: int | None = None
    samples: int = 4
    audit_delta: float | None = None
    audit_score: str = "reference"
    audit_k_choices: tuple[tuple[int, int], ...] | None = None
    max_length: int | None = None
    batch_size: int = 32
    progress: bool = True
    reference_cache: ReferenceCache | None = None


def _rate(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _fpr_key(fpr: float) -> str:
    return f"{fpr:g}"


def _membership(mia: dict[str, RocSummary]) -> dict[str, float | str | None]:
    """Every score's AUC (interval) and TPRs (lower bounds), the best of each across scores
    with the best lower bound (what the gates decide on), and the counts they rest on."""
    metrics: dict[str, float | str | None] = {}
    for name, summary in mia.items():
        metrics[f"mia_{name}_auc"] = summary.auc
        metrics[f"mia_{name}_auc_ci_low"] = summary.auc_ci_low
        metrics[f"mia_{name}_auc_ci_high"] = summary.auc_ci_high
        for fpr, tpr in summary.tpr_at_fpr.items():
            metrics[f"mia_{name}_tpr_at_fpr_{_fpr_key(fpr)}"] = tpr
            if fpr in summary.tpr_ci_low:
                metrics[f"mia_{name}_tpr_at_fpr_{_fpr_key(fpr)}_ci_low"] = summary.tpr_ci_low[fpr]
    if not mia:
        return metrics
    first = next(iter(mia.values()))
    if first.members:  # every score ranks the same records
        metrics["mia_members"] = first.members
        metrics["mia_non_members"] = first.non_members
    if first.patients is not None:  # the intervals resampled these patients, not notes
        metrics["mia_member_patients"], metrics["mia_non_member_patients"] = first.patients
    metrics["mia_auc_max"] = max(s.auc for s in mia.values())
    metrics["mia_auc_ci_low_max"] = max(s.auc_ci_low for s in mia.values())
    for fpr, tpr in first.tpr_at_fpr.items():
        key = f"mia_tpr_at_fpr_{_fpr_key(fpr)}"
        if tpr is None:
            metrics[f"{key}_max"] = None
            metrics[f"{key}_unresolved"] = unresolved_reason(fpr, first.non_members)
            continue
        metrics[f"{key}_max"] = max(float(s.tpr_at_fpr[fpr] or 0) for s in mia.values())
        bounds = [s.tpr_ci_low[fpr] for s in mia.values() if fpr in s.tpr_ci_low]
        if bounds:
            metrics[f"{key}_ci_low_max"] = max(bounds)
    return metrics


def summarize(
    mia: dict[str, RocSummary],
    exposures: Sequence[CanaryExposure],
    extractions: Sequence[CanaryExtraction],
    audits: dict[str, AuditResult],
) -> dict[str, float | str | None]:
    """One flat dict (metrics JSON, MLflow takes its numbers); key names are read by the
    registry. Membership results carry the members/non-members counts they rest on; a TPR the
    non-members cannot resolve is None, with `…_unresolved` saying why.

    ``audits`` maps "blackbox" (text canaries) and/or "whitebox" (gradient canaries) to their
    results; ``audit_epsilon_lower_bound`` is the larger bound (each was computed at its share
    of the significance, so the larger is still a bound at the stated confidence). Groups with
    nothing to report (no reference model, no canaries of a repetition count, no audit) are
    left out rather than filled with placeholders.
    """
    metrics = _membership(mia)
    for reps in sorted({e.repetitions for e in exposures}):
        values = [e.exposure for e in exposures if e.repetitions == reps]
        label = f"r{reps}" if reps else "held_out"
        metrics[f"exposure_{label}_mean"] = float(np.mean(values))
        metrics[f"exposure_{label}_max"] = float(np.max(values))
        metrics[f"exposure_{label}_canaries"] = float(len(values))
        calibrated = [e.calibrated for e in exposures if e.repetitions == reps]
        if all(c is not None for c in calibrated):  # ranked against the reference model's
            metrics[f"exposure_calibrated_{label}_mean"] = float(np.mean(calibrated))
            metrics[f"exposure_calibrated_{label}_max"] = float(np.max(calibrated))
    for reps in sorted({e.repetitions for e in extractions}):
        group = [e for e in extractions if e.repetitions == reps]
        label = f"r{reps}" if reps else "held_out"
        metrics[f"extraction_greedy_{label}"] = _rate([float(e.greedy) for e in group])
        samples = sum(e.samples for e in group)
        if samples:
            metrics[f"extraction_sampled_{label}"] = sum(e.sampled_hits for e in group) / samples
    for kind, audit in sorted(audits.items()):
        metrics[f"audit_{kind}_epsilon_lower_bound"] = float(audit.epsilon_lower_bound)
        metrics[f"audit_{kind}_m"] = float(audit.m)
        metrics[f"audit_{kind}_guesses"] = float(audit.guesses)
        metrics[f"audit_{kind}_correct"] = float(audit.correct)
    if audits:
        metrics["audit_epsilon_lower_bound"] = max(
            float(a.epsilon_lower_bound) for a in audits.values()
        )
    return metrics


def _progress(enabled: bool) -> Progress:
    return progress_bar(
        enabled,
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


class _PhaseClock:
    """Wall seconds of consecutive phases."""

    def __init__(self) -> None:
        self.laps: list[tuple[str, float]] = []
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.laps)


def run_attacks(
    model: torch.nn.Module,
    reference_model: torch.nn.Module | None,
    tokenizer,
    members: Sequence[dict],
    non_members: Sequence[dict],
    canaries: Sequence[Canary],
    audit_canaries: Sequence[Canary] = (),
    config: AttackConfig | None = None,
    out_dir: Path | None = None,
    name: str = "model",
    gradient_canaries: GradientCanaries | None = None,
) -> tuple[dict[str, float | str | None], list[Path]]:
    """Membership inference, exposure, extraction and the one-run audits of one model.

    ``members``/``non_members`` are balanced record lists (see ``balanced_sets``); canaries
    with ``repetitions=0`` are the held-out control. Audit canaries must have been trained on
    exactly when ``repetitions > 0`` (black-box audit: guessed from the model's scores);
    ``gradient_canaries`` carry the scores the training loop recorded (white-box audit).
    Returns the flat metrics and the written figure paths (an ROC plot in ``out_dir``).
    """
    config = config or AttackConfig()
    if (audit_canaries or gradient_canaries is not None) and config.audit_delta is None:
        raise ConfigError(
            "attack.audit_delta",
            "auditing needs the delta of the audited (epsilon, delta) claim",
            "pass the fine-tuning delta (finetune.json plan.delta)",
        )
    if config.audit_score not in SCORE_NAMES:
        raise ConfigError(
            "attack.audit_score", f"unknown score {config.audit_score!r}", f"use {SCORE_NAMES}"
        )
    if config.audit_score == "reference" and reference_model is None and audit_canaries:
        raise ConfigError(
            "attack.audit_score", "'reference' needs a reference model", "pass one or use 'loss'"
        )
    scoring = {"max_length": config.max_length, "batch_size": config.batch_size}
    figures: list[Path] = []
    clock = _PhaseClock()
    with _progress(config.progress) as progress:
        scored = (len(members) + len(non_members)) * (1 if reference_model is None else 2)
        task = progress.add_task("membership inference (texts scored)", total=scored)
        mia, curves = membership_inference(
            model,
            reference_model,
            tokenizer,
            members,
            non_members,
            min_k=config.min_k,
            resamples=config.bootstrap_resamples,
            confidence=config.confidence,
            seed=config.seed,
            on_batch=lambda n: progress.advance(task, n),
            reference_cache=config.reference_cache,
            **scoring,
        )
        clock.lap("membership inference")
        if out_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            figures.append(
                plot_roc(curves, f"Membership inference: {name}", out_dir / f"roc-{safe}.png")
            )
        task = progress.add_task(
            f"exposure ({config.n_candidates} candidates)", total=len(canaries)
        )
        exposures = canary_exposures(
            model,
            tokenizer,
            canaries,
            n_candidates=config.n_candidates,
            seed=config.seed,
            chunk_size=config.chunk_size,
            on_canary=lambda: progress.advance(task),
            reference=reference_model,
            reference_cache=config.reference_cache,
        )
        clock.lap("exposure")
        task = progress.add_task("extraction", total=len(canaries))
        extractions = canary_extraction(
            model,
            tokenizer,
            canaries,
            samples=config.samples,
            seed=config.seed,
            on_canary=lambda: progress.advance(task),
        )
        clock.lap("extraction")
        audits: dict[str, AuditResult] = {}
        n_audits = bool(audit_canaries) + (gradient_canaries is not None)
        # Bonferroni over the audits: the larger bound keeps the stated confidence.
        audit_confidence = 1 - (1 - config.confidence) / max(n_audits, 1)
        if gradient_canaries is not None:
            audits["whitebox"] = one_run_audit(
                gradient_canaries.scores,
                gradient_canaries.included,
                delta=float(config.audit_delta),
                k_choices=config.audit_k_choices,
                confidence=audit_confidence,
            )
        if audit_canaries:
            task = progress.add_task("one-run audit (text canaries)", total=1)
            scores = membership_scores(
                model,
                reference_model if config.audit_score == "reference" else None,
                tokenizer,
                [f"{c.text}." for c in audit_canaries],
                min_k=config.min_k,
                reference_cache=config.reference_cache,
                **scoring,
            )[config.audit_score]
            audits["blackbox"] = one_run_audit(
                scores,
                [c.repetitions > 0 for c in audit_canaries],
                delta=float(config.audit_delta),
                k_choices=config.audit_k_choices,
                confidence=audit_confidence,
            )
            progress.advance(task)
        clock.lap("audits")
    # Seconds are not metrics (a rerun must give the same metrics file): a log line, which
    # says where an attack stage's time goes (on a GPU, sizing attack.candidates, batch_size).
    notice(f"attack phases: {clock}")
    return summarize(mia, exposures, extractions, audits), figures
