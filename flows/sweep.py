"""A sweep: the whole pipeline as DVC experiments over target epsilons and seeds.

Each point runs in a temporary copy of the repository (`dvc exp run --temp`), so the
workspace is untouched and unchanged stages (prepare, base) come from the DVC cache. Every
experiment logs to the project's MLflow store; `dvc exp show` compares them. With
`runner.kind: ray` (params.yaml) the points run at once on a Ray cluster, each in a git clone
of its own pushed back as a DVC experiment (tasks/stages.py `experiment_in_copy`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.futures import wait  # noqa: E402

from privtune.config import RunnerParams, project_root  # noqa: E402
from tasks import runners, stages  # noqa: E402


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


def existing_experiments(root: str, names: list[str]) -> list[str]:
    """The names among `names` that the project already has as experiments of its HEAD.

    DVC finds such a clash only when it brings the finished experiment back (`dvc exp run
    --temp` and `dvc exp push` alike), after the point's whole pipeline ran: a sweep checks first.
    """
    from dvc.repo.experiments.refs import ExpRefInfo

    head = stages._git("-C", root, "rev-parse", "HEAD")
    return [
        name
        for name in names
        if stages._git(
            "-C", root, "rev-parse", "--verify", "--quiet", str(ExpRefInfo(head, name)),
            check=False,
        )
    ]  # fmt: skip


@flow(name="privtune-sweep-points", log_prints=True)
def sweep_fanned_out(
    root: str,
    points: list[tuple[str, list[str]]],
    tracking: str,
    runner: dict[str, Any] | None = None,
) -> list[str]:
    """Every point at once on this flow's task runner (the Ray runner `sweep` gives it), one
    task per point reserving the `runner` section's CPUs and GPUs, each in a clone of its own
    (`stages.experiment_in_copy`)."""
    from prefect_ray.context import remote_options

    params = RunnerParams.model_validate(runner or {})
    with remote_options(**runners.remote_options(params)):
        futures = [
            stages.experiment_in_copy.submit(
                name, overrides, root, tracking, runners.threads(params)
            )
            for name, overrides in points
        ]
    # Every point ends, done or failed, before a failure is raised: leaving the flow shuts
    # Ray down, which would kill the points still going (their clones left behind).
    wait(futures)
    return [future.result() for future in futures]


@flow(name="privtune-sweep", log_prints=True)
def sweep(
    root: str = ".",
    epsilons: list[float] = [1.0, 4.0, 8.0],  # noqa: B006 (Prefect parameters are copied)
    seeds: list[int] = [0, 1, 2],  # noqa: B006
) -> list[str]:
    """Every method of params.yaml at every (epsilon, seed); returns the experiment names.

    With `runner.kind: ray` in params.yaml the points run concurrently on Ray, after prepare
    and base are brought up to date here once (so every point takes them from the DVC cache
    instead of each building them).
    """
    from privtune.config import load_params
    from privtune.tracking import (
        TRACKING_ENV,
        disable_telemetry,
        ensure_experiment,
        isolated_store,
        tracking_uri,
    )

    disable_telemetry()
    root = str(project_root(root))
    points = sweep_points(epsilons, seeds)
    if clash := existing_experiments(root, [name for name, _ in points]):
        raise ValueError(
            f"the project already has experiments {clash} at this commit: `dvc exp remove "
            f"{' '.join(clash)}` to run those points again, or commit first"
        )
    runner = load_params(Path(root) / "params.yaml").runner
    # Experiments run in copies of the project: point them all at the project's store (for
    # this flow only: a later flow in this process, on another project, finds it unset).
    store = tracking_uri(root)
    with isolated_store():
        os.environ[TRACKING_ENV] = store
        if runner.kind == "local":
            names = [stages.experiment(name, overrides, root) for name, overrides in points]
        else:
            stages.prepare(root)
            stages.base(root)
            ensure_experiment(root)  # created once here, not raced for by the concurrent points
            task_runner = runners.task_runner(runner, runners.flow_api_url())
            names = sweep_fanned_out.with_options(task_runner=task_runner)(
                root=root, points=points, tracking=store, runner=runner.model_dump()
            )
    # every metric of every method is a column of `dvc exp show` (about a thousand): narrowed
    keep = r"Experiment|finetune\.(epsilon|seed)$|.*evaluate-.*:test_perplexity$"
    get_run_logger().info("compare with: dvc exp show --drop '.*' --keep '%s'", keep)
    return names


def main(argv: list[str] | None = None) -> None:
    """`python flows/sweep.py [--epsilons ...] [--seeds ...]`: the sweep, run here."""
    from privtune.tracking import disable_telemetry

    # before the flow starts Prefect's temporary server, which inherits this environment
    disable_telemetry()
    import argparse

    parser = argparse.ArgumentParser(
        description="Every method of params.yaml at every (epsilon, seed), as DVC experiments."
    )
    parser.add_argument("--epsilons", nargs="+", type=float, help="target epsilons (1 4 8)")
    parser.add_argument("--seeds", nargs="+", type=int, help="finetune.seed of each point (0 1 2)")
    args = parser.parse_args(argv)
    given = {"epsilons": args.epsilons, "seeds": args.seeds}
    sweep(**{name: value for name, value in given.items() if value is not None})  # else its own


if __name__ == "__main__":
    main()
