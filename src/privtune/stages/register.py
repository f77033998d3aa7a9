"""Stage `register`: every method's model becomes a version of the use case's registered model,
with its evaluation and attack results, a one-line verdict and a privacy model card.

One stage for all methods, and the only post-training stage that writes to MLflow. It never
reopens a fine-tuning run (results join the run and its logged model through the client API,
so the run's duration stays the training's), and an unchanged model with unchanged evidence
keeps its version, so re-running it for every model is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import METRICS_DIR, MODELS_DIR, Params

REGISTERED_FILE = Path("reports/registered.json")


def register(
    params: Params, names: Sequence[str] = (), root: Path = Path(".")
) -> dict[str, dict[str, Any]]:
    """Register models/<name> for the given method entries, or for all of them (the stage,
    which then writes reports/registered.json). Idempotent: the same model with the same
    evidence never gets a second version."""
    from privtune import tracking
    from privtune.registry import register as register_version
    from privtune.registry.register import client

    entries = list(names) or list(params.methods)
    for name in entries:
        params.method(name)  # an unknown entry fails before anything is registered
        for stage in ("evaluate", "attack"):  # and a damaged metrics file does too
            io.read_numbers(root / METRICS_DIR / f"{stage}-{name}.json")
    result = {}
    experiments: set[str] = set()
    for name in entries:
        registered = register_version(
            name,
            params.registry.name,
            root,
            gates=params.registry.gates,
            confidence=params.attack.confidence,
            membership_counts=_membership_counts(root, name, params),
        )
        experiments.add(client(root).get_run(registered.run_id).info.experiment_id)
        result[name] = {
            "registered_model": registered.name,
            "version": int(registered.version),
            "created": registered.created,
            "run_id": registered.run_id,
        }
    for experiment_id in sorted(experiments):  # stores made before the experiment was described
        tracking.describe_experiment(client(root), experiment_id)
    if not names:
        io.write_json(root / REGISTERED_FILE, result)
    return result


def _membership_counts(root: Path, name: str, params: Params) -> tuple[int, int] | None:
    """(members, non-members) of the attack on models/<name> when its metrics predate
    recording them (counted as the attack stage selects them), else None: the metrics say."""
    path = root / METRICS_DIR / f"attack-{name}.json"
    if not path.is_file() or not (root / MODELS_DIR / name).is_dir():
        return None
    if "mia_members" in io.read_metrics(path):
        return None
    from privtune.errors import DataError
    from privtune.stages.attack import membership_sets

    try:
        members, non_members = membership_sets(root, params.attack)
    except DataError:  # prepared before the attack split: the card says "not recorded"
        return None
    return len(members), len(non_members)
