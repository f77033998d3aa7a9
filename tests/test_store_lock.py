"""Locks beside each kind of store (privtune/store_lock.py): the promotion lock
(privtune/registry/lock.py) and a fine-tuning's run-key lock, which another checkout or machine
sharing the store takes too. A second holder waits, says who holds it, gives up after its wait;
a holder killed with `kill -9` releases it."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from privtune import tracking
from privtune.errors import ServerError
from privtune.registry.lock import registry_lock
from privtune.store_lock import StoreLock

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


def test_a_postgresql_store_that_is_down_is_a_server_error_at_once(tmp_path):
    """The lock's own connection: exit 6's error (retried by the flows), the setting named,
    the password hidden, within the connect timeout; nothing held."""
    from tests.conftest import free_port

    uri = f"postgresql://alice:s3cret@127.0.0.1:{free_port()}/test"
    lock = StoreLock(uri, "registry", tmp_path)
    started = time.monotonic()
    with pytest.raises(ServerError) as err:
        lock.acquire(0)
    assert time.monotonic() - started < 10 and not lock.held
    assert "MLFLOW_TRACKING_URI" in str(err.value) and "does not answer" in str(err.value)
    assert "s3cret" not in str(err.value) and "alice:***@" in str(err.value)


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


@pytest.mark.parametrize("store", ["sqlite_store", "postgres_store"])
def test_a_store_lock_is_held_by_one_and_names_its_holder(store, request):
    root = request.getfixturevalue(store)
    uri = tracking.tracking_uri(root)
    first, second = StoreLock(uri, "finetune-k"), StoreLock(uri, "finetune-k")
    other_name = StoreLock(uri, "finetune-other")
    assert not second.taken_elsewhere()
    assert not (root / "mlflow.locks").exists()  # a probe creates nothing
    assert first.acquire(timeout=0)
    try:
        assert second.taken_elsewhere() and not other_name.taken_elsewhere()
        started = time.monotonic()
        assert not second.acquire(timeout=0.6)  # tried for its whole wait
        assert time.monotonic() - started >= 0.5
        assert f"privtune pid {os.getpid()} on " in second.holder()
        assert other_name.acquire(timeout=0)  # another name is another lock
        other_name.release()
    finally:
        first.release()
    assert not second.taken_elsewhere()
    assert second.acquire(timeout=5)  # released: the next one takes it
    second.release()
    if store == "sqlite_store":
        assert (root / "mlflow.locks/finetune-k.lock").exists()
        assert not list((root / "mlflow.locks").glob("*.holder.json"))  # removed on release


@pytest.mark.parametrize("store", ["sqlite_store", "postgres_store"])
def test_a_fine_tuning_in_another_checkout_of_the_store_is_waited_for(
    store, request, tmp_path, capsys, monkeypatch
):
    """Two checkouts (two project folders) sharing one tracking store: the second's turn for
    a run key waits while the first holds the store's lock for it (its own project lock is
    free), says whom it waits for, and goes on when the lock is released."""
    import contextlib

    from privtune.privacy.distributed import Replica
    from privtune.stages import finetune

    root = request.getfixturevalue(store)
    other_checkout = tmp_path / "other-checkout"
    other_checkout.mkdir()
    shared = tracking.tracking_uri(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)  # sqlite: the first checkout's file
    first = StoreLock(shared, "finetune-k")
    assert not finetune._held_elsewhere(other_checkout, "dpsgd", "k")
    assert first.acquire(timeout=0)
    assert finetune._held_elsewhere(other_checkout, "dpsgd", "k")  # waits before loading
    threading.Timer(1.5, first.release).start()
    began = time.monotonic()
    with contextlib.ExitStack() as held:
        finetune.wait_turn(other_checkout, "dpsgd", "k", Replica(), held, round_seconds=0.2)
        assert time.monotonic() - began >= 1.4  # it waited for the first
        assert not StoreLock(shared, "finetune-k").acquire(timeout=0)  # and holds it now
    after = StoreLock(shared, "finetune-k")
    assert after.acquire(timeout=0)  # released at the end
    after.release()
    said = capsys.readouterr().err
    assert f"privtune pid {os.getpid()} on " in said
    assert "is fine-tuning the same inputs against this tracking store" in said


def test_an_acquire_interrupted_after_the_lock_is_taken_is_still_released(
    sqlite_store, monkeypatch
):
    """Ctrl-C (or SIGTERM made an interrupt) between taking the file lock and writing who holds
    it: `release` still frees it, so a retry in the same process does not wait for itself."""
    from privtune import store_lock

    uri = tracking.tracking_uri(sqlite_store)
    lock = StoreLock(uri, "finetune-k")

    def interrupted(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_lock.io, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire(timeout=0)
    assert StoreLock(uri, "finetune-k").taken_elsewhere()
    lock.release()
    assert not StoreLock(uri, "finetune-k").taken_elsewhere()


def test_a_probe_writes_nothing_and_refuses_no_one(sqlite_store):
    uri = tracking.tracking_uri(sqlite_store)
    first = StoreLock(uri, "finetune-k")
    assert first.acquire(timeout=0)
    first.release()
    holder = sqlite_store / "mlflow.locks/finetune-k.holder.json"
    assert not StoreLock(uri, "finetune-k").taken_elsewhere() and not holder.exists()


def test_the_postgresql_lock_outlives_an_idle_session_timeout(postgres_store, monkeypatch):
    """The lock's session idles for the whole run: a server or role idle_session_timeout
    (PGOPTIONS stands in for one here) would end it and free the lock under a live holder."""
    monkeypatch.setenv("PGOPTIONS", "-c idle_session_timeout=1000")
    uri = tracking.tracking_uri(postgres_store)
    first = StoreLock(uri, "finetune-idle")
    assert first.acquire(timeout=0)
    try:
        time.sleep(2.5)
        assert StoreLock(uri, "finetune-idle").taken_elsewhere()
        assert not StoreLock(uri, "finetune-idle").acquire(timeout=0)
    finally:
        first.release()


def test_the_registry_lock_keeps_the_key_earlier_versions_take(postgres_store):
    """A nightly flow on the previous version and a reviewer's `privtune promote` on this one
    must still exclude each other in one PostgreSQL store."""
    uri = tracking.tracking_uri(postgres_store)
    earlier = StoreLock(uri, "earlier", label=f"privtune.registry:{uri}")
    with registry_lock(postgres_store):
        assert earlier.taken_elsewhere()
    assert not earlier.taken_elsewhere()
