"""Stage `report`: every method side by side at equal (epsilon, delta): utility, privacy spent
and attack success, as a markdown table, JSON and plots under reports/, logged to MLflow.

Reads only the stages' metrics files and training curves, so it costs seconds and reruns
whenever any method's numbers change.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import METRICS_DIR, PLOTS_DIR, Params

REPORT_DIR = Path("reports")
DOWNSTREAM = "downstream"  # the declared task's accuracy and chance (privtune.downstream)
MIA_COUNTS = "mia_counts"  # what the membership numbers rest on
NO_TASK = "no downstream task declared"  # evaluate.task: null
UNRESOLVED = "n/r"  # a TPR the non-members cannot resolve (fewer than 1/FPR of them)

# (column, source file, key, format): what a reader compares, in reading order.
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("target ε", "finetune", "target_epsilon", "{:.3g}"),
    ("ε spent", "finetune", "epsilon", "{:.3f}"),
    ("δ", "finetune", "delta", "{:.2g}"),
    ("steps", "finetune", "steps", "{:.0f}"),
    ("test perplexity", "evaluate", "test_perplexity", "{:.1f}"),
    ("downstream accuracy (chance)", "evaluate", DOWNSTREAM, "{:.3f}"),
    ("MIA AUC (best score)", "attack", "mia_auc_max", "{:.3f}"),
    ("MIA members / non-members", "attack", MIA_COUNTS, "{:.0f}"),
    ("TPR @ 1% FPR (best)", "attack", "mia_tpr_at_fpr_0.01_max", "{:.3f}"),
    ("exposure r16 (bits)", "attack", "exposure_r16_mean", "{:.2f}"),
    ("exposure held-out", "attack", "exposure_held_out_mean", "{:.2f}"),
    # ranked by what fine-tuning added to the base's log-likelihood (attacks/exposure.py)
    ("calibrated exposure r16", "attack", "exposure_calibrated_r16_mean", "{:.2f}"),
    ("calibrated held-out", "attack", "exposure_calibrated_held_out_mean", "{:.2f}"),
    ("extraction r16", "attack", "extraction_greedy_r16", "{:.2f}"),
    ("audit ε lower bound", "attack", "audit_epsilon_lower_bound", "{:.3f}"),
)


def collect(params: Params, root: Path) -> dict[str, dict[str, Any]]:
    """Per method: the numbers of its finetune, evaluate and attack metrics files."""
    rows: dict[str, dict[str, Any]] = {}
    for name in params.methods:
        row: dict[str, Any] = {}
        for stage in ("finetune", "evaluate", "attack"):
            path = root / METRICS_DIR / f"{stage}-{name}.json"
            numbers = io.read_metrics(path) if path.is_file() else {}
            # numbers, and None where a stage recorded that it could not measure one
            row[stage] = {k: v for k, v in numbers.items() if v is None or _is_number(v)}
        row["method"] = params.method(name)[0]
        row["task"] = params.evaluate.task
        rows[name] = row
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _downstream(row: dict[str, Any], fmt: str) -> str:
    evaluated = row["evaluate"]
    if not evaluated:
        return "–"
    if "task" in row and row["task"] is None:
        return NO_TASK
    value = evaluated.get("downstream_accuracy", evaluated.get("medication_accuracy"))
    chance = evaluated.get("downstream_chance", evaluated.get("medication_chance"))
    if value is None:
        return "–"
    return fmt.format(value) + ("" if chance is None else f" ({chance:.2f})")


def _cell(row: dict[str, Any], source: str, key: str, fmt: str) -> str:
    if key == DOWNSTREAM:
        return _downstream(row, fmt)
    if key == MIA_COUNTS:
        members, non_members = (row["attack"].get(k) for k in ("mia_members", "mia_non_members"))
        if members is None:
            return "–"
        patients = [row["attack"].get(f"mia_{side}_patients") for side in ("member", "non_member")]
        of = "" if None in patients else " ({:.0f} / {:.0f} patients)".format(*patients)
        return f"{members:.0f} / {non_members:.0f}{of}"
    value = row[source].get(key)
    if value is None and key in ("epsilon", "target_epsilon") and row["finetune"]:
        return "∞"  # trained without a finite epsilon claim: non-private
    if value is None and key in row[source]:
        return UNRESOLVED  # recorded as not measurable (e.g. too few non-members)
    return "–" if value is None else fmt.format(value)


PAIRED_METRIC = "test_perplexity"
REFERENCE = "dpsgd"  # the baseline every method is compared with, record by record


def paired_against_reference(
    params: Params, root: Path, confidence: float = 0.95, resamples: int = 2000
) -> dict[str, dict[str, float]]:
    """Each method's test perplexity minus the reference's (DP-SGD), with the paired-bootstrap
    interval over the test records both were scored on (record_scores): whether a gap in the
    table is more than which notes the test split happened to hold. Methods without
    per-record scores (not evaluated yet, or before they existed) are left out."""
    from privtune.record_scores import (
        NotPaired,
        paired_difference,
        read_scores,
        record_scores_path,
        seed_of,
    )

    def scores(name: str) -> tuple[str, Any] | None:
        try:
            on, parts = read_scores(root / record_scores_path(name))
            return on, parts[PAIRED_METRIC]
        except (OSError, ValueError, KeyError):  # none yet, or unreadable: left out
            return None

    reference = scores(REFERENCE) if REFERENCE in params.methods else None
    if reference is None:
        return {}
    compared = {}
    for name in params.methods:
        mine = scores(name) if name != REFERENCE else None
        if mine is None or mine[0] != reference[0]:  # other test data: not paired
            continue
        try:
            diff = paired_difference(
                mine[1],
                reference[1],
                confidence=confidence,
                resamples=resamples,
                seed=seed_of(name, REFERENCE, str(mine[0]), PAIRED_METRIC),
            )
        except NotPaired:
            continue
        compared[name] = {
            "difference": diff.difference,
            "low": diff.low,
            "high": diff.high,
            "ratio": mine[1].value() / reference[1].value(),
            "records": float(diff.records),
            "confidence": confidence,
        }
    return compared


def paired_table(compared: dict[str, dict[str, float]]) -> str:
    """The comparison with the reference as markdown: difference, interval, verdict."""
    confidence = next(iter(compared.values()))["confidence"] if compared else 0.95
    header = (
        f"| method | test perplexity vs {REFERENCE} | ratio | {confidence:.0%} interval "
        "(paired) | |"
    )
    lines = [header, "|---|---|---|---|---|"]
    for name, c in compared.items():
        verdict = (
            "lower beyond the noise"
            if c["high"] < 0
            else "higher beyond the noise"
            if c["low"] > 0
            else "within the noise"
        )
        lines.append(
            f"| {name} | {c['difference']:+.1f} | {c['ratio']:.3f} | "
            f"[{c['low']:+.1f}, {c['high']:+.1f}] over {c['records']:.0f} notes | {verdict} |"
        )
    return "\n".join(lines)


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    header = ["method", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name, *(_cell(row, src, key, fmt) for _, src, key, fmt in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The compact view `make demo` ends with: one line per method, what a reader compares first.
SUMMARY: tuple[tuple[str, str, str, str], ...] = (
    ("test ppl", "evaluate", "test_perplexity", "{:.1f}"),
    ("downstream acc (chance)", "evaluate", DOWNSTREAM, "{:.3f}"),
    ("ε spent", "finetune", "epsilon", "{:.2f}"),
    ("MIA AUC", "attack", "mia_auc_max", "{:.3f}"),
    ("TPR@1%FPR", "attack", "mia_tpr_at_fpr_0.01_max", "{:.3f}"),
    ("audit ε ≥", "attack", "audit_epsilon_lower_bound", "{:.2f}"),
)


def summary_table(params: Params, root: Path = Path("."), markdown: bool = False) -> str:
    """Methods x (utility, epsilon spent, attack success, audit bound): aligned plain text, or
    the markdown table README's results section carries (tests/test_readme.py compares them)."""
    rows = collect(params, root)
    header = ["method", *(c[0] for c in SUMMARY)]
    body = [
        [name, *(_cell(row, src, key, fmt) for _, src, key, fmt in SUMMARY)]
        for name, row in rows.items()
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join([*lines, *("| " + " | ".join(cells) + " |" for cells in body)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    notes = {row["evaluate"].get("downstream_records") for row in rows.values()} - {None}
    if len(notes) == 1 and (n := int(notes.pop())) > 0:
        # what a difference in that column can mean: at 13 notes one note is 0.077
        lines.append(
            f"(downstream accuracy on {n} test notes: one note is {1 / n:.3f}, its standard "
            f"error up to {0.5 / math.sqrt(n):.3f}: a note or two from chance or between "
            "methods is noise)"
        )
    return "\n".join(lines)


def validation_curve(root: Path, name: str) -> tuple[list[int], list[float]]:
    """(steps, validation perplexity) from the training curve the finetune stage wrote."""
    path = root / PLOTS_DIR / f"finetune-{name}.csv"
    if not path.is_file():
        return [], []
    steps, perplexities = [], []
    with path.open(newline="") as handle:
        for record in csv.DictReader(handle):
            if record.get("valid_loss"):
                steps.append(int(record["step"]))
                perplexities.append(math.exp(float(record["valid_loss"])))
    return steps, perplexities


def plot(rows: dict[str, dict[str, Any]], root: Path, out: Path) -> list[Path]:
    """Utility against ε, validation perplexity against steps, utility against attack success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        ppl = row["evaluate"].get("test_perplexity")
        eps = row["finetune"].get("epsilon")
        if ppl is None:
            continue
        if eps is None:
            ax.axhline(ppl, linestyle="--", color="grey", label=f"{name} (ε = ∞)")
        else:
            ax.scatter([eps], [ppl], label=name, zorder=3)
    ax.set(xlabel="ε spent", ylabel="test perplexity", yscale="log", title="Utility against ε")
    ax.legend(fontsize=8)
    figures.append(_save(fig, out / "utility_vs_epsilon.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows:
        steps, perplexities = validation_curve(root, name)
        if steps:
            ax.plot(steps, perplexities, marker=".", label=name)
    ax.set(xlabel="step", ylabel="validation perplexity", yscale="log")
    ax.set_title("Validation perplexity against steps")
    ax.legend(fontsize=8)
    figures.append(_save(fig, out / "valid_perplexity.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        ppl, auc = row["evaluate"].get("test_perplexity"), row["attack"].get("mia_auc_max")
        if ppl is None or auc is None:
            continue
        eps = row["finetune"].get("epsilon")
        ax.scatter([auc], [ppl], zorder=3)
        ax.annotate(f"{name} (ε {'∞' if eps is None else f'{eps:.2g}'})", (auc, ppl), fontsize=8)
    ax.axvline(0.5, linestyle=":", color="grey")
    ax.set(xlabel="membership-inference AUC (best score; 0.5 = chance)", ylabel="test perplexity")
    ax.set(yscale="log", title="Utility against attack success")
    figures.append(_save(fig, out / "utility_vs_attack.png"))
    return figures


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Write reports/ (report.md, report.json, plots) and log it to MLflow once per content."""
    from privtune import tracking

    rows = collect(params, root)
    compared = paired_against_reference(params, root)
    for name, numbers in compared.items():
        rows[name][f"vs_{REFERENCE}"] = numbers
    # Built in a temporary directory, then each file moved into reports/ (which also holds
    # the register stage's registered.json, so the directory itself is not replaced).
    with io.atomic_dir(root / REPORT_DIR / ".report") as out:
        plot(rows, root, out)
        io.write_json(out / "report.json", rows)
        text = "\n\n".join(
            [
                "# privtune: methods compared at equal (ε, δ)",
                f"Target ε {params.finetune.epsilon:g} for every private method; δ and steps "
                "as in the table. Lower perplexity is better; an MIA AUC near 0.5, TPR at 1% "
                "FPR near 0.01 and exposure near the held-out canaries' mean mean the attacks "
                "learn nothing; calibrated exposure ranks what fine-tuning added to the base "
                "model's likelihood (read it on your own corpus, where the raw ranking mostly "
                "says how few tokens a secret takes). The audit bound must stay at or below "
                "ε spent. Membership numbers rest on the members / non-members shown: an AUC "
                "from 40 of each is "
                f"±0.13 wide; `{UNRESOLVED}` marks a TPR at an FPR below 1 / non-members, "
                "which they cannot measure. Downstream accuracy is the declared task's "
                "(`evaluate.task`), chance in brackets.",
                markdown_table(rows),
                *(
                    [
                        f"Test perplexity against {REFERENCE}'s, note by note: the "
                        "paired-bootstrap interval of the difference over the test notes both "
                        "were scored on (the promotion's utility gate reads the same). It "
                        "covers which notes the test split holds, not the training's own "
                        "randomness: another noise draw trains another model, so an advantage "
                        "is a method's only where it repeats across seeds.",
                        paired_table(compared),
                    ]
                    if compared
                    else []
                ),
                "![utility against epsilon](utility_vs_epsilon.png)",
                "![validation perplexity against steps](valid_perplexity.png)",
                "![utility against attack success](utility_vs_attack.png)",
            ]
        )
        (out / "report.md").write_text(text + "\n")
        key = "report:" + hashlib.sha256(io.tree_sha256(out).encode()).hexdigest()
        experiment = params.tracking.experiment
        logged = tracking.finished_run(root, key, experiment)
        # a report is no release: one filed in another experiment is logged here too
        if logged is None or not tracking.in_experiment(root, logged, experiment):
            with tracking.start_run("report", root=root, key=key, experiment=experiment) as run:
                run.set_tags(
                    {
                        "stage": "report",
                        tracking.NOTE_TAG: "Every method side by side at equal (ε, δ): "
                        "`report/report.md` (table of utility, ε spent, attack success and the "
                        "audit bound) and its plots, in this run's artifacts.",
                    }
                )
                run.log_artifact(out, "report")
    built = root / REPORT_DIR / ".report"
    for file in sorted(built.iterdir()):
        os.replace(file, root / REPORT_DIR / file.name)
    built.rmdir()
    return {"methods": list(rows), "report": str(REPORT_DIR / "report.md")}
