"""The deployments of prefect.yaml, for real: one local Prefect server in a temporary home for
the module, `prefect deploy --all` from a directory that is not the workers' checkout, a
process worker per pool (started as a user would, not the test harness). The nightly pipeline
dispatches fine-tuning to the GPU pool keyed by the stage's inputs: a changed fine-tuning
parameter trains again, an unchanged run reuses. Dispatch to a pool nobody serves fails at once,
and a configuration error is not retried."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import edit_params, free_port, write_params
from tests.test_pipeline import PIPELINE, ROOT, _sh, make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
NIGHTLY = "privtune-pipeline/nightly-pipeline"
MODEL = "privtune-clinical-notes"


def _wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("Prefect server did not become healthy")


def _prefect(env, cwd, *args, timeout=300):
    out = subprocess.run(
        [BIN / "prefect", "--no-prompt", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, (
        f"prefect {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def _drain() -> None:
    """Send this process's pending Prefect logs and events while the server is still up (as
    prefect_test_harness does), or they retry against a stopped server at exit."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start`; this process talks to it too (in-process flows)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # the worktree's code first, for the workers' flow runs and the stages they start
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--analytics-off"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_healthy(env["PREFECT_API_URL"])
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            try:
                yield env
            finally:
                _drain()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _start_worker(env, cwd, pool):
    return subprocess.Popen(
        [BIN / "prefect", "--no-prompt", "worker", "start", "--pool", pool,
         "--install-policy", "never"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """prefect.yaml deployed from `deployer` (whose $PRIVTUNE_ROOT is itself: a path that must
    not reach the workers), and one worker per pool running in the project's checkout."""
    base = tmp_path_factory.mktemp("deployments")
    project = make_project(base)
    deployer = base / "deployer"
    deployer.mkdir()
    for item in ("flows", "tasks"):
        for where in (project, deployer):
            shutil.copytree(ROOT / item, where / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", deployer)
    env = dict(server, PRIVTUNE_ROOT=str(deployer))
    for pool in ("privtune-cpu", "privtune-gpu"):
        _prefect(env, deployer, "work-pool", "create", "--type", "process", pool)
    deployed = _prefect(env, deployer, "deploy", "--all")
    for name in ("nightly-pipeline", "gpu-finetune", "sweep", "promote", "rollback"):
        assert name in deployed
    # Workers find their checkout at run time; they poll every 2 s instead of 10 to save time.
    worker_env = dict(server, PRIVTUNE_ROOT=str(project), PREFECT_WORKER_QUERY_SECONDS="2")
    workers = [_start_worker(worker_env, base, p) for p in ("privtune-cpu", "privtune-gpu")]
    try:
        yield project, deployer, server
    finally:
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)  # a background worker ignores SIGINT
            worker.wait(timeout=30)


def _run_nightly(**parameters):
    from prefect.deployments import run_deployment

    run = run_deployment(NIGHTLY, parameters=parameters, timeout=1200, as_subflow=False)
    assert run.state is not None and run.state.is_final(), f"{NIGHTLY} still {run.state}"
    return run


def _finetune_runs():
    """The GPU deployment's flow runs, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["finetune-dpsgd"]))
        )
    return sorted(runs, key=lambda r: r.created)


def _tracked(project):
    """(finished MLflow fine-tuning runs of dpsgd, registered versions) in the project's store."""
    import mlflow

    from privtune import tracking

    client = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.info.run_name == "dpsgd" and r.info.status == "FINISHED"
    ]
    return runs, client.search_model_versions(f"name='{MODEL}'")


def test_deployments_carry_no_deployer_path_and_one_tracking_store(deployed):
    from prefect.client.orchestration import get_client

    _, deployer, _ = deployed
    with get_client(sync_client=True) as client:
        for name in (NIGHTLY, "privtune-finetune/gpu-finetune", "privtune-promote/promote"):
            deployment = client.read_deployment_by_name(name)
            assert str(deployer) not in json.dumps([deployment.pull_steps])
            assert deployment.pull_steps == [{"privtune.workers.set_project_root": {}}]
            env = deployment.job_variables["env"]
            assert env["MLFLOW_TRACKING_URI"] == "sqlite:///mlflow.db"
        nightly = client.read_deployment_by_name(NIGHTLY)
        assert nightly.parameters["finetune_timeout"] > 0
        assert nightly.parameters["finetune_local_fallback"] is False


def test_nightly_retrains_when_a_parameter_changed_and_reuses_when_not(deployed):
    from privtune.config import load_params
    from privtune.stages.finetune import run_key

    project, deployer, _ = deployed
    first = _run_nightly(methods=["dpsgd"])
    assert first.state.is_completed(), first.state
    assert "privtune" in first.tags and "auto-scheduled" not in first.tags  # run by hand
    assert [r.state.type.value for r in _finetune_runs()] == ["COMPLETED"]
    # keyed per deployment too (Prefect's keys are unique per flow, not per deployment)
    assert _finetune_runs()[0].idempotency_key.endswith("@privtune-finetune/gpu-finetune")
    runs, versions = _tracked(project)
    assert len(runs) == 1 and [v.tags["method"] for v in versions] == ["dpsgd"]
    assert (project / "metrics/attack-dpsgd.json").is_file()
    assert not (deployer / "metrics").exists()  # the workers ran in their own checkout
    assert not (project / "reports/report.md").exists()  # a subset of the methods: no report
    # the promotion's outcome is on the run, not only in the registry: its gate table
    (promotion,) = _artifacts("promotion")
    assert "privtune" in promotion.data and "marks a failed gate" in promotion.data
    assert "version  method" in promotion.data and "\nv1  " in promotion.data  # its row

    # A changed fine-tuning parameter: a second fine-tuning, a new MLflow run and version.
    write_params(project / "params.yaml", finetune={**PIPELINE["finetune"], "lr": 0.02})
    second = _run_nightly(methods=["dpsgd"])
    assert second.state.is_completed(), second.state
    dispatched = _finetune_runs()
    assert len(dispatched) == 2 and dispatched[0].idempotency_key != dispatched[1].idempotency_key
    key = run_key(load_params(project / "params.yaml"), "dpsgd", project)
    assert key in dispatched[1].idempotency_key
    runs, versions = _tracked(project)
    assert len(runs) == 2 and len({r.data.tags["privtune.run_key"] for r in runs}) == 2
    assert float(max(runs, key=lambda r: r.info.start_time).data.params["finetune.lr"]) == 0.02
    assert len(versions) == 2

    # Unchanged: the finished fine-tuning is reused, nothing trains or registers again.
    third = _run_nightly(methods=["dpsgd"])
    assert third.state.is_completed(), third.state
    assert [r.id for r in _finetune_runs()] == [r.id for r in dispatched]
    runs, versions = _tracked(project)
    assert len(runs) == 2 and len(versions) == 2
    assert "Data and pipelines are up to date" in _sh(project, "dvc", "status", "finetune@dpsgd")


def test_dispatch_to_a_pool_without_a_live_worker_fails_fast_naming_it(deployed):
    from prefect import flow

    from tasks import dispatch

    project, deployer, env = deployed
    _prefect(env, deployer, "work-pool", "create", "--type", "process", "privtune-idle")
    _prefect(
        env, deployer, "deploy", "flows/finetune.py:finetune", "--name", "idle-finetune",
        "--pool", "privtune-idle",
    )  # fmt: skip
    _sh(project, "dvc", "repro", "base")  # the key reads the data and base model
    # a fine-tuning to do (one DVC finds up to date here is not dispatched: below)
    edit_params(project, finetune={"lr": 0.03})
    started = time.monotonic()
    with pytest.raises(dispatch.NoLiveWorker) as refused:
        dispatch.finetune("privtune-finetune/idle-finetune", "dpsgd", str(project), timeout=600)
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert "'privtune-idle'" in message and "prefect worker start --pool privtune-idle" in message
    assert not [r for r in _finetune_runs() if str(r.deployment_id) != _gpu_deployment_id()]

    @flow(name="fallback")
    def fallback(root: str) -> None:
        done = dispatch.finetune(
            "privtune-finetune/idle-finetune", "dpsgd", root, local_fallback=True
        )
        # (checked here: a result read back from a busy server can come without its data)
        assert done.how == "local", done

    # asked to, it fine-tunes here instead of waiting
    state = fallback(str(project), return_state=True)
    assert state.is_completed(), state.message
    deadline = time.monotonic() + 60  # the task's last state reaches the server after the flow's
    while True:
        (stage,) = _task_runs(state.state_details.flow_run_id)
        if stage.state.is_final() or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert stage.name == "finetune-dpsgd" and stage.state.is_completed()
    # now up to date here (as after a `dvc repro` by hand): no worker is needed, none asked for
    done = dispatch.finetune("privtune-finetune/idle-finetune", "dpsgd", str(project))
    assert done.how == "current" and done.flow_run_id is None


def test_share_carries_the_dvc_lock_entries_both_ways(deployed, tmp_path):
    """`share`: the worker is another machine (its own checkout, with older data in its
    workspace and dvc.lock); both reach one DVC remote. The worker must train on the data this
    checkout built, and this checkout must end with the model the worker built, by its dvc.lock
    entry, also after a changed parameter (pulling by its own old entry brought the old model)."""
    from prefect import flow

    from privtune.io import tree_sha256
    from tasks import dispatch, lockfile, stages

    worker, _, _ = deployed  # the GPU pool's worker runs in this checkout
    _sh(worker, "dvc", "repro", "base")  # its own, older data and base model
    here = make_project(tmp_path)
    store = tmp_path / "remote"
    for checkout in (worker, here):
        _sh(checkout, "dvc", "remote", "add", "--local", "-d", "-f", "shared", str(store))

    def both(**finetune):  # one commit's params on both machines; new data (another seed)
        for checkout in (worker, here):
            write_params(
                checkout / "params.yaml",
                prepare={"seed": 7},
                finetune={**PIPELINE["finetune"], **finetune},
            )

    @flow(name="share")
    def share(root: str) -> str | None:
        stages.prepare(root)
        stages.base(root)
        stages.push("prepare", root)
        stages.push("base", root)
        done = dispatch.finetune(
            "privtune-finetune/gpu-finetune", "dpsgd", root, share=True, timeout=900
        )
        return done.flow_run_id

    built = []
    for finetune in ({}, {"lr": 0.02}):
        both(**finetune)
        state = share(str(here), return_state=True)
        assert state.is_completed(), state.message
        mine = lockfile.entries(here, ["prepare", "finetune@dpsgd"])
        theirs = lockfile.entries(worker, ["prepare", "finetune@dpsgd"])
        assert theirs["prepare"]["outs"] == mine["prepare"]["outs"]  # trained on our data
        assert theirs["finetune@dpsgd"] == mine["finetune@dpsgd"]
        assert tree_sha256(here / "models/dpsgd") == tree_sha256(worker / "models/dpsgd")
        assert "Data and pipelines are up to date" in _sh(here, "dvc", "status", "finetune@dpsgd")
        built.append(mine["finetune@dpsgd"]["outs"])
    assert built[0] != built[1]  # the second round brought the new model, not the first again
    assert len({r.id for r in _finetune_runs() if "dpsgd" in r.name}) >= 2


def _start_live_worker(env, cwd, pool):
    """A worker, once it has checked in with the server (dispatch refuses a pool without)."""
    from prefect.client.orchestration import get_client

    from tasks import dispatch

    worker = _start_worker(env, cwd, pool)
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while dispatch.pool_problem(client, pool) and time.monotonic() < deadline:
            time.sleep(1)
    return worker


def _kill_flow_run(flow_run_id) -> None:
    """SIGKILL the flow run's process group (its `dvc repro` and `privtune` under it): found by
    the run id Prefect puts in its environment."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                os.killpg(os.getpgid(int(proc.name)), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue  # gone already, or not ours


def test_a_killed_worker_fails_the_dispatch_at_once_and_the_next_passes_it_over(deployed):
    """kill -9 of a worker and its fine-tuning (a lost machine): nobody reports the run, so it
    stays Running. The pipeline waiting on it must notice the stopped heartbeats, mark it
    Crashed and fail, not wait out its timeout; the next dispatch passes it over."""
    import contextvars
    import threading

    from prefect.client.orchestration import get_client

    from tasks import dispatch

    project, deployer, env = deployed
    _prefect(env, deployer, "work-pool", "create", "--type", "process", "privtune-doomed")
    _prefect(
        env, deployer, "deploy", "flows/finetune.py:finetune", "--name", "doomed-finetune",
        "--pool", "privtune-doomed",
        "--job-variable", json.dumps({"env": {dispatch.HEARTBEAT_ENV: "30"}}),
    )  # fmt: skip
    _sh(project, "dvc", "repro", "base")
    edit_params(project, finetune={"epochs": 60.0, "lr": 0.003})  # long enough to be killed
    worker_env = dict(env, PRIVTUNE_ROOT=str(project), PREFECT_WORKER_QUERY_SECONDS="2")
    worker = _start_live_worker(worker_env, project.parent, "privtune-doomed")
    killed = threading.Event()

    def kill_at_first_heartbeat() -> None:
        deadline = time.monotonic() + 600
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = [r for r in _finetune_runs() if r.state and r.state.is_running()]
                if runs and dispatch.last_heartbeat(client, runs[-1]) is not None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    _kill_flow_run(runs[-1].id)
                    killed.set()
                    return
                time.sleep(0.5)

    # in this test's Prefect settings (the module's server), which a bare thread would not see
    context = contextvars.copy_context()
    killer = threading.Thread(target=context.run, args=(kill_at_first_heartbeat,), daemon=True)
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(dispatch.RemoteRunFailed) as failed:
            dispatch.finetune("privtune-finetune/doomed-finetune", "dpsgd", str(project),
                              timeout=1800)  # fmt: skip
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    assert killed.is_set()
    assert time.monotonic() - started < 400  # three missed heartbeats, not the 1800 s timeout
    assert "sent no heartbeat since" in str(failed.value) and "marked Crashed" in str(failed.value)
    (dead,) = [r for r in _finetune_runs() if r.state and r.state.is_crashed()]
    assert "its worker or machine is gone" in dead.state.message

    # the next dispatch of the same inputs passes the crashed run over, for a key derived from
    # it (what it then runs is any dispatch's: the nightly test's)
    with get_client(sync_client=True) as client:
        doomed = client.read_deployment_by_name("privtune-finetune/doomed-finetune")
        key, earlier = dispatch._usable_key(
            client, doomed, dead.idempotency_key, str(project), "finetune@dpsgd", True
        )
    assert (key, earlier) == (f"{dead.idempotency_key}:after-{dead.id}", None)


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        return client.read_artifacts(artifact_filter=found)


def _logs(flow_run_id) -> list[str]:
    """The messages of a flow run's logs (its tasks' included), as the server holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    _drain()
    with get_client(sync_client=True) as client:
        found = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        return [log.message for log in client.read_logs(log_filter=found)]


def _gpu_deployment_id() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_deployment_by_name("privtune-finetune/gpu-finetune").id)


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_a_configuration_error_fails_at_once_without_retries(server, tmp_path):
    from prefect import flow

    from tasks import stages

    project = make_project(tmp_path)
    write_params(project / "params.yaml", prepare={"n_private": 5})  # must be >= 10

    @flow(name="prepare-only")
    def prepare_only(root: str) -> list[str]:
        return stages.prepare(root)

    state = prepare_only(str(project), return_state=True)
    assert state.is_failed()
    assert "prepare.n_private" in state.message and "not retried" in state.message
    (attempt,) = _task_runs(state.state_details.flow_run_id)
    assert attempt.run_count == 1 and attempt.state.is_failed()
    # what the run's logs show: the field and the fix, without Prefect's tracebacks
    told = [m for m in _logs(state.state_details.flow_run_id) if "prepare.n_private" in m]
    assert told and not [m for m in told if "Traceback" in m], told


def test_the_pipeline_refuses_a_bad_plan_before_its_first_stage(server, tmp_path):
    """A value only a method's plan refuses (an epsilon whose noise the guard would not admit)
    fails the pipeline flow before `prepare` runs, in the checkout and as a run's overrides
    (it failed at `finetune@dpsgd`, after prepare and base: walkthrough finding); the
    overrides' project is not left behind."""
    sys.path.insert(0, str(ROOT))
    from flows.pipeline import pipeline

    project = make_project(tmp_path)
    write_params(project / "params.yaml", finetune={"epsilon": 1e-4})
    state = pipeline(root=str(project), return_state=True)
    assert state.is_failed() and "finetune.epsilon" in state.message
    assert not (project / "data" / "prepared").exists()
    write_params(project / "params.yaml")
    overrides = {"finetune.epsilon": 1e-4}
    state = pipeline(root=str(project), overrides=overrides, return_state=True)
    assert state.is_failed() and "finetune.epsilon" in state.message
    assert not (project / "profiles").exists() or not any((project / "profiles").iterdir())
    assert not (project / "data" / "prepared").exists()


def test_nothing_to_promote_completes_with_that_result(server, tmp_path, monkeypatch):
    from flows.promote import promote

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tmp_path / "params.yaml")  # no model registered in this project's store
    # persisted, so the result survives a state read back from a busy server
    state = promote.with_options(persist_result=True)(root=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == [
        {"name": MODEL, "version": None, "promoted": False, "nothing_to_promote": True}
    ]
    attempts = _task_runs(state.state_details.flow_run_id)
    assert sorted(a.name.rsplit("-", 1)[0] for a in attempts) == [
        "challenger",
        "compare-with-champion",
    ]
    assert all(a.run_count == 1 for a in attempts)  # nothing measured, nothing retried


def test_promotions_through_prefect_take_turns(server, tmp_path, monkeypatch):
    """A tracking server has no lock beside it that privtune can take: promotion and rollback
    runs hold one slot of a Prefect global concurrency limit instead, on any worker."""
    import contextvars
    import threading

    from prefect.client.orchestration import get_client

    from flows.promote import one_at_a_time, promote
    from privtune.registry.lock import REGISTRY_LIMIT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tmp_path / "params.yaml")
    results = []
    run = contextvars.copy_context().run  # this test's Prefect settings, in the thread too
    with one_at_a_time():  # another promotion holds the registry
        waiting = threading.Thread(
            target=run, args=(lambda: results.append(promote(str(tmp_path))),)
        )
        waiting.start()
        waiting.join(timeout=5)
        assert waiting.is_alive() and not results
    waiting.join(timeout=120)
    assert results and results[0][0]["nothing_to_promote"]
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(REGISTRY_LIMIT)
    assert limit.limit == 1 and limit.active_slots == 0


def test_the_cli_takes_turns_with_the_flows_behind_a_tracking_server(server, tmp_path, monkeypatch):
    """Where the store is a tracking server and a Prefect server is configured, `privtune
    promote`'s lock is the flows' slot: it waits while a flow promotes, gives up after its wait
    naming the limit, and the flow's own promotion inside the slot does not wait for itself."""
    import contextvars
    import threading

    from prefect import flow, task

    from flows.promote import one_at_a_time
    from privtune.errors import ServerError
    from privtune.registry.lock import REGISTRY_LIMIT, registry_lock

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # never reached by the lock
    got = []

    def cli(wait):
        try:
            with registry_lock(tmp_path, wait=wait) as kind:
                got.append(kind)
        except ServerError as err:
            got.append(err)

    run = contextvars.copy_context().run  # this test's Prefect settings, in the thread too
    with one_at_a_time():  # the nightly flow promotes
        with registry_lock(tmp_path, wait=5) as kind:  # its own promotion: no deadlock
            assert kind == "prefect"
        refused = threading.Thread(target=run, args=(cli, 1.0))
        refused.start()
        refused.join(timeout=60)
        assert isinstance(got[0], ServerError) and REGISTRY_LIMIT in str(got[0])
        waiting = threading.Thread(target=run, args=(cli, 120.0))
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive() and len(got) == 1  # waits for the flow
    waiting.join(timeout=120)
    assert got[1] == "prefect"

    @task
    def decide() -> str:  # as flows/promote.py's tasks call the promotion
        with registry_lock(tmp_path, wait=5) as kind:
            return kind

    @flow
    def promote() -> str:
        with one_at_a_time():
            return decide()

    assert promote() == "prefect"  # the task sees its flow's slot held: no waiting on itself
