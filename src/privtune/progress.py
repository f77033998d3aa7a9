"""What a stage tells its user while it runs: the progress bar of long loops and notices
(counts, losses, ε, paths and run ids only, never record text).

On a terminal the bar is rich's live bar. Where no terminal shows one (a Prefect worker's log,
`dvc repro` piped to a file, a lane's log) rich would draw the bar once, at the end; there the
bar prints a plain line at every tenth of a task instead, so a log says how far a long stage
is and when it should end. Both go to stderr: stdout stays the commands' results (JSON).
Under a scheduler (tasks/stages.py sets PRIVTUNE_NOTICES_FILE) the plain lines and notices are
also appended to that file, which the task forwards into its run's log: DVC runs the stage as
a subprocess whose output the scheduler's log never sees. Nothing else on stderr goes there
(a traceback may quote data).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

LINES = 10  # plain lines a task prints where no terminal shows the bar
NOTICES_ENV = "PRIVTUNE_NOTICES_FILE"


# Set, in one thread, while a check runs what the stage itself will run and say (a lane's
# check must not quiet another lane's notices).
_QUIET = threading.local()


def notice(message: str) -> None:
    """A line for the user on stderr (and in the scheduler's log): reuse, resume, warnings."""
    if getattr(_QUIET, "depth", 0):
        return
    print(message, file=sys.stderr, flush=True)
    forward(message)


@contextlib.contextmanager
def quiet_notices() -> Iterator[None]:
    """No notices inside: for a preflight of a stage about to run, which says them itself
    (a scheduler's task log had prepare's warning three times)."""
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.depth -= 1


def forward(line: str) -> None:
    """Append ``line`` to $PRIVTUNE_NOTICES_FILE, where a scheduler's task reads it."""
    path = os.environ.get(NOTICES_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as handle:  # one write a line: O_APPEND
                handle.write(line.rstrip("\n") + "\n")
        except OSError:  # the task that reads it is gone: the line is on stderr all the same
            pass


def progress_bar(enabled: bool, *columns: ProgressColumn | str, stderr: bool = True) -> Progress:
    """The bar of a long loop; ``columns`` replace the default ones (description, bar,
    done/total with the task's `status` field, time remaining). ``stderr``: False for a bar
    whose console prints the command's own result lines (the lanes' stage lines)."""
    console = Console(stderr=stderr)
    return LoggedProgress(
        *(
            columns
            or (
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} {task.fields[status]}"),
                TimeRemainingColumn(),
            )
        ),
        console=console,
        disable=not enabled,
        transient=not console.is_terminal,  # a log has the lines: not the bar again at the end
    )


class LoggedProgress(Progress):
    """rich's Progress that also prints a line at each tenth of a task where the console is
    not a terminal (rich's own bar shows nothing there until the end)."""

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        task = self._task(task_id)
        before = task.completed if task else 0.0
        super().advance(task_id, advance)
        if self.disable or self.console.is_terminal or task is None or not task.total:
            return
        if _tenth(task.completed, task.total) > _tenth(before, task.total):
            line = progress_line(task)
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            forward(line)

    def _task(self, task_id: TaskID) -> Task | None:
        return next((task for task in self.tasks if task.id == task_id), None)


def _tenth(completed: float, total: float) -> int:
    return int(LINES * min(completed, total) // total)


def progress_line(task: Task) -> str:
    """`finetune dpsgd: 12/41 (29%), 0:01:05 elapsed, about 0:02:38 left, loss 3.412`."""
    total = task.total or 0
    line = f"{task.description}: {task.completed:g}/{total:g} ({task.percentage:.0f}%)"
    if task.elapsed is not None:
        line += f", {_clock(task.elapsed)} elapsed"
    remaining = task.time_remaining
    if task.completed < total and remaining is not None:
        line += f", about {_clock(remaining)} left"
    status = task.fields.get("status")
    return f"{line}, {status}" if status else line


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
