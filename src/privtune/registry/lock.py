"""One promotion or rollback at a time per tracking store.

A promotion reads the champion, judges, then moves aliases and appends to the history tag; two
at once (the nightly run and a reviewer's `privtune promote`) could both judge against the same
champion and leave the history and `previous` alias naming the wrong versions. MLflow has no
compare-and-set, so the lock lives beside the store (`privtune.store_lock`): a file lock next to
a sqlite store, a PostgreSQL advisory lock in a PostgreSQL store (both released by the OS or the
server when the holder dies, `kill -9` included). An http(s) tracking server is reached only
through its API; there the one slot of a Prefect global concurrency limit serialises them: the
promote and rollback flows hold it, and so does the CLI wherever a Prefect server is configured
(PREFECT_API_URL), so a reviewer's `privtune promote` waits for the nightly flow's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from privtune import tracking
from privtune.errors import ServerError
from privtune.store_lock import StoreLock

# How long a promotion waits for another to finish before it gives up (a transient failure:
# the CLI exits 6 and the Prefect task retries it).
WAIT_SECONDS = 600.0
# Prefect's global concurrency limit (one slot) of promotions through a tracking server.
REGISTRY_LIMIT = "privtune-registry"
# Set while this context holds the slot: the flow holds it around the promotion it calls, which
# must not wait for itself.
_SLOT_HELD: ContextVar[bool] = ContextVar("privtune_registry_slot_held", default=False)


def _prefect_api() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def prefect_slot(wait: float | None = None) -> Iterator[None]:
    """Hold the registry's slot of Prefect's server (the limit is created on first use); a
    holder killed while holding it frees it when its lease (300 s, renewed while alive) runs
    out. Already held in this context (the flow around its own promotion): nothing to take."""
    if _SLOT_HELD.get():
        yield
        return
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    server = _prefect_api() or "the ephemeral Prefect server"
    with contextlib.ExitStack() as stack:
        try:
            with get_client(sync_client=True) as client:
                try:
                    client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT)
                except ObjectNotFound:
                    with contextlib.suppress(ObjectAlreadyExists):  # another created it first
                        client.create_global_concurrency_limit(
                            GlobalConcurrencyLimitCreate(name=REGISTRY_LIMIT, limit=1)
                        )
            stack.enter_context(
                concurrency(REGISTRY_LIMIT, occupy=1, strict=True, timeout_seconds=wait)
            )
        except TimeoutError as err:
            raise ServerError(
                "registry", f"another promotion has held Prefect's {REGISTRY_LIMIT} for {wait:g} s",
                "wait for it to finish (a dead holder's lease runs out), then retry",
            ) from err  # fmt: skip
        except (httpx.TransportError, httpx.HTTPStatusError) as err:  # down, or refusing
            raise ServerError(
                "registry", f"{server} did not answer ({type(err).__name__}): its "
                f"{REGISTRY_LIMIT} limit serialises promotions through a tracking server",
                "start it, or unset PREFECT_API_URL where no flow promotes",
            ) from err  # fmt: skip
        token = _SLOT_HELD.set(True)
        try:
            yield
        finally:
            _SLOT_HELD.reset(token)


@contextlib.contextmanager
def registry_lock(root: str | Path = ".", wait: float = WAIT_SECONDS) -> Iterator[str]:
    """Hold the store's promotion lock; yields what kind it is ("file", "postgresql",
    "prefect" for a store reached through a server's API where a Prefect server is configured,
    else "none")."""
    uri = tracking.tracking_uri(root)
    # the advisory key earlier versions took, so that they and this one exclude each other
    label = f"privtune.registry:{uri}"
    lock = StoreLock(uri, "registry", root, suffix=".registry.lock", label=label)
    if lock.kind != "none":
        first = min(1.0, wait)
        if not lock.acquire(timeout=first):  # held: say who it waits for
            from privtune.progress import notice

            notice(f"waiting for another promotion ({lock.holder()}) to finish, up to {wait:g} s")
        if not lock.held and not lock.acquire(timeout=wait - first):
            where = lock.path if lock.kind == "file" else "the store's lock"
            raise ServerError(
                "registry", f"another promotion ({lock.holder()}) has held {where} for "
                f"{wait:g} s", "wait for it to finish (a dead holder releases the lock itself), "
                "then retry",
            )  # fmt: skip
        try:
            yield lock.kind
        finally:
            lock.release()
    elif _SLOT_HELD.get() or _prefect_api() is not None:
        with prefect_slot(wait):
            yield "prefect"
    else:
        yield "none"
