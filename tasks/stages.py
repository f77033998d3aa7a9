"""One Prefect task per pipeline stage. Each runs the DVC stage of the same name, so a
scheduled run executes exactly what `dvc repro` would and leaves dvc.lock consistent.

DVC alone decides what is up to date (from the stages' dependency and parameter hashes), so no
task caches its result in Prefect (`NO_CACHE`: a cache keyed on the task's arguments would hand
back the old result after params.yaml changed). Tasks retry only failures that may pass on a
second try (`transient`): a configuration, data or model error, a refused budget or a failed
privacy audit fails at once with its message.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

# The CLI's exit codes that a retry cannot change (privtune.cli): 2 configuration, data or
# model error, 3 budget guard, 4 privacy audit violation (retrying it would re-roll the audit).
PERMANENT_EXIT_CODES = {2: "configuration, data or model error", 3: "budget guard", 4: "audit"}


class PermanentStageError(RuntimeError):
    """A stage command failed in a way no retry can fix; the message is the CLI's own."""

    def __init__(self, target: str, exit_code: int, error: str, message: str) -> None:
        self.target, self.exit_code, self.error, self.message = target, exit_code, error, message
        kind = PERMANENT_EXIT_CODES.get(exit_code, "permanent error")
        super().__init__(
            f"{target} failed ({error}, exit {exit_code}: {kind}; not retried): {message}"
        )


def is_permanent(exc: BaseException | None) -> bool:
    """True for failures a retry would repeat: privtune's own input, budget and audit errors
    (in this process or from a stage's command), and DVC not knowing the stage or repo."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.stage.exceptions import StageNotFound

    from privtune.errors import AuditViolation, BudgetExhausted, PrivtuneError, ServerError

    permanent = (
        PermanentStageError, PrivtuneError, BudgetExhausted, AuditViolation, StageNotFound,
        NotDvcRepoError,
    )  # fmt: skip
    while exc is not None:
        if isinstance(exc, ServerError):  # a server down now may be up on the next try
            return False
        if isinstance(exc, permanent):
            return True
        exc = exc.__cause__
    return False


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is permanent (`is_permanent`)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        with contextlib.suppress(Exception):
            exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, BaseException) and is_permanent(exc))


@contextlib.contextmanager
def _permanent_errors(target: str) -> Iterator[None]:
    """Turn a stage command's exit 2-4 into `PermanentStageError` with the CLI's message:
    the command writes it to the file named by $PRIVTUNE_ERROR_FILE (privtune.cli), which the
    commands DVC starts inherit from this process."""
    from privtune.cli import ERROR_FILE_ENV

    with tempfile.TemporaryDirectory(prefix="privtune-stage-") as tmp:
        report = Path(tmp) / "error.json"
        previous = os.environ.get(ERROR_FILE_ENV)
        os.environ[ERROR_FILE_ENV] = str(report)
        try:
            yield
        except Exception as exc:
            if report.is_file():
                found = json.loads(report.read_text())
                raise PermanentStageError(
                    target, found["exit_code"], found["error"], found["message"]
                ) from exc
            raise
        finally:
            if previous is None:
                os.environ.pop(ERROR_FILE_ENV, None)
            else:
                os.environ[ERROR_FILE_ENV] = previous


def reproduce(root: str, target: str, force: bool = False) -> list[str]:
    """Run one DVC stage (skipped when up to date); returns the stages that actually ran.

    A stage command that exits with one of `PERMANENT_EXIT_CODES` raises `PermanentStageError`
    carrying the CLI's message (which names the field and the fix, never record text).
    """
    from dvc.repo import Repo

    # dvc.yaml calls the `privtune` CLI: make the interpreter's own bin dir win on PATH.
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # DVC resolves stage paths against the working directory: run from the repo root.
    with _permanent_errors(target), contextlib.chdir(root), Repo(".") as repo:
        ran = repo.reproduce(targets=[target], single_item=True, force=force)
    return [stage.addressing for stage in ran]


_STAGE: dict[str, Any] = {"retry_condition_fn": transient, "cache_policy": NO_CACHE}


def _run(root: str, target: str, force: bool) -> list[str]:
    ran = reproduce(root, target, force)
    get_run_logger().info("%s: %s", target, "ran" if ran else "up to date, skipped")
    return ran


@task(name="prepare", retries=2, retry_delay_seconds=5, **_STAGE)
def prepare(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "prepare", force)


@task(name="base", retries=2, retry_delay_seconds=5, **_STAGE)
def base(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "base", force)


@task(
    name="finetune", task_run_name="finetune-{method}", retries=1, retry_delay_seconds=10, **_STAGE
)
def finetune(method: str, root: str = ".", force: bool = False) -> list[str]:
    return _run(root, f"finetune@{method}", force)


@task(
    name="evaluate", task_run_name="evaluate-{method}", retries=2, retry_delay_seconds=5, **_STAGE
)
def evaluate(method: str, root: str = ".", force: bool = False) -> list[str]:
    return _run(root, f"evaluate@{method}", force)


@task(name="attack", task_run_name="attack-{method}", retries=2, retry_delay_seconds=5, **_STAGE)
def attack(method: str, root: str = ".", force: bool = False) -> list[str]:
    return _run(root, f"attack@{method}", force)


@task(name="register", retries=2, retry_delay_seconds=5, **_STAGE)
def register(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "register", force)


@task(
    name="register-some",
    task_run_name="register-{names}",
    retries=2,
    retry_delay_seconds=5,
    **_STAGE,
)
def register_some(names: list[str], root: str = ".") -> dict:
    """Register only these methods' models: the register stage's own code, run outside DVC,
    because the DVC stage covers every method in params.yaml (a flow run over a subset of the
    methods has not built the others)."""
    from privtune.config import load_params
    from privtune.stages.register import register as register_stage

    result = register_stage(load_params(Path(root) / "params.yaml"), names, Path(root))
    get_run_logger().info("registered %s", {n: r["version"] for n, r in result.items()})
    return result


@task(name="report", retries=2, retry_delay_seconds=5, **_STAGE)
def report(root: str = ".", force: bool = False) -> list[str]:
    return _run(root, "report", force)


@task(
    name="experiment",
    task_run_name="experiment-{name}",
    retries=1,
    retry_delay_seconds=10,
    **_STAGE,
)
def experiment(name: str, overrides: list[str], root: str = ".") -> str:
    """Run the whole pipeline as a DVC experiment (in a temporary copy) with params overridden.

    The workspace is left untouched; `dvc exp show` compares the experiments afterwards.
    """
    from dvc.repo import Repo

    with _permanent_errors(f"experiment {name}"), contextlib.chdir(root), Repo(".") as repo:
        results = repo.experiments.run(params=overrides, tmp_dir=True, name=name)
    get_run_logger().info("experiment %s (%s): %s", name, " ".join(overrides), results)
    return name


@task(name="push", task_run_name="push-{target}", retries=2, retry_delay_seconds=10, **_STAGE)
def push(target: str, root: str = ".") -> int:
    """Send a stage's outputs to the DVC remote (workers on other machines pull them)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        return repo.push(targets=[target])


@task(name="pull", task_run_name="pull-{target}", retries=2, retry_delay_seconds=10, **_STAGE)
def pull(target: str, root: str = ".") -> None:
    """Fetch a stage's outputs from the DVC remote into this worker's checkout."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        repo.pull(targets=[target])
