"""One promotion or rollback at a time per tracking store.

A promotion reads the champion, judges, then moves aliases and appends to the history tag; two
at once (the nightly run and a reviewer's `privtune promote`) could both judge against the same
champion and leave the history and `previous` alias naming the wrong versions. MLflow has no
compare-and-set, so the lock lives beside the store: a file lock next to a sqlite store, a
PostgreSQL advisory lock in a PostgreSQL store (both released by the OS or the server when the
holder dies, `kill -9` included). An http(s) tracking server is reached only through its API;
there the Prefect promote flow's global concurrency limit (flows/promote.py) serialises them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

from privtune import tracking
from privtune.errors import ServerError

# How long a promotion waits for another to finish before it gives up (a transient failure:
# the CLI exits 6 and the Prefect task retries it).
WAIT_SECONDS = 600.0


def _key(uri: str) -> int:
    """A signed 64-bit advisory-lock key, the same for every client of one store."""
    digest = hashlib.sha256(f"privtune.registry:{uri}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def registry_lock(root: str | Path = ".", wait: float = WAIT_SECONDS) -> Iterator[str]:
    """Hold the store's promotion lock; yields what kind it is ("file", "postgresql", or
    "none" for a store reached through a server's API)."""
    uri = tracking.tracking_uri(root)
    if uri.startswith("sqlite:///"):
        from filelock import FileLock, Timeout

        path = Path(uri.removeprefix("sqlite:///")).with_suffix(".registry.lock")
        try:
            with FileLock(path, timeout=wait):
                yield "file"
        except Timeout as err:
            raise ServerError(
                "registry", f"another promotion has held {path} for {wait:g} s",
                "wait for it to finish (a dead holder releases the lock itself), then retry",
            ) from err  # fmt: skip
    elif uri.split(":", 1)[0].split("+", 1)[0] == "postgresql":
        import sqlalchemy

        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        key = {"key": _key(uri)}
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(f"SET lock_timeout = '{int(wait * 1000)}ms'"))
                try:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
                except sqlalchemy.exc.OperationalError as err:
                    raise ServerError(
                        "registry", f"another promotion held the store's lock for {wait:g} s",
                        "wait for it to finish, then retry",
                    ) from err  # fmt: skip
                try:
                    yield "postgresql"
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)
        finally:
            engine.dispose()
    else:
        yield "none"
