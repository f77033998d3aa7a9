"""A sweep: the whole pipeline as DVC experiments over target epsilons and seeds.

Each point runs in a temporary copy of the repository (`dvc exp run --temp`), so the
workspace is untouched and unchanged stages (prepare, base) come from the DVC cache. Every
experiment logs to the project's MLflow store; `dvc exp show` compares them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, get_run_logger  # noqa: E402

from tasks import stages  # noqa: E402


def sweep_points(epsilons: list[float], seeds: list[int]) -> list[tuple[str, list[str]]]:
    """(experiment name, `-S` overrides) per point of the grid."""
    return [
        (
            f"eps{eps:g}-seed{seed}",
            [f"finetune.epsilon={eps}", f"finetune.seed={seed}"],
        )
        for eps in epsilons
        for seed in seeds
    ]


@flow(name="privtune-sweep", log_prints=True)
def sweep(
    root: str = ".",
    epsilons: list[float] = [1.0, 4.0, 8.0],  # noqa: B006 (Prefect parameters are copied)
    seeds: list[int] = [0, 1, 2],  # noqa: B006
) -> list[str]:
    """Every method of params.yaml at every (epsilon, seed); returns the experiment names."""
    from privtune.tracking import disable_telemetry, tracking_uri

    disable_telemetry()
    root = str(Path(root).resolve())
    # Experiments run in temporary copies: point them all at the project's store.
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    names = [
        stages.experiment(name, overrides, root)
        for name, overrides in sweep_points(epsilons, seeds)
    ]
    get_run_logger().info("compare with: dvc exp show --only-changed")
    return names


if __name__ == "__main__":
    sweep()
