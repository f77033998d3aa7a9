"""Stage `register`: every method's evaluation and attack results join its fine-tuning run in
MLflow, and its model becomes a version of the use case's registered model, tagged with its
privacy contract, attack and utility metrics.

One stage for all methods, and the only post-training stage that starts MLflow: logging and
registering are a second of work per model after several seconds of start-up, and an unchanged
model keeps its version, so re-running it for every model is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import METRICS_DIR, MODELS_DIR, PLOTS_DIR, Params

REGISTERED_FILE = Path("reports/registered.json")


def register(
    params: Params, names: Sequence[str] = (), root: Path = Path(".")
) -> dict[str, dict[str, Any]]:
    """Register models/<name> for the given method entries, or for all of them (the stage,
    which then writes reports/registered.json). Idempotent: the same model never gets a
    second version."""
    from privtune.registry import register as register_version

    entries = list(names) or list(params.methods)
    for name in entries:
        params.method(name)  # an unknown entry fails before anything is registered
    result = {}
    for name in entries:
        log_results(root, name)
        registered = register_version(name, params.registry.name, root)
        result[name] = {
            "registered_model": registered.name,
            "version": int(registered.version),
            "created": registered.created,
            "run_id": registered.run_id,
        }
    if not names:
        io.write_json(root / REGISTERED_FILE, result)
    return result


def log_results(root: Path, name: str) -> None:
    """The evaluate and attack stages' metrics (and ROC plot) of models/<name>, into its
    fine-tuning run: utility under its own names, attacks under `attack.`."""
    from privtune import tracking

    info_path = root / MODELS_DIR / name / "finetune.json"
    if not info_path.is_file():
        return  # register_version names the missing stage
    metrics: dict[str, float] = {}
    for stage, prefix in (("evaluate", ""), ("attack", "attack.")):
        path = root / METRICS_DIR / f"{stage}-{name}.json"
        if path.is_file():
            numbers = io.read_json(path).items()
            metrics |= {
                f"{prefix}{k}": float(v)
                for k, v in numbers
                if isinstance(v, int | float)
                and not isinstance(v, bool)
                and not (stage == "evaluate" and k == "epsilon")  # finetune logs its curve
            }
    roc = root / PLOTS_DIR / f"roc-{name}.png"
    with tracking.start_run(root=root, run_id=io.read_json(info_path)["run_id"]) as run:
        run.log_metrics(metrics)
        if roc.is_file():
            run.log_artifact(roc, "attack")
