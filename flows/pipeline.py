"""The default pipeline as a Prefect flow: prepare -> base -> per method: finetune, evaluate,
attack -> register -> report -> (optionally) promote. Given a subset of the methods, it
registers just those and leaves the report (which compares every method) alone.

python flows/pipeline.py                  # run once, locally (ephemeral Prefect server)
prefect deploy --all                      # scheduled deployments from prefect.yaml

With ``finetune_deployment`` set (prefect.yaml's nightly run sets it), each fine-tuning runs as a
run of that deployment, i.e. on a worker of the GPU pool, keyed by its inputs (tasks/dispatch.py);
everything else runs where this flow runs. Workers on other machines share stage outputs through
the DVC remote (README). Without it, and with `runner.kind: ray` in params.yaml, the methods'
stages run concurrently on a Ray cluster, one task per method (`per_method`, tasks/runners.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# tasks/ sits beside flows/ at the project root (DESIGN.md layout); make it importable when
# Prefect loads this file by path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, get_run_logger  # noqa: E402
from prefect.futures import wait  # noqa: E402

from privtune import profiles  # noqa: E402
from privtune.config import RunnerParams, load_params, project_root  # noqa: E402
from tasks import dispatch, runners, stages  # noqa: E402


def method_names(root: str) -> list[str]:
    return list(load_params(Path(root) / "params.yaml").methods)


@flow(name="privtune-methods", log_prints=True)
def per_method(
    root: str,
    methods: list[str],
    force: bool = False,
    steps: list[str] | None = None,
    runner: dict[str, Any] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """Every method's stages (``steps``, default finetune, evaluate, attack) at once: one task
    per method on this flow's task runner (`fan_out` gives it the Ray runner), each reserving
    the `runner` section's CPUs and GPUs. Returns the stages that ran, per method."""
    from prefect_ray.context import remote_options

    params = RunnerParams.model_validate(runner or {})
    with remote_options(**runners.remote_options(params)):
        futures = {
            method: stages.method_stages.submit(method, root, force, steps, runners.threads(params))
            for method in methods
        }
    # Every run ends, done or failed, before a failure is raised: leaving the flow shuts Ray
    # down, which would kill the runs still going (their MLflow runs left RUNNING).
    wait(list(futures.values()))
    return {method: future.result() for method, future in futures.items()}


def fan_out(
    root: str,
    methods: list[str],
    force: bool,
    runner: RunnerParams,
    steps: list[str] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """`per_method` on the runner's Ray cluster (a subflow: the task runner is the runner
    section's, chosen when this run reads params.yaml, not when the flow was deployed)."""
    if runner.kind != "ray":
        raise ValueError("fan_out needs `runner.kind: ray`")
    from privtune.tracking import ensure_experiment

    ensure_experiment(root)  # created once here, not raced for by the concurrent runs
    task_runner = runners.task_runner(runner, runners.flow_api_url())
    return per_method.with_options(task_runner=task_runner)(
        root=root, methods=methods, force=force, steps=steps, runner=runner.model_dump()
    )


@flow(name="privtune-pipeline", log_prints=True)
def pipeline(
    root: str = ".",
    methods: list[str] | None = None,
    force: bool = False,
    finetune_deployment: str | None = None,
    promote: bool = False,
    share: bool = False,
    finetune_timeout: float | None = None,
    finetune_local_fallback: bool = False,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Run every stage through DVC; returns the metrics of each stage, as `dvc metrics show`.

    ``methods``: a subset of params.yaml's `methods` (default: all of them).
    ``finetune_deployment``: run each fine-tuning as a run of this deployment (tasks/dispatch.py);
    it fails at once when that pool has no live worker, unless ``finetune_local_fallback``, and
    gives up after ``finetune_timeout`` seconds (None: waits as long as it takes).
    ``share``: GPU workers are on other machines; stage outputs travel through the DVC remote.
    ``profile`` / ``overrides``: a run with a named profile of profiles.yaml (e.g. `quick`, the
    reduced CPU profile) and/or dotted params.yaml overrides, built in profiles/<name>/ so it
    never touches the default pipeline's outputs or champion (privtune/profiles.py).
    """
    from privtune.tracking import disable_telemetry

    disable_telemetry()
    root = str(project_root(root))
    with one_run_per_project(root, profile, overrides):
        return _pipeline(
            root, methods, force, finetune_deployment, promote, share, finetune_timeout,
            finetune_local_fallback, profile, overrides,
        )  # fmt: skip


@contextlib.contextmanager
def one_run_per_project(
    root: str, profile: str | None, overrides: dict[str, Any] | None
) -> Iterator[None]:
    """One pipeline run at a time on a project (the checkout's, or a profile's): a second
    trigger while the first runs waited seconds for DVC's lock, then failed with its
    LockError. It now waits for the first (saying whose), and finds what that built up to
    date. The lock is the OS's: a killed run's is free."""
    from privtune.store_lock import HolderFileLock

    name = profiles.resolve(root, profile, overrides)[0] if profile or overrides else None
    lock = HolderFileLock(
        Path(root) / ".privtune" / f"pipeline{'-' + name if name else ''}.lock", root
    )
    if not lock.acquire(timeout=0):
        where = f"profiles/{name}" if name else "this checkout"
        get_run_logger().info("waiting for %s, which runs the pipeline on %s", lock.holder(), where)
        lock.acquire(timeout=-1)
    try:
        yield
    finally:
        lock.release()


def _pipeline(
    root: str,
    methods: list[str] | None,
    force: bool,
    finetune_deployment: str | None,
    promote: bool,
    share: bool,
    finetune_timeout: float | None,
    finetune_local_fallback: bool,
    profile: str | None,
    overrides: dict[str, Any] | None,
) -> dict:
    logger = get_run_logger()
    run_parameters: dict[str, Any] = {}
    if profile or overrides:
        if share:
            from privtune.errors import ConfigError

            raise ConfigError(
                "share", "a profile run has no DVC remote of its own", "run it without `share`"
            )
        # checked whole (these methods) before any stage: a bad value fails here, not after
        # prepare and base, and is not left in the profile's params.yaml
        root = str(profiles.project(root, profile, overrides, methods=methods))
        logger.info("profile %s: building in %s", profile or "overrides", root)
        # the fine-tuning worker builds the same profile project in its own checkout
        run_parameters = {"profile": profile, "overrides": overrides}
    else:
        from privtune.stages.preflight import check_project

        check_project(root, methods)  # what any stage would refuse, before the first runs
    every_method = method_names(root)
    methods = methods or every_method
    stages.prepare(root, force)
    stages.base(root, force)
    if share:
        stages.push("prepare", root)
        stages.push("base", root)
    runner = load_params(Path(root) / "params.yaml").runner
    if runner.kind == "ray" and not finetune_deployment:
        fan_out(root, methods, force, runner)  # every method's stages at once, on Ray
    else:
        for method in methods:
            if finetune_deployment:
                dispatch.finetune(
                    finetune_deployment,
                    method,
                    root,
                    force=force,
                    share=share,
                    timeout=finetune_timeout,
                    local_fallback=finetune_local_fallback,
                    run_parameters=run_parameters,
                )  # with share, it also brings the worker's outputs and their dvc.lock entry
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
    metrics = metrics_of(shown, methods, every_method)
    logger.info("metrics files: %s", ", ".join(sorted(metrics)))
    return metrics


def metrics_of(
    shown: dict[str, dict], methods: list[str], every_method: list[str]
) -> dict[str, dict]:
    """`dvc metrics show`'s files for this run: a run over some methods returns theirs (and
    the shared stages'), not the other methods' older files beside them (by exact name: a
    method's name may end with another's)."""
    from privtune.lanes import METHOD_STAGES

    others = {
        f"{stage}-{m}.json"
        for stage in (*METHOD_STAGES, "register")
        for m in every_method
        if m not in methods
    }
    return {
        path: entry.get("data", {})
        for path, entry in shown.items()
        if Path(path).name not in others
    }


def override(text: str) -> tuple[str, Any]:
    """`--set finetune.epsilon=4`: a dotted params key and its value, read as YAML (4 is a
    number, [q_proj, v_proj] a list, null None), as the deployment's `overrides` takes them."""
    import argparse

    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE (e.g. finetune.epsilon=4)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{key}: value is not valid YAML ({err})") from None


def main(argv: list[str] | None = None) -> None:
    """`python flows/pipeline.py [--methods ...] [--profile P] [--set KEY=VALUE ...] [--force]
    [--promote]`: one run here (an ephemeral Prefect server unless PREFECT_API_URL names
    one)."""
    from privtune.tracking import disable_telemetry

    # before the flow starts Prefect's temporary server, which inherits this environment
    disable_telemetry()
    import argparse

    parser = argparse.ArgumentParser(
        description="Every stage through DVC as Prefect tasks: prepare, base, per method "
        "finetune, evaluate, attack, then register and report."
    )
    parser.add_argument("--methods", nargs="+", help="a subset of params.yaml's methods")
    parser.add_argument("--profile", help="a profile of profiles.yaml (built in profiles/<name>/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=override,
        action="append",
        help="a dotted params override (repeatable), e.g. finetune.epsilon=4: the run builds "
        "in profiles/<name>/, as with --profile",
    )
    parser.add_argument("--force", action="store_true", help="rerun stages DVC finds up to date")
    parser.add_argument("--promote", action="store_true", help="end by judging the new versions")
    args = parser.parse_args(argv)
    pipeline(
        methods=args.methods,
        profile=args.profile,
        overrides=dict(args.overrides) if args.overrides else None,
        force=args.force,
        promote=args.promote,
    )


if __name__ == "__main__":
    main()
