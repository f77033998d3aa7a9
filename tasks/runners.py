"""Where a flow's fan-out runs: params.yaml's `runner` section turned into a Prefect task runner.

`kind: local` keeps today's behaviour: the flow calls its tasks one after another (no task runner
needed). `kind: ray`: prefect-ray's RayTaskRunner, one Ray task per run reserving the section's
`num_cpus` and `num_gpus` (prefect-ray's `remote_options`). Ray rather than Prefect's thread
pool: a stage task changes the process's working directory and environment (DVC resolves paths
from the cwd; the error file travels in the environment), which threads would share; Ray
workers are processes, on this machine or on a cluster's nodes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privtune.config import RunnerParams
from privtune.io import environ
from privtune.lanes import THREAD_VARIABLES  # each run gets the CPUs it reserved

PROJECT_CODE = Path(__file__).resolve().parents[1]  # where `tasks` and `flows` import from
# A local Ray's shared-memory object store: tasks pass only names and short lists.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20


def threads(runner: RunnerParams) -> int:
    """Threads of each run: the CPUs it reserved (at least one)."""
    return max(1, math.floor(runner.num_cpus))


def remote_options(runner: RunnerParams) -> dict[str, float]:
    """Ray resources of one run (prefect-ray's `remote_options`, i.e. `@ray.remote(...)`)."""
    return {"num_cpus": runner.num_cpus, "num_gpus": runner.num_gpus}


def _worker_env(prefect_api_url: str | None) -> dict[str, str]:
    """What every Ray worker must see: this checkout's code on the import path, no telemetry,
    the Prefect API of the flow run (without it, a worker of a flow that runs on an
    ephemeral server would start an ephemeral server of its own and report there) and the
    flow's MLflow tracking server (a worker started by `ray start` on another node would log
    to the project's sqlite file, where `register`, run by the flow, does not look)."""
    from privtune.tracking import TELEMETRY_OFF, TRACKING_ENV

    path = os.pathsep.join(p for p in (str(PROJECT_CODE), os.environ.get("PYTHONPATH")) if p)
    # Ray starts task workers at nice 15 (its `worker_niceness`): on a machine shared with
    # other work, a run would get what the other processes leave; a run here is the work.
    env = {**TELEMETRY_OFF, "PYTHONPATH": path, "RAY_worker_niceness": "0"}
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    if os.environ.get(TRACKING_ENV):
        env[TRACKING_ENV] = os.environ[TRACKING_ENV]
    return env


def task_runner(runner: RunnerParams, prefect_api_url: str | None = None) -> Any:
    """A RayTaskRunner for `kind: ray` (None for `kind: local`: the flow runs tasks in order).

    ``address`` null starts a local Ray sized by `max_concurrency` x `num_cpus` CPUs (never
    joining another Ray on this machine: address "local"; Ray counts the GPUs it finds);
    otherwise joins that cluster.
    """
    if runner.kind == "local":
        return None
    from prefect_ray import RayTaskRunner

    init: dict[str, Any] = {
        "runtime_env": {"env_vars": _worker_env(prefect_api_url)},
        "log_to_driver": True,
    }
    if runner.address is None:
        slots = runner.max_concurrency or max(1, (os.cpu_count() or 1) // max(1, threads(runner)))
        init |= {
            "address": "local",
            "num_cpus": math.ceil(slots * runner.num_cpus),
            "include_dashboard": False,
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
        }
        return RayTaskRunner(init_kwargs=init)
    if runner.address == "auto" or not runner.address.startswith("ray://"):
        return RayTaskRunner(init_kwargs={**init, "address": runner.address})
    return RayTaskRunner(address=runner.address, init_kwargs=init)


def flow_api_url() -> str | None:
    """The Prefect API URL of the running flow (its ephemeral server's, if it has one)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    client = getattr(context, "client", None) if context else None
    url = getattr(client, "api_url", None)
    if url:
        return str(url).rstrip("/")
    from prefect.settings import get_current_settings

    return get_current_settings().api.url  # a server's URL, or None for an ephemeral one


@contextlib.contextmanager
def thread_limit(count: int | None) -> Iterator[None]:
    """Set the thread variables for the stage commands this process starts, then restore."""
    if count is None:
        yield
        return
    with environ({name: str(count) for name in THREAD_VARIABLES}):
        yield
