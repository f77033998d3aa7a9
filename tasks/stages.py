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
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from privtune.lanes import METHOD_STAGES

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

    def __reduce__(self) -> tuple:
        # rebuilt from its own arguments: a Ray task's failure travels pickled to the flow
        return type(self), (self.target, self.exit_code, self.error, self.message)


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


def is_bad_input(exc: BaseException | None) -> bool:
    """True for a failure that is the user's input (exit 2: a field and its fix in the
    message), not a budget refusal, an audit violation or a bug."""
    from privtune.errors import PrivtuneError, ServerError

    while exc is not None:
        if isinstance(exc, PermanentStageError):
            return exc.exit_code == 2
        if isinstance(exc, PrivtuneError):
            return not isinstance(exc, ServerError)
        exc = exc.__cause__
    return False


class InputErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed run's exception with its traceback, three times for a flow run
    on a worker (the task, the flow, the engine). Bad input names its field and fix in the
    message, so that is what is kept, as on the command line; every other failure keeps its
    traceback."""

    LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.exc_info, tuple) and is_bad_input(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True

    @classmethod
    def install(cls) -> None:
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())


InputErrorsWithoutTraceback.install()  # for the flows that import these tasks


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
    from privtune.cli import ERROR_FILE_ENV, read_error_file
    from privtune.io import environ

    with tempfile.TemporaryDirectory(prefix="privtune-stage-") as tmp:
        report = Path(tmp) / "error.json"
        try:
            with environ({ERROR_FILE_ENV: str(report)}):
                yield
        except Exception as exc:
            found = read_error_file(report)
            if found is not None:
                raise PermanentStageError(
                    target, found["exit_code"], found["error"], found["message"]
                ) from exc
            raise


def _cli_on_path() -> None:
    """dvc.yaml calls the `privtune` CLI: make the interpreter's own bin dir win on PATH (a Ray
    worker, or `make`, may start this process with the environment's bin dir not on it)."""
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def check_before(root: str, target: str, force: bool = False) -> None:
    """What the stage's command would refuse (privtune.stages.preflight), before DVC removes
    its outputs to run it: `PermanentStageError` with the stage's own message. Not for a
    stage DVC will skip (prepare's check reads the whole corpus)."""
    from privtune.errors import PrivtuneError
    from privtune.progress import quiet_notices
    from privtune.stages import preflight

    checked = target.partition("@")[0] in preflight.STAGES
    if checked and (force or not stage_known_current(root, target)):
        try:
            with quiet_notices():  # the stage says its warnings itself, once, when it runs
                preflight.check(root, target)
        except PrivtuneError as err:
            raise PermanentStageError(target, 2, type(err).__name__, str(err)) from err


def stage_known_current(root: str, target: str) -> bool:
    """DVC's own answer (its dependencies and parameters match dvc.lock); False when DVC
    cannot say (a stage it does not know, a locked repository): then the check runs, or the
    fine-tuning is dispatched (tasks/dispatch.py), and DVC reports the problem itself."""
    from tasks.dispatch import stage_is_current

    try:
        return stage_is_current(root, target)
    except Exception:  # noqa: BLE001 (DVC's run meets and reports the same problem)
        return False


def reproduce(
    root: str, target: str, force: bool = False, wait_for_lock: bool = False
) -> list[str]:
    """Run one DVC stage (skipped when up to date); returns the stages that actually ran.

    A stage command that exits with one of `PERMANENT_EXIT_CODES` raises `PermanentStageError`
    carrying the CLI's message (which names the field and the fix, never record text).

    ``wait_for_lock`` (`dvc --wait-for-lock`): for stages reproduced concurrently in one
    workspace (a fan-out over methods). DVC holds the repository lock only to check the stage
    and to write dvc.lock, and releases it while the stage's command runs (dvc/stage/run.py,
    `unlocked_repo`), guarding the stage's own deps and outs with read/write locks instead; so
    stages of distinct methods run at once, and their dvc.lock updates take turns rather than
    failing after DVC's 3 s default wait.
    """
    from dvc.repo import Repo

    _cli_on_path()
    # DVC prints its lines through its own handlers; propagated, the root logger's console
    # handler (Prefect's logging config) printed each one again in the worker's log
    logging.getLogger("dvc").propagate = False
    check_before(root, target, force)
    # DVC resolves stage paths against the working directory: run from the repo root.
    with (
        _permanent_errors(target),
        contextlib.chdir(root),
        Repo(".", _wait_for_lock=wait_for_lock) as repo,
    ):
        ran = repo.reproduce(targets=[target], single_item=True, force=force)
    return [stage.addressing for stage in ran]


_STAGE: dict[str, Any] = {"retry_condition_fn": transient, "cache_policy": NO_CACHE}


class _RestoredFromRunCache(logging.Handler):
    """Notes DVC's "Stage '<target>' is cached - skipping run" (dvc/stage/cache.py): DVC
    returns a stage restored from its run cache among those it ran."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target, self.seen = target, False

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and record.args[0] == self.target and "is cached" in str(record.msg):
            self.seen = True


@contextlib.contextmanager
def _forwarded_notices(logger: Any, target: str, every: float = 1.0) -> Iterator[None]:
    """The stage command's progress lines and notices (privtune.progress: $PRIVTUNE_NOTICES_FILE)
    into this task's run log while DVC runs it, so the scheduler's UI shows how far a stage is
    (DVC's subprocess writes to the worker's own stderr, which the run log never sees). Only
    those lines: anything else on stderr, such as a traceback, may quote data."""
    import contextvars
    import threading

    from privtune.io import environ
    from privtune.progress import NOTICES_ENV

    with tempfile.TemporaryDirectory(prefix="privtune-notices-") as tmp:
        path = Path(tmp) / "notices.txt"
        path.touch()
        done = threading.Event()

        def pump() -> None:
            with open(path, encoding="utf-8") as handle:
                while True:
                    finished = done.is_set()  # read once more after the stage ended
                    for line in handle:
                        logger.info("%s | %s", target, line.rstrip("\n"))
                    if finished:
                        return
                    done.wait(every)

        # in this context: a new thread starts with Prefect's default settings, and a flow
        # given its server by `temporary_settings` would log to an ephemeral one it starts
        context = contextvars.copy_context()
        reader = threading.Thread(
            target=context.run, args=(pump,), name=f"notices-{target}", daemon=True
        )
        reader.start()
        try:
            with environ({NOTICES_ENV: str(path)}):
                yield
        finally:
            done.set()
            reader.join()


def _run(root: str, target: str, force: bool, wait_for_lock: bool = False) -> list[str]:
    logger = get_run_logger()
    restored = _RestoredFromRunCache(target)
    dvc_cache = logging.getLogger("dvc.stage.cache")
    dvc_cache.addHandler(restored)
    try:
        with _forwarded_notices(logger, target):
            ran = reproduce(root, target, force, wait_for_lock)
    finally:
        dvc_cache.removeHandler(restored)
    if not ran:
        done = "up to date, skipped"
    elif restored.seen:
        done = "restored from DVC's run cache (its inputs were as in an earlier run: nothing ran)"
    else:
        done = "ran"
    logger.info("%s: %s", target, done)
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
def finetune(
    method: str, root: str = ".", force: bool = False, wait_for_lock: bool = False
) -> list[str]:
    return _run(root, f"finetune@{method}", force, wait_for_lock)


@task(
    name="evaluate", task_run_name="evaluate-{method}", retries=2, retry_delay_seconds=5, **_STAGE
)
def evaluate(
    method: str, root: str = ".", force: bool = False, wait_for_lock: bool = False
) -> list[str]:
    return _run(root, f"evaluate@{method}", force, wait_for_lock)


@task(name="attack", task_run_name="attack-{method}", retries=2, retry_delay_seconds=5, **_STAGE)
def attack(
    method: str, root: str = ".", force: bool = False, wait_for_lock: bool = False
) -> list[str]:
    return _run(root, f"attack@{method}", force, wait_for_lock)


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

    _cli_on_path()
    with _permanent_errors(f"experiment {name}"), contextlib.chdir(root), Repo(".") as repo:
        results = repo.experiments.run(params=overrides, tmp_dir=True, name=name)
    get_run_logger().info("experiment %s (%s): %s", name, " ".join(overrides), results)
    return name


# The per-method stages of the pipeline, in order (what `method_stages` runs for one method).
METHOD_STEPS = METHOD_STAGES


@task(name="method", task_run_name="method-{method}", cache_policy=NO_CACHE)
def method_stages(
    method: str,
    root: str = ".",
    force: bool = False,
    steps: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, list[str]]:
    """One method's stages in order (finetune, evaluate, attack): the unit a fan-out runs
    concurrently with the other methods' (one Ray task, holding the GPU the run reserved).

    Each stage is the task of the same name (its retries included), with DVC waiting for the
    repository lock that the other methods' stages take in turn (`reproduce`). ``threads``:
    the CPU threads each stage's command may use (the CPUs the task reserved).
    """
    from tasks.runners import thread_limit

    by_name = {"finetune": finetune, "evaluate": evaluate, "attack": attack}
    unknown = sorted(set(steps or ()) - set(by_name))
    if unknown:
        raise ValueError(f"unknown per-method stage(s) {unknown}: choose from {METHOD_STEPS}")
    with thread_limit(threads):
        return {
            step: by_name[step](method, root, force, wait_for_lock=True)
            for step in (steps or METHOD_STEPS)
        }


def _git(*args: str, check: bool = True) -> str:
    import subprocess

    done = subprocess.run(["git", *args], capture_output=True, text=True, check=check)
    return done.stdout.strip() if done.returncode == 0 else ""


def _copy_of(root: Path, copy: Path) -> None:
    """A git clone of `root` at its HEAD, with the workspace's changed and untracked files (as
    `dvc exp run --temp` stashes them), its local DVC config and its DVC cache (outputs and the
    run-cache, content-addressed, so concurrent writers cannot corrupt it)."""
    import shutil

    from dvc.repo import Repo

    head = _git("-C", str(root), "rev-parse", "HEAD")
    _git("clone", "--quiet", "--shared", "--no-checkout", str(root), str(copy))
    for key in ("user.name", "user.email"):  # who commits the experiment, as in the project
        if value := _git("-C", str(root), "config", "--get", key, check=False):
            _git("-C", str(copy), "config", key, value)
    _git("-C", str(copy), "checkout", "--quiet", "-B", "fanout", head)
    paths = _git("-C", str(root), "diff", "--name-only", "HEAD").splitlines()
    paths += _git("-C", str(root), "ls-files", "--others", "--exclude-standard").splitlines()
    for path in paths:
        source, target = root / path, copy / path
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:
            target.unlink(missing_ok=True)
    local = root / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, copy / ".dvc" / "config.local")
    with Repo(str(root)) as project:
        cache = project.cache.local_cache_dir
    with Repo(str(copy)) as repo, repo.config.edit("local") as config:
        config["cache"]["dir"] = cache


@task(
    name="experiment-copy",
    task_run_name="experiment-{name}",
    retries=1,
    retry_delay_seconds=10,
    **_STAGE,
)
def experiment_in_copy(
    name: str,
    overrides: list[str],
    root: str = ".",
    tracking_uri: str | None = None,
    threads: int | None = None,
) -> str:
    """`experiment`, for points that run at once: in a clone of its own, then pushed back to the
    project (`dvc exp push`), where `dvc exp show` lists it as it lists a `--temp` one.

    Concurrent `dvc exp run --temp` in one repository is not safe: its queue is one stash that
    each process drains (dvc/repo/experiments/queue/workspace.py: `reproduce` loops on `get()`,
    which takes the stash's first entry), so one process may run another's point and the other
    none. A clone has its own stash and lock; on a cluster it sits on the shared storage beside
    the project (.dvc/tmp/fanout/, where DVC keeps its own temp copies).
    """
    import shutil
    import tempfile

    from dvc.repo import Repo

    from privtune.tracking import TRACKING_ENV, isolated_store
    from tasks.runners import thread_limit

    project = Path(root).resolve()
    parent = project / ".dvc" / "tmp" / "fanout"
    parent.mkdir(parents=True, exist_ok=True)
    copy = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    _cli_on_path()
    with isolated_store():  # this point's store, for this point only
        if tracking_uri:
            os.environ[TRACKING_ENV] = tracking_uri
        try:
            _copy_of(project, copy)  # git clones into the new, empty directory
            with (
                thread_limit(threads),
                _permanent_errors(f"experiment {name}"),
                contextlib.chdir(copy),
                Repo(".") as repo,
            ):
                repo.checkout(allow_missing=True)  # the baseline's outputs, from the shared cache
                results = repo.experiments.run(params=overrides, name=name)
                pushed = repo.experiments.push(str(project), [name])
            if not any(pushed.get(status) for status in ("success", "up_to_date")):
                raise RuntimeError(
                    f"experiment {name} ran but was not pushed back to {project} ({pushed}); "
                    f"if the project has an experiment of that name already, `dvc exp remove "
                    f"{name}`"
                )
        finally:
            shutil.rmtree(copy, ignore_errors=True)
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
