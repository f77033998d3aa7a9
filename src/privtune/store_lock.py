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
# Server-side keepalives of the lock's connection (seconds): a holder whose machine vanished
# without closing its connection is dropped, and its lock freed, after about 60 + 6 x 10 s.
_KEEPALIVES = {"tcp_keepalives_idle": 60, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 6}


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


class StoreLock:
    """The lock ``name`` of the store at ``uri``, taken for the project at ``project`` (said to
    whoever waits); ``acquire`` tries for a while, ``release`` frees it. Beside a sqlite store
    its file is ``<db>.locks/<name>.lock``, or the database's path with the ``suffix`` given
    (the registry's, where earlier versions put it)."""

    def __init__(
        self, uri: str, name: str, project: str | Path = ".", suffix: str | None = None
    ) -> None:
        self.uri, self.name, self.kind = uri, name, store_kind(uri)
        self.project = str(Path(project).resolve())
        self.held = False
        self._lock: Any = None  # PostgreSQL's (engine, connection) while held
        if self.kind == "file":
            from filelock import FileLock

            db = Path(uri.removeprefix("sqlite:///")).resolve()  # one file, however it is named
            locks = db.parent / f"{db.stem}.locks"
            self.path = db.with_suffix(suffix) if suffix else locks / f"{name}.lock"
            self._file = FileLock(self.path, thread_local=False)  # released from any thread
        # per database already: clients that spell the URI differently take the same lock
        self.key = advisory_key(f"privtune.{name}")

    def acquire(self, timeout: float) -> bool:
        """Hold the lock within ``timeout`` seconds (0: one try); False if another holds it."""
        if self.held or self.kind == "none":
            self.held = True
            return True
        if self.kind == "file":
            self.held = self._acquire_file(timeout)
        else:
            self.held = self._acquire_advisory(timeout)
        return self.held

    def taken_elsewhere(self) -> bool:
        """Whether another holds the lock now (a probe; beside sqlite it creates no file)."""
        if self.held or self.kind == "none":
            return False
        if self.kind == "file" and not self.path.is_file():
            return False
        if not self.acquire(timeout=0):
            return True
        self.release()
        return False

    def _acquire_file(self, timeout: float) -> bool:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file.acquire(timeout=timeout)
        except Timeout:
            return False
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        io.write_json(self.path.with_suffix(".holder.json"), info | {"project": self.project})
        return True

    def _acquire_advisory(self, timeout: float) -> bool:
        import sqlalchemy

        name = f"privtune pid {os.getpid()} on {socket.gethostname()}"[:63]  # PostgreSQL's limit
        engine = sqlalchemy.create_engine(
            self.uri,
            poolclass=sqlalchemy.pool.NullPool,
            isolation_level="AUTOCOMMIT",  # no transaction stays open while the lock is held
            connect_args={"application_name": name},
        )
        connection = engine.connect()
        try:
            for setting, value in _KEEPALIVES.items():
                connection.execute(sqlalchemy.text(f"SET {setting} = {value}"))
            deadline = time.monotonic() + timeout
            try_lock = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
            while not connection.execute(try_lock, {"key": self.key}).scalar():
                if time.monotonic() >= deadline:
                    connection.close()
                    engine.dispose()
                    return False
                time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        except BaseException:
            connection.close()
            engine.dispose()
            raise
        self._lock = (engine, connection)
        return True

    def holder(self) -> str:
        """Who holds the lock, in words ("another process" when it cannot be told)."""
        if self.kind == "file":
            try:
                info = io.read_json(self.path.with_suffix(".holder.json"))
            except (OSError, ValueError):  # gone or being written: its holder ends or starts
                info = {}
            if info:
                return (
                    f"privtune pid {info.get('pid', '?')} on {info.get('host', '?')} (since "
                    f"{info.get('since', '?')}, project {info.get('project', '?')})"
                )
        elif self.kind == "postgresql":
            found = self._advisory_holder()
            if found:
                return found
        return "another process"

    def _advisory_holder(self) -> str | None:
        import sqlalchemy

        query = sqlalchemy.text(
            "SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
            "l.granted AND l.objsubid = 1 AND l.classid::bigint = :high AND "
            "l.objid::bigint = :low"
        )
        unsigned = self.key & 0xFFFFFFFFFFFFFFFF
        engine = sqlalchemy.create_engine(self.uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                row = connection.execute(
                    query, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF}
                ).first()
        except sqlalchemy.exc.SQLAlchemyError:
            return None
        finally:
            engine.dispose()
        if row is None or not row[0]:
            return None
        since = row[2].strftime("%Y-%m-%d %H:%M:%S %Z") if row[2] is not None else "?"
        return f"{row[0]} (connected from {row[1] or 'a local socket'} since {since})"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.kind == "file":
            self.path.with_suffix(".holder.json").unlink(missing_ok=True)
            self._file.release()
        elif self._lock is not None:
            engine, connection = self._lock
            self._lock = None
            try:
                connection.close()  # the session ends: PostgreSQL frees its advisory locks
            finally:
                engine.dispose()
