"""The default pipeline as a Prefect flow: prepare -> base -> per method: finetune, evaluate,
attack -> register -> report -> (optionally) promote. Given a subset of the methods, it
registers just those and leaves the report (which compares every method) alone.

python flows/pipeline.py                  # run once, locally (ephemeral Prefect server)
prefect deploy --all                      # scheduled deployments from prefect.yaml

With ``finetune_deployment`` set (prefect.yaml's nightly run sets it), each fine-tuning runs as a
run of that deployment, i.e. on a worker of the GPU pool; everything else runs where this flow
runs. Workers on other machines share stage outputs through the DVC remote (README).
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


def finetune_remotely(
    deployment: str, method: str, root: str, force: bool, share: bool = False
) -> None:
    """Run `finetune@method` as a run of `deployment` (a GPU pool) and wait for it."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment,
        # The worker runs in its own checkout ($PRIVTUNE_ROOT on its machine).
        parameters={"method": method, "root": ".", "force": force, "share": share},
        flow_run_name=f"finetune-{method}",
        # A retried pipeline reuses the same fine-tuning flow run instead of starting another.
        idempotency_key=None if force else f"{root}:finetune@{method}",
    )
    if not run.state or not run.state.is_completed():
        raise RuntimeError(f"fine-tuning {method} on {deployment} ended in state {run.state}")


@flow(name="privtune-pipeline", log_prints=True)
def pipeline(
    root: str = ".",
    methods: list[str] | None = None,
    force: bool = False,
    finetune_deployment: str | None = None,
    promote: bool = False,
    share: bool = False,
) -> dict:
    """Run every stage through DVC; returns the metrics of each stage, as `dvc metrics show`.

    ``share``: GPU workers are on other machines; stage outputs travel through the DVC remote.
    """
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    logger = get_run_logger()
    root = str(Path(root).resolve())
    every_method = method_names(root)
    methods = methods or every_method
    stages.prepare(root, force)
    stages.base(root, force)
    if share:
        stages.push("prepare", root)
        stages.push("base", root)
    for method in methods:
        if finetune_deployment:
            finetune_remotely(finetune_deployment, method, root, force, share)
            if share:
                stages.pull(f"finetune@{method}", root)
        else:
            stages.finetune(method, root, force)
        stages.evaluate(method, root, force)
        stages.attack(method, root, force)
    if set(methods) >= set(every_method):
        stages.register(root, force)
        stages.report(root, force)
    else:  # the register and report stages cover every method; this run built only some
        stages.register_some(methods, root)
        logger.info("report skipped: it compares every method in params.yaml; run them all")
    if promote:
        from flows.promote import promote as promote_flow

        promote_flow(root=root, pending=True)
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        shown = repo.metrics.show()[""]["data"]
    metrics = {path: entry.get("data", {}) for path, entry in shown.items()}
    logger.info("metrics files: %s", ", ".join(sorted(metrics)))
    return metrics


if __name__ == "__main__":
    pipeline()
