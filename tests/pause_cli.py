"""Run `privtune` paused at a chosen point, so that a test can kill it there for certain.

    python tests/pause_cli.py MARKER POINT -- <privtune arguments>

POINT is `checkpoint` (right after the first checkpoint is saved: mid-training), `log:<step>`
(right after the metrics of that step went to MLflow: mid-training, past a checkpoint when
steps were logged after it) or `write:<name>` (inside io.atomic_dir for the output <name>,
e.g. `write:dpsgd`, once its files are in the temporary folder and before it replaces the
output: mid-write). At that point the
process touches MARKER and sleeps; the test waits for MARKER and kills the process by PID (a
race-free kill: without the pause, a small run can finish before the signal lands), or
removes MARKER to let it go on.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PAUSE_SECONDS = 600


_paused: list[Path] = []


def _pause(marker: Path) -> None:
    """Once: until the test removes MARKER (the process then goes on) or kills the process."""
    if _paused:
        return
    _paused.append(marker)
    marker.touch()
    deadline = time.monotonic() + PAUSE_SECONDS
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def pause_at(point: str, marker: Path) -> None:
    """Patch the module function where ``point`` is, so that it pauses there."""
    if point == "checkpoint":
        import privtune.callbacks as callbacks

        save = callbacks.save_checkpoint

        def save_then_pause(path: Path, state: dict) -> None:
            save(path, state)
            _pause(marker)

        callbacks.save_checkpoint = save_then_pause
    elif point.startswith("log:"):
        import privtune.tracking as tracking

        at, log = int(point.removeprefix("log:")), tracking.RunTracker.log_metrics

        def log_then_pause(self, metrics, step=None) -> None:
            log(self, metrics, step)
            if step == at and "loss" in metrics:
                _pause(marker)

        tracking.RunTracker.log_metrics = log_then_pause
    elif point.startswith("write:"):
        import privtune.io as io

        name, atomic_dir = point.removeprefix("write:"), io.atomic_dir

        @contextlib.contextmanager
        def atomic_dir_then_pause(target: str | Path) -> Iterator[Path]:
            with atomic_dir(target) as tmp:
                yield tmp
                if Path(target).name == name:
                    _pause(marker)

        io.atomic_dir = atomic_dir_then_pause
    else:
        raise SystemExit(f"unknown pause point {point!r}: checkpoint, log:<step> or write:<name>")


def main(argv: list[str]) -> int:
    marker, point, separator, *rest = argv
    assert separator == "--", __doc__
    pause_at(point, Path(marker))
    from privtune.cli import main as cli

    return cli(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
