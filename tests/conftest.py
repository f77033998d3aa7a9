"""Test-wide settings: no telemetry, no network, quiet libraries."""

import atexit
import os
import shutil
import tempfile

from privtune.tracking import TELEMETRY_OFF

# the accountant's calibration cache stays out of the user's home during tests, and goes
# when the session ends (stage subprocesses inherit the variable)
_CACHE = tempfile.mkdtemp(prefix="privtune-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

for key, value in {
    **TELEMETRY_OFF,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PRIVTUNE_CACHE_DIR": _CACHE,
}.items():
    os.environ.setdefault(key, value)

import contextlib  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import absl.logging  # noqa: E402
import pytest  # noqa: E402

# dp-accounting imports absl, whose (unattached) log handler keeps the stream it first saw:
# pytest's capture. Prefect's logging setup closes every handler ever created, and absl then
# closes that stream unless it is a real one, so pytest fails at exit ("I/O operation on
# closed file") whenever a module importing Prefect is collected after one importing absl.
absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

WORDS = (
    "patient",
    "presents",
    "with",
    "cough",
    "fever",
    "chest",
    "pain",
    "diabetes",
    "metformin",
    "hypertension",
    "lisinopril",
    "asthma",
    "salbutamol",
    "plan",
    "follow",
    "up",
    "in",
    "two",
    "weeks",
    "blood",
    "pressure",
    "heart",
    "rate",
)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now, picked by the OS, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_texts(n: int, seed: int = 0, words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from privtune.data.tokenization import train_tokenizer

    return train_tokenizer(synthetic_texts(300), 320)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A 1-layer GPT-2 small enough to train in a second on a CPU."""
    import torch

    from privtune.config import BaseParams
    from privtune.modeling import build_gpt2

    torch.manual_seed(0)
    params = BaseParams(n_layer=1, n_head=2, n_embd=32, max_length=64)
    return build_gpt2(
        params, len(tiny_tokenizer), tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    )


# A whole pipeline small enough for seconds per stage: used by the CLI and pipeline tests.
TINY_PARAMS = {
    "prepare": {
        "n_private": 120,
        "n_public": 200,
        "canaries": {"repetitions": [1, 4], "per_repetition": 1, "held_out": 2, "audit": 16},
    },
    "base": {
        "vocab_size": 400,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 32,
        "max_length": 64,
        "steps": 20,
        "batch_size": 16,
    },
    "finetune": {
        # The suite compares runs (resumed vs whole, fanned out vs in turn, 2 ranks vs 1), so
        # its runs are reproducible; the default's secret seeds: tests/test_secret_noise.py.
        "secret_noise": False,
        "epsilon": 4.0,
        "batch_size": 16,
        "epochs": 1.0,
        "log_every": 2,
        "eval_every": 4,
        "eval_records": 8,
        "audit_canaries": 64,
        "lora": {"r": 4},
    },
    "methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0}},
    "registry": {"gates": {"allow_reproducible_noise": True}},
    "evaluate": {"max_records": 8},
    "attack": {"members": 10, "bootstrap": 100, "candidates": 100, "samples": 1},
}


def release_step(mech, clips, noise, expected_batch_size, batch_size=1, **action):
    """One DP step of a mechanism on the per-sample gradients already in ``p.grad_sample``:
    admit an action at ``noise``, accumulate (unless the batch is empty) and release."""
    from privtune.privacy.action import Action

    spec = mech.admit(Action(tuple(clips), noise, **action), noise)
    if batch_size:
        mech.accumulate(spec)
    return mech.release(spec, expected_batch_size, batch_size)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "methods":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_params(path, **sections):
    """Write the project's params.yaml with TINY_PARAMS and then `sections` merged over it
    (DVC needs every parameter a stage tracks to be present in the file)."""
    from pathlib import Path

    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = _merge(_merge(project, TINY_PARAMS), sections)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def edit_params(root, drop: tuple[str, ...] = (), **sections):
    """Merge ``sections`` into <root>/params.yaml (and delete the sections in ``drop``)."""
    from pathlib import Path

    import yaml

    path = Path(root) / "params.yaml"
    params = _merge(yaml.safe_load(path.read_text()), sections)
    for section in drop:
        params.pop(section, None)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# The tiny project's base is pretrained for 2 steps and evaluated on 2 notes: tests that need
# prepared data and a base model, not a good one, copy it (shutil.copytree) instead of
# building their own.
FAST_BASE = {"base": {"steps": 2}, "evaluate": {"max_records": 2}}


@contextlib.contextmanager
def no_tracking_uri() -> Iterator[None]:
    """No MLflow tracking URI set in-process inside, and none left behind on exit: a URI one
    test set would otherwise send the next test's clients to its store."""
    from privtune.tracking import isolated_store

    service = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if service is not None:
        service._tracking_uri = None
    with isolated_store():
        yield


@contextlib.contextmanager
def lmo_searches_forgotten() -> Iterator[None]:
    """The LMO-DP law searches a process keeps (lmo_search's _SEARCHED) cleared on exit, as
    each stage's process starts without them."""
    try:
        yield
    finally:
        searches = sys.modules.get("privtune.privacy.lmo_search")
        if searches is not None:
            searches._SEARCHED.clear()


@contextlib.contextmanager
def inside_project(root: Path) -> Iterator[None]:
    """The working directory at ``root``, no MLflow tracking URI (the project's own sqlite
    store) and no LMO-DP law searches kept, put back on exit: what a test's monkeypatch and
    the autouse fixtures below give it, for a module-scoped fixture that builds a project once
    (its function-scoped monkeypatch is not available there)."""
    from privtune.tracking import TRACKING_ENV

    with pytest.MonkeyPatch.context() as patch, no_tracking_uri(), lmo_searches_forgotten():
        patch.delenv(TRACKING_ENV, raising=False)
        patch.chdir(root)
        yield


def _path_pairs(source: Path, destination: Path) -> list[tuple[str, str]]:
    """How ``source`` can be written in a file (as given and resolved, plain and as a file
    URI's percent-encoded path), each with ``destination`` written alike."""
    pairs: dict[str, str] = {}
    for old, new in ((source, destination), (source.resolve(), destination.resolve())):
        pairs.setdefault(str(old), str(new))
        pairs.setdefault(old.as_uri().removeprefix("file://"), new.as_uri().removeprefix("file://"))
    return list(pairs.items())


def _rewrite_sqlite(db: Path, pairs: list[tuple[str, str]]) -> None:
    """Every text value of every table with ``old`` replaced by ``new``, then VACUUM (so no
    stale copy of an old value is left in a free page)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]:
                for old, new in pairs:
                    con.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                        (old, new, old),
                    )
        con.commit()
        con.execute("VACUUM")


def copy_project(source: Path, destination: Path) -> None:
    """Copy the directory ``source`` (a project built once per module or session, with its
    MLflow sqlite store `mlflow.db`, its artifacts `mlruns/`, a DVC cache, ...) into
    ``destination``, so a test can promote, tag or retrain in it without touching the original.

    MLflow keeps absolute paths: the experiments' artifact locations, the runs' artifact URIs,
    the logged models' and model versions' storage locations, and the pyfunc's MLmodel and the
    adapters' configs in the artifacts. Every occurrence of ``source`` in the store and in the
    text files is rewritten to ``destination``; then no byte of any file may still name
    ``source`` (a store still pointing there would let one test write into every other's
    artifacts, silently, if a newer MLflow or DVC kept a path somewhere new)."""
    source, destination = Path(source), Path(destination)
    pairs = _path_pairs(source, destination)
    olds = [old for old, _ in pairs]
    assert not any(old in new for old in olds for _, new in pairs), (source, destination)
    shutil.copytree(source, destination, symlinks=True, dirs_exist_ok=True)
    files = [p for p in destination.rglob("*") if p.is_file() and not p.is_symlink()]
    for path in files:
        data = path.read_bytes()
        if not any(old.encode() in data for old in olds):
            continue
        if data.startswith(b"SQLite format 3\x00"):
            _rewrite_sqlite(path, pairs)
            continue
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise AssertionError(f"{path} names {source} and is not text: not rewritten") from None
        for old, new in pairs:
            text = text.replace(old, new)
        path.write_text(text)
    left = [str(p) for p in files if any(old.encode() in p.read_bytes() for old in olds)]
    assert not left, f"the copy still names {source}: {left}"
    # MLflow caches each run's and logged model's artifact repository in-process by its id
    # alone, and the copy's ids are the source's: without this, logging to the copy's models
    # would write into the source's (or another copy's) mlruns/
    service = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if service is not None:
        service._artifact_repos_cache.clear()


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its content's digest."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).digest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def left_unchanged(root: Path) -> Iterator[None]:
    """Fails on exit if a file under ``root`` was added, removed or changed inside: wraps a
    template's lifetime, which tests only ever see copies of (`copy_project`)."""
    before = _tree(root)
    yield
    after = _tree(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"written into the template {root}: {changed}"


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A project with prepared data and a (barely) pretrained base, built once per session:
    copy it, never write into it."""
    from privtune.cli import main

    root = tmp_path_factory.mktemp("tiny-project")
    write_params(root / "params.yaml", **FAST_BASE)
    assert main(["--root", str(root), "--no-progress", "prepare"]) == 0
    assert main(["--root", str(root), "--no-progress", "base"]) == 0
    return root


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache_per_mutant(tmp_path_factory):
    """Under `make mutate` (mutmut sets MUTANT_UNDER_TEST) every mutant's test session gets its
    own calibration cache: the forked sessions would otherwise share the one directory made
    above, and a noise calibrated by one mutant's code would be served to the next."""
    if "MUTANT_UNDER_TEST" not in os.environ:
        yield
        return
    saved = os.environ.get("PRIVTUNE_CACHE_DIR")
    os.environ["PRIVTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("calibration-cache"))
    yield
    if saved is not None:
        os.environ["PRIVTUNE_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def _lmo_searches_per_test():
    """Each test starts without the LMO-DP law searches a process keeps."""
    with lmo_searches_forgotten():
        yield


@pytest.fixture(autouse=True)
def _mlflow_store_per_test():
    """Each test starts with no MLflow tracking URI set in-process, and leaves none behind."""
    with no_tracking_uri():
        yield
