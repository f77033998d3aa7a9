"""Named locks of a tracking store, shared by every checkout and machine that uses it.

Some things must happen once per store, not once per project: a promotion (two would judge
against the same champion) and a fine-tuning with a given run key (two would release two models
of the same records). MLflow has no compare-and-set, so the lock lives beside the store: a file
lock next to a sqlite store, a PostgreSQL advisory lock in a PostgreSQL store. Both are freed by
the OS or the server when their holder dies (`kill -9` included; a PostgreSQL client whose
machine vanished is dropped after about two minutes of unanswered keepalives). A store reached
only through an http(s) server's API has no lock here (kind "none"): its callers say what they
do instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from privtune import io

POLL_SECONDS = 0.5  # how often a waiter asks PostgreSQL again
CONNECT_SECONDS = 5  # a PostgreSQL that does not answer a connection within this is down
# Settings of the lock's session. Server-side keepalives (seconds): a holder whose machine
# vanished without closing its connection is dropped, and its lock freed, after about 60 + 6 x
# 10 s. No idle timeout: the session idles for the whole run, and a server or role setting
# ending it (PostgreSQL 14's idle_session_timeout) would free the lock under a live holder.
_SESSION = {
    "tcp_keepalives_idle": 60,
    "tcp_keepalives_interval": 10,
    "tcp_keepalives_count": 6,
    "idle_session_timeout": 0,
}


def store_kind(uri: str) -> str:
    """The lock a store with this URI has: "file", "postgresql" or "none"."""
    if uri.startswith("sqlite:///"):
        return "file"
    if uri.split(":", 1)[0].split("+", 1)[0] == "postgresql":
        return "postgresql"
    return "none"


def advisory_key(label: str) -> int:
    """A signed 64-bit advisory-lock key for ``label``, the same for every client."""
    digest = hashlib.sha256(label.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class HolderFileLock:
    """A file lock whose holder says who it is in ``<lock>.holder.json`` (pid, host, since,
    project), for whoever waits; freed by the OS when the holder dies."""

    def __init__(self, path: Path, project: str | Path = ".") -> None:
        from filelock import FileLock

        self.path, self.project = Path(path), str(Path(project).resolve())
        self.holder_file = self.path.with_suffix(".holder.json")
        self._file = FileLock(self.path, thread_local=False)  # released from any thread
        self.held = False

    def acquire(self, timeout: float) -> bool:
        """Hold the lock within ``timeout`` seconds (0: one try); False if another holds it."""
        from filelock import Timeout

        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file.acquire(timeout=timeout)
        except Timeout:
            return False
        self.held = True
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        io.write_json(self.holder_file, info | {"project": self.project})
        return True

    def holder(self) -> str:
        """Who holds the lock, in words ("another process" when it cannot be told)."""
        try:
            info = io.read_json(self.holder_file)
        except (OSError, ValueError):  # gone or being written: its holder ends or starts
            return "another process"
        return (
            f"privtune pid {info.get('pid', '?')} on {info.get('host', '?')} (since "
            f"{info.get('since', '?')}, project {info.get('project', '?')})"
        )

    def taken_elsewhere(self) -> bool:
        """Whether another holds it now (a try that writes nothing; no file: nobody does)."""
        from filelock import Timeout

        if self.held or not self.path.is_file():
            return False
        try:
            self._file.acquire(timeout=0)
        except Timeout:
            return True
        self._file.release()
        return False

    def release(self) -> None:
        if self.held:
            self.held = False
            self.holder_file.unlink(missing_ok=True)
        if self._file.is_locked:  # also after an acquire interrupted before `held` was set
            self._file.release()


class StoreLock:
    """The lock ``name`` of the store at ``uri``, taken for the project at ``project`` (said to
    whoever waits); ``acquire`` tries for a while, ``release`` frees it. Beside a sqlite store
    its file is ``<db>.locks/<name>.lock``, or the database's path with the ``suffix`` given
    (the registry's, where earlier versions put it). In PostgreSQL the key hashes ``label``
    (default ``privtune.<name>``: locks are per database, so clients that spell the URI
    differently take the same one)."""

    def __init__(
        self,
        uri: str,
        name: str,
        project: str | Path = ".",
        suffix: str | None = None,
        label: str | None = None,
    ) -> None:
        self.uri, self.name, self.kind = uri, name, store_kind(uri)
        self.held = False
        self._session: Any = None  # PostgreSQL's (engine, connection), from its first try on
        if self.kind == "file":
            db = Path(uri.removeprefix("sqlite:///")).resolve()  # one file, however it is named
            locks = db.parent / f"{db.stem}.locks"
            self.path = db.with_suffix(suffix) if suffix else locks / f"{name}.lock"
            self._file = HolderFileLock(self.path, project)
        self.key = advisory_key(label or f"privtune.{name}")

    def acquire(self, timeout: float) -> bool:
        """Hold the lock within ``timeout`` seconds (0: one try); False if another holds it."""
        if self.held or self.kind == "none":
            self.held = True
            return True
        if self.kind == "file":
            self.held = self._file.acquire(timeout)
        else:
            self.held = self._acquire_advisory(timeout)
        return self.held

    def taken_elsewhere(self) -> bool:
        """Whether another holds the lock now: a look, not a try (beside sqlite it creates no
        file; in PostgreSQL it reads pg_locks), so a real contender is never refused by it."""
        if self.held or self.kind == "none":
            return False
        if self.kind == "file":
            return self._file.taken_elsewhere()
        return self._advisory_row() is not None

    def _acquire_advisory(self, timeout: float) -> bool:
        import sqlalchemy

        name = f"privtune pid {os.getpid()} on {socket.gethostname()}"[:63]  # PostgreSQL's limit
        engine = sqlalchemy.create_engine(
            self.uri,
            poolclass=sqlalchemy.pool.NullPool,
            isolation_level="AUTOCOMMIT",  # no transaction stays open while the lock is held
            connect_args={"application_name": name, "connect_timeout": CONNECT_SECONDS},
        )
        try:
            connection = engine.connect()
        except sqlalchemy.exc.OperationalError as err:  # down: exit 6; refused: 2; no traceback
            from privtune.tracking import database_error

            engine.dispose()
            raise database_error(self.uri, err) from None
        # kept before the lock is asked for: an interrupt once it is granted still frees it
        self._session = (engine, connection)
        try:
            for setting, value in _SESSION.items():
                try:
                    connection.execute(sqlalchemy.text(f"SET {setting} = {value}"))
                except sqlalchemy.exc.DBAPIError:
                    if setting != "idle_session_timeout":  # new in PostgreSQL 14
                        raise
            deadline = time.monotonic() + timeout
            try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
            while not connection.execute(try_lock, {"key": self.key}).scalar():
                if time.monotonic() >= deadline:
                    self._close()
                    return False
                time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        except BaseException:
            self._close()
            raise
        return True

    def holder(self) -> str:
        """Who holds the lock, in words ("another process" when it cannot be told: in
        PostgreSQL, a role that may not read other sessions' application_name)."""
        if self.kind == "file":
            return self._file.holder()
        row = self._advisory_row() if self.kind == "postgresql" else None
        if row is None or not row[0]:
            return "another process"
        since = row[2].strftime("%Y-%m-%d %H:%M:%S %Z") if row[2] is not None else "?"
        return f"{row[0]} (connected from {row[1] or 'a local socket'} since {since})"

    def _advisory_row(self) -> Any:
        """(application_name, client_addr, backend_start) of the session holding the key in
        this database, None when none holds it (or the server cannot be asked)."""
        import sqlalchemy

        query = sqlalchemy.text(
            "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
            "LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
            "l.granted AND l.objsubid = 1 AND l.classid::bigint = :high AND "
            "l.objid::bigint = :low AND "
            "l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        engine = sqlalchemy.create_engine(self.uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                return connection.execute(
                    query, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF}
                ).first()
        except sqlalchemy.exc.SQLAlchemyError:
            return None
        finally:
            engine.dispose()

    def release(self) -> None:
        """Free the lock; safe to call again, or after an interrupted ``acquire``."""
        self.held = False
        if self.kind == "file":
            self._file.release()
        else:
            self._close()

    def _close(self) -> None:
        if self._session is not None:
            engine, connection = self._session
            self._session = None
            try:
                connection.close()  # the session ends: PostgreSQL frees its advisory locks
            finally:
                engine.dispose()
