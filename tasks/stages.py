"""One Prefect task per pipeline stage. Each runs the DVC stage of the same name, so a
scheduled run executes exactly what `dvc repro` would and leaves dvc.lock consistent."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from prefect import get_run_logger, task


def reproduce(root: str, target: str, force: bool = False) -> list[str]:
    """Run one DVC stage (skipped when up to date); returns the stages that actually ran."""
    from dvc.repo import Repo

    # dvc.yaml calls the `privtune` CLI: make the interpreter's own bin dir win on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # DVC resolves stage paths against the working directory: run from the repo root.
    with contextlib.chdir(root), Repo(".") as repo:
        ran = repo.reproduce(targets=[target], single_item=True, force=force)
    return [stage.addressing for stage in ran]


def _run(root: str, target: str, force: bool) -> list[str]:
    ran = reproduce(root, target, force)
    get_run_logger().info("%s: %s", target, "ran" if ran else "up to date, skipped")
    return ran


@task(name="prepare", retries=2, retry_delay_seconds=5)
def prepare(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "prepare", force)


@task(name="base", retries=2, retry_delay_seconds=5)
def base(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "base", force)


@task(name="finetune", task_run_name="finetune-{method}", retries=1, retry_delay_seconds=10)
def finetune(method: str, root: str = ".", force: bool = False) -> list[str]:
    return _run(root, f"finetune@{method}", force)


@task(name="evaluate", task_run_name="evaluate-{method}", retries=2, retry_delay_seconds=5)
def evaluate(method: str, root: str = ".", force: bool = False) -> list[str]:
    return _run(root, f"evaluate@{method}", force)


@task(name="attack", task_run_name="attack-{method}", retries=2, retry_delay_seconds=5)
def attack(method: str, root: str = ".", force: bool = False) -> list[str]:
    return _run(root, f"attack@{method}", force)


@task(name="register", retries=2, retry_delay_seconds=5)
def register(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "register", force)


@task(name="register-some", task_run_name="register-{names}", retries=2, retry_delay_seconds=5)
def register_some(names: list[str], root: str = ".") -> dict:
    """Register only these methods' models: the register stage's own code, run outside DVC,
    because the DVC stage covers every method in params.yaml (a flow run over a subset of the
    methods has not built the others)."""
    from privtune.config import load_params
    from privtune.stages.register import register as register_stage

    result = register_stage(load_params(Path(root) / "params.yaml"), names, Path(root))
    get_run_logger().info("registered %s", {n: r["version"] for n, r in result.items()})
    return result


@task(name="report", retries=2, retry_delay_seconds=5)
def report(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "report", force)


@task(name="experiment", task_run_name="experiment-{name}", retries=1, retry_delay_seconds=10)
def experiment(name: str, overrides: list[str], root: str = ".") -> str:
    """Run the whole pipeline as a DVC experiment (in a temporary copy) with params overridden.

    The workspace is left untouched; `dvc exp show` compares the experiments afterwards.
    """
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        results = repo.experiments.run(params=overrides, tmp_dir=True, name=name)
    get_run_logger().info("experiment %s (%s): %s", name, " ".join(overrides), results)
    return name


@task(name="push", task_run_name="push-{target}", retries=2, retry_delay_seconds=10)
def push(target: str, root: str = ".") -> int:
    """Send a stage's outputs to the DVC remote (workers on other machines pull them)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        return repo.push(targets=[target])


@task(name="pull", task_run_name="pull-{target}", retries=2, retry_delay_seconds=10)
def pull(target: str, root: str = ".") -> None:
    """Fetch a stage's outputs from the DVC remote into this worker's checkout."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        repo.pull(targets=[target])
