"""Fine-tuning as a run of another deployment (a GPU work pool), the way a scheduled run needs it:

- keyed by its inputs: the idempotency key is the fine-tuning's `run_key` (method, parameters,
  data, base model, code: what the CLI keys its MLflow runs by), so a changed input starts a new
  fine-tuning, an unchanged one reuses the finished run, and a retried pipeline never starts a
  second one;
- never waiting on nobody: without a live worker in the deployment's pool it fails at once,
  naming the pool and the command that starts a worker (or runs locally, if asked to);
- never waiting forever: it gives up after `timeout` seconds;
- never waiting on the dead: a running fine-tuning whose flow-run heartbeats stopped (its worker
  was killed, its machine lost: nobody is left to report it) is marked Crashed, so this dispatch
  fails at once instead of at the timeout, and the next one starts a new run rather than
  waiting on it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# A worker that has not sent a heartbeat for this many of its heartbeat intervals is gone
# (Prefect's own server marks it offline after 3).
MISSED_HEARTBEATS = 3
# The flow runs' own heartbeats (prefect.yaml sets it in the workers' environment); Prefect
# sends them no more often than every 30 s.
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MIN_HEARTBEAT_SECONDS = 30.0
POLL_SECONDS = 5.0
STARTUP_GRACE_SECONDS = 60.0  # before a run that never beat is judged from its start
WAIT_LOG_SECONDS = 60.0  # how often a dispatch waiting on its fine-tuning says so


class DispatchError(RuntimeError):
    """A dispatched stage could not run, or did not finish, on its work pool."""


class NoLiveWorker(DispatchError):
    """The deployment's work pool has no worker that could pick the run up."""


class DispatchTimeout(DispatchError):
    """The dispatched run did not finish within the configured timeout."""


class RemoteRunFailed(DispatchError):
    """The dispatched run ended in a state other than Completed."""


@dataclass(frozen=True)
class Dispatched:
    """What a dispatch did: `how` is "new", "reused" (an earlier run with the same inputs),
    "current" (DVC here has the stage up to date: nothing to run, no worker asked) or "local"
    (no live worker and the fallback was asked for)."""

    how: str
    flow_run_id: str | None = None
    key: str | None = None


def finetune_key(root: str | Path, method: str) -> str:
    """The idempotency key of `finetune@method`: its inputs' identity (`run_key`), the whole
    `finetune` section (DVC's parameters of the stage: run_key leaves out how a step is
    computed, a change of which still makes the stage's dvc.lock entry stale) and the
    checkout, so two projects on one Prefect server never share a fine-tuning."""
    from privtune.config import load_params
    from privtune.stages.finetune import run_key

    root = Path(root).resolve()
    params = load_params(root / "params.yaml")
    inputs = run_key(params, method, root)
    section = json.dumps(params.finetune.model_dump(), sort_keys=True, default=str)
    stage = hashlib.sha256(section.encode()).hexdigest()[:12]
    where = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return f"finetune@{method}:{inputs}:{stage}:{where}"


def _live(worker: Any, now: datetime) -> bool:
    from prefect.client.schemas.objects import WorkerStatus

    if worker.status != WorkerStatus.ONLINE or worker.last_heartbeat_time is None:
        return False
    interval = timedelta(seconds=worker.heartbeat_interval_seconds or 30)
    return now - worker.last_heartbeat_time <= MISSED_HEARTBEATS * interval


def pool_problem(client: Any, pool: str) -> str | None:
    """Why `pool` cannot run a flow run now (None when a live worker serves it)."""
    from prefect.exceptions import ObjectNotFound

    try:
        work_pool = client.read_work_pool(pool)
    except ObjectNotFound:
        return f"work pool '{pool}' does not exist: create it with " + (
            f"`prefect work-pool create --type process {pool}`"
        )
    if work_pool.is_paused:
        return f"work pool '{pool}' is paused: `prefect work-pool resume {pool}`"
    now = datetime.now(UTC)
    if not any(_live(w, now) for w in client.read_workers_for_work_pool(pool)):
        return (
            f"no live worker in work pool '{pool}': start one on a machine of that pool with "
            f"`PRIVTUNE_ROOT=/path/to/checkout prefect worker start --pool {pool}`"
        )
    return None


def heartbeat_seconds(deployment: Any) -> float | None:
    """How often the deployment's flow runs send heartbeats (None: they are not asked to); of
    a flow run, how often it was asked to (its own job variables)."""
    env = (getattr(deployment, "job_variables", None) or {}).get("env") or {}
    try:
        value = float(env.get(HEARTBEAT_ENV) or 0)
    except (TypeError, ValueError):
        return None
    return max(value, MIN_HEARTBEAT_SECONDS) if value > 0 else None


def last_heartbeat(client: Any, run: Any) -> datetime | None:
    """When the flow run last sent a heartbeat (None: never)."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    since = run.start_time or run.created or datetime.now(UTC) - timedelta(days=1)
    page = client.read_events(
        EventFilter(
            occurred=EventOccurredFilter(since=since, until=datetime.now(UTC)),
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        ),
        limit=1,
    )  # newest first
    return page.events[0].occurred if page.events else None


def stopped(beat: datetime | None, interval: float | None, now: datetime) -> bool:
    """A running run is dead when nothing was heard of it (its last heartbeat, or its start if
    it sent none) for the last few intervals. A deployment that sends no heartbeats is not
    judged; the few intervals leave room for events that lag."""
    if beat is None or interval is None:
        return False
    return now - beat > timedelta(seconds=MISSED_HEARTBEATS * interval + POLL_SECONDS)


def crash_if_dead(client: Any, run: Any, interval: float | None) -> str | None:
    """Mark a running flow run whose heartbeats stopped as Crashed; returns why (None: alive)."""
    from prefect.states import Crashed

    if interval is None or run.state is None or not run.state.is_running():
        return None
    beat = last_heartbeat(client, run)
    since = beat
    if beat is None and heartbeat_seconds(run) is not None and run.start_time is not None:
        # killed before its first beat (a run sends one as it starts): judged from its start,
        # with a grace for late events; only a run that was itself asked to beat (one created
        # before its deployment sent heartbeats is not)
        since = run.start_time + timedelta(seconds=STARTUP_GRACE_SECONDS)
    if not stopped(since, interval, datetime.now(UTC)):
        return None
    what = (
        f"{beat:%Y-%m-%d %H:%M:%S} UTC" if beat else f"it started at {run.start_time:%H:%M:%S} UTC"
    )
    why = (
        f"flow run {run.id} sent no heartbeat since {what} (every {interval:g} s expected): "
        "its worker or machine is gone"
    )
    client.set_flow_run_state(run.id, Crashed(message=why), force=True)
    return why


def _runs_with_key(client: Any, deployment_id: Any, key: str) -> list[Any]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterIdempotencyKey,
    )

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
    )


def stage_is_current(root: str | Path, target: str) -> bool:
    """DVC's own answer: the stage's dependencies and parameters match its dvc.lock entry."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        return not repo.status(targets=[target])


def _usable_key(
    client: Any,
    deployment: Any,
    key: str,
    root: str,
    target: str,
    check_outputs: bool,
) -> tuple[str, Any | None]:
    """The key to dispatch with, and the earlier run it names (None: a new run will start).

    An earlier run with the key is reused while it is pending, running (and alive) or completed
    with the stage current. One that failed, crashed or was cancelled, whose heartbeats stopped
    (marked Crashed here), or completed but whose stage is stale here (an input changed and
    then changed back), is passed over for a key derived from it, so every dispatcher of the
    same inputs still agrees on one next run.
    """
    base = key
    while True:
        found = _runs_with_key(client, deployment.id, key)
        if not found:
            return key, None
        run = found[0]
        why = crash_if_dead(client, run, heartbeat_seconds(deployment))
        if why:
            _logger().warning("passing over the fine-tuning %s", why)
            run = client.read_flow_run(run.id)
        state = run.state
        if state is None or not state.is_final():
            return key, run
        if state.is_completed() and (not check_outputs or stage_is_current(root, target)):
            return key, run
        key = f"{base}:after-{run.id}"


def _logger() -> Any:
    """The flow run's logger (its lines show in the Prefect UI), or a plain one outside runs."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("privtune.dispatch")


def _wait(
    client: Any,
    run: Any,
    timeout: float | None,
    interval: float | None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    pool: str | None = None,
) -> Any:
    """The flow run once it is final, its heartbeats stopped, or ``timeout`` passed; says
    every WAIT_LOG_SECONDS that it is still waiting, and on what (a GPU fine-tuning can take
    hours, and the pipeline's log would otherwise be silent all along). While the run waits
    for a worker of ``pool`` (scheduled, late or pending), a pool left with no live worker
    fails the wait (NoLiveWorker) instead of waiting out ``timeout``."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    said = start
    while True:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            return run
        if logger is not None and time.monotonic() - said >= WAIT_LOG_SECONDS:
            said = time.monotonic()
            logger.info(
                "waiting for flow run %s: %s, %.0f s so far%s", run.name,
                run.state.name if run.state else "unknown", said - start,
                "" if timeout is None else f" (timeout {timeout:g} s)",
            )  # fmt: skip
        queued = run.state is not None and (run.state.is_scheduled() or run.state.is_pending())
        problem = pool_problem(client, pool) if pool is not None and queued else None
        if problem:  # the run stays queued: the next pipeline run with these inputs reuses it
            raise NoLiveWorker(
                f"fine-tuning {run.name} (flow run {run.id}) is {run.state.name} on pool "
                f"'{pool}', and {problem}; the run stays queued for a worker, and the next "
                "pipeline run with the same inputs waits on it again"
            )
        why = crash_if_dead(client, run, interval)
        if why:
            raise RemoteRunFailed(
                f"fine-tuning {run.name} crashed: {why}; it is marked Crashed, and the next "
                f"pipeline run starts a new fine-tuning instead of waiting on it"
            )
        if deadline is not None and time.monotonic() >= deadline:
            return run
        left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
        time.sleep(max(0.0, min(POLL_SECONDS, left)))


def finetune(
    deployment: str,
    method: str,
    root: str,
    *,
    force: bool = False,
    share: bool = False,
    timeout: float | None = None,
    local_fallback: bool = False,
    run_parameters: dict[str, Any] | None = None,
) -> Dispatched:
    """Run `finetune@method` as a run of `deployment` and wait for it (see the module doc).

    Without ``share`` the worker runs in this checkout. ``share``: the worker is on another
    machine; it gets this checkout's dvc.lock entries of `prepare` and `base` (pushed to the DVC
    remote by the caller), and its own entry for the stage comes back published on its flow run,
    adopted here before the outputs are pulled (tasks/lockfile.py); only a failed run is passed
    over. Either way DVC here must find the stage current afterwards, or the next stage would
    evaluate another model. ``run_parameters``: more parameters of the fine-tuning run (a quick
    run's profile).
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tasks import lockfile, stages

    logger = _logger()
    target = f"finetune@{method}"
    if not force and stages.stage_known_current(root, target):  # e.g. built by `dvc repro`
        logger.info("fine-tuning %s: %s is up to date here; no worker needed", method, target)
        return Dispatched("current")
    # before a worker is taken and DVC runs there; stale here (or forced): checked without
    # asking DVC's status again
    stages.check_before(root, target, force=True)
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        pool = found.work_pool_name
        key, earlier = (None, None)
        if not force:
            # Prefect's keys are unique per flow: the deployment keeps two pools' runs apart
            inputs = f"{finetune_key(root, method)}@{deployment}"
            key, earlier = _usable_key(client, found, inputs, root, target, not share)
        done = earlier is not None and earlier.state is not None and earlier.state.is_completed()
        problem = None if done else pool_problem(client, pool)
    if problem:
        if not local_fallback:
            raise NoLiveWorker(f"cannot fine-tune {method} on {deployment}: {problem}")
        logger.warning("%s; fine-tuning %s here instead (local fallback)", problem, method)
        stages.finetune(method, root, force)
        return Dispatched("local")
    parameters: dict[str, Any] = {"method": method, "root": ".", "force": force, "share": share}
    if share:  # what the worker pulls: the data and base model this checkout built
        parameters["lock"] = lockfile.entries(root, ["prepare", "base"])
    run = run_deployment(
        deployment,
        parameters={**parameters, **(run_parameters or {})},
        flow_run_name=f"finetune-{method}",
        idempotency_key=key,
        timeout=0,  # waited for below, watching its heartbeats
    )
    reused = earlier is not None and str(earlier.id) == str(run.id)
    logger.info(
        "fine-tuning %s: %s flow run %s (%s) on pool '%s'; waiting for it", method,
        "reusing" if reused else "started", run.name, run.id, pool,
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        run = _wait(client, run, timeout, heartbeat_seconds(found), logger, pool)
    state = run.state
    if state is None or not state.is_final():
        raise DispatchTimeout(
            f"fine-tuning {method} on {deployment} (pool '{pool}') did not finish within "
            f"{timeout} s: flow run {run.id} is {state.name if state else 'unknown'}; "
            f"a later pipeline run waits for it again, or `prefect flow-run cancel {run.id}`"
        )
    if not state.is_completed():
        raise RemoteRunFailed(
            f"fine-tuning {method} on {deployment} ended {state.name}: {state.message}"
        )
    if share:  # the outputs the worker built, by its dvc.lock entry
        with get_client(sync_client=True) as client:
            lockfile.receive(root, lockfile.published(client, run.id, target))
        stages.pull(target, root)
    if not stage_is_current(root, target):
        raise DispatchError(
            f"fine-tuning {method} completed on {deployment} (flow run {run.id}) but {target} is "
            f"still stale in {root}: "
            + (
                "the worker built it from other inputs (its checkout is at another commit, or "
                "its params.yaml differs): bring the worker's checkout to this one's"
                if share
                else f"the worker ran in another checkout; start the workers of pool '{pool}' "
                f"with PRIVTUNE_ROOT={root}, or run the pipeline with share"
            )
        )
    how = "reused" if reused else "new"
    logger.info("fine-tuning %s: %s flow run %s done (key %s)", method, how, run.id, key)
    return Dispatched(how, str(run.id), key)
