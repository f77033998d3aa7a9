"""Atomic outputs: a stage either leaves its complete outputs or nothing at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from privtune.errors import DataError, PrivtuneError

# Temporary siblings are named `.<target>.tmp-<pid>-<random>`: a later start can tell the
# leftovers of a killed process (its pid is gone) from the work of a live one.
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)(-.*)?$")


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks, sends nothing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove the temporary outputs (`.<name>.tmp-<pid>-*`) that killed processes left in
    ``folder``; those of live processes stay. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TMP_NAME.match(path.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets a new one to read the old:
    a race with other threads creating files); Linux gives it in /proc/self/status."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    try:
        # tempfile makes its files owner-only: a team sharing a checkout (NFS) could not read
        # each other's models and metrics. Give what mkdir would have.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(tmp, target)
        return
    # Renamed aside, not deleted in place: a process killed while deleting a large folder
    # would leave a half-deleted target; aside, it is a leftover `remove_stale_tmp` clears.
    old = target.parent / f"{_tmp_prefix(target)}old-{tmp.name[-8:]}"
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", encoding: str | None = None) -> Iterator[Any]:
    """Open a temporary sibling file that replaces ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # as open() would have made it
            yield handle
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=indent, sort_keys=True)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def read_input(
    path: Path, load: Callable[[Path], Any], fix: str, error: type[PrivtuneError] = DataError
) -> Any:
    """A stage input read by `load`; a damaged file (hand-edited, cut short) is an error
    naming the file and how to rebuild it, not a crash (exit 5, which schedulers retry). The
    parser's message is left out: it can quote the record it stopped in."""
    try:
        return load(path)
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise error(str(path), f"unreadable ({type(err).__name__})", fix) from None


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A stage's metrics file (metrics/<stage>-<entry>.json), one JSON object; a damaged one
    (cut short, edited by hand) is an error naming it and the stage that writes it again."""
    path = Path(path)
    stage, _, entry = path.stem.partition("-")
    rebuild = f"`dvc repro {stage}@{entry}`" if entry else f"`dvc repro {stage}`"
    fix = (
        f"restore the committed one (`git checkout -- {path}`: metrics are kept in git) or "
        f"rebuild it: {rebuild}"
    )
    metrics = read_input(path, read_json, fix)
    if not isinstance(metrics, dict):
        raise DataError(str(path), f"not a JSON object ({type(metrics).__name__})", fix)
    return metrics


def read_numbers(path: str | Path) -> dict[str, float]:
    """The numeric entries of a metrics JSON file ({} when it is not there yet)."""
    if not Path(path).is_file():
        return {}
    return {
        k: v
        for k, v in read_metrics(path).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:  # pragma: no mutate block
    """These environment variables set for the block (and for the processes it starts), each
    back as it was after; other variables set inside are left alone."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes: the name DVC's cache gives it (read in blocks: splits grow)."""
    digest = hashlib.md5()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_sha256() -> str:
    """Content hash of privtune's own sources (this package's .py files): part of the keys of
    what the code computes (a fine-tuning run, cached exposure scores)."""
    return tree_sha256(Path(__file__).parent, "*.py")


def tree_sha256(path: str | Path, pattern: str = "*") -> str:
    """Content hash of a directory (relative names and bytes of the files matching `pattern`)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob(pattern) if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
