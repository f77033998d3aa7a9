"""The default pipeline as a Prefect flow: prepare -> base -> finetune/evaluate per method.

python flows/pipeline.py                  # run once, locally (ephemeral Prefect server)
prefect deploy --all                      # scheduled deployments from prefect.yaml
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

# tasks/ sits beside flows/ at the project root (DESIGN.md layout); make it importable when
# Prefect loads this file by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, get_run_logger  # noqa: E402

from tasks import stages  # noqa: E402


def method_names(root: str) -> list[str]:
    from privtune.config import load_params

    return list(load_params(Path(root) / "params.yaml").methods)


@flow(name="privtune-pipeline", log_prints=True)
def pipeline(root: str = ".", methods: list[str] | None = None, force: bool = False) -> dict:
    """Run every stage through DVC; returns the metrics of each stage, as `dvc metrics show`."""
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    logger = get_run_logger()
    root = str(Path(root).resolve())
    methods = methods or method_names(root)
    stages.prepare(root, force)
    stages.base(root, force)
    for method in methods:
        stages.finetune(method, root, force)
        stages.evaluate(method, root, force)
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        shown = repo.metrics.show()[""]["data"]
    metrics = {path: entry.get("data", {}) for path, entry in shown.items()}
    logger.info("metrics files: %s", ", ".join(sorted(metrics)))
    return metrics


if __name__ == "__main__":
    pipeline()
