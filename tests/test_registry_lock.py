"""The promotion lock beside each kind of store (privtune/registry/lock.py): a second holder
waits, gives up after its wait as a transient error naming the lock, and a holder killed with
`kill -9` releases it."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from privtune.errors import ServerError
from privtune.registry.lock import registry_lock

POSTGRES = "postgresql://root@127.0.0.1:5432/test"


def _second_holder(root, wait):
    """Try the lock from another thread, as another promotion would: what it got."""
    got = []

    def take():
        try:
            with registry_lock(root, wait=wait) as kind:
                got.append(kind)
        except ServerError as err:
            got.append(err)

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(timeout=60)
    return got[0]


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def postgres_store(tmp_path, monkeypatch):
    import sqlalchemy

    try:
        sqlalchemy.create_engine(POSTGRES).connect().close()
    except sqlalchemy.exc.OperationalError:
        pytest.fail("PostgreSQL is not running at 127.0.0.1:5432 (.ci/run starts it)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", POSTGRES)
    return tmp_path


@pytest.mark.parametrize(
    ("store", "kind"), [("sqlite_store", "file"), ("postgres_store", "postgresql")]
)
def test_a_second_holder_waits_then_gives_up_naming_the_lock(store, kind, request):
    root = request.getfixturevalue(store)
    with registry_lock(root) as held:
        assert held == kind
        refused = _second_holder(root, wait=0.5)
        assert isinstance(refused, ServerError) and refused.field == "registry"
        assert "another promotion" in str(refused) and "retry" in str(refused)
    assert _second_holder(root, wait=5) == kind  # released: the next one takes it


def test_the_sqlite_lock_sits_beside_the_store(sqlite_store):
    with registry_lock(sqlite_store):
        assert (sqlite_store / "mlflow.registry.lock").exists()


def test_a_server_store_has_no_lock_of_its_own(tmp_path, monkeypatch):
    """Reached only through its API: without a Prefect server to hold the flows' slot
    (tests/test_deployments.py), nothing serialises it; with one that does not answer, the
    promotion is a transient error naming it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with temporary_settings(updates={PREFECT_API_URL: None}), registry_lock(tmp_path) as kind:
        assert kind == "none"
    unreachable = temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"})
    refused = pytest.raises(ServerError, match="http://127.0.0.1:9/api did not answer")
    with unreachable, refused, registry_lock(tmp_path, wait=1):
        pass


@pytest.mark.parametrize("store", ["sqlite_store", "postgres_store"])
def test_a_holder_killed_with_sigkill_releases_the_lock(store, request):
    root = request.getfixturevalue(store)
    code = (
        "import sys, time\n"
        "from privtune.registry.lock import registry_lock\n"
        "with registry_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert isinstance(_second_holder(root, wait=0.5), ServerError)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        started = time.monotonic()
        assert isinstance(_second_holder(root, wait=30), str)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
