"""What scheduled runs decide without a Prefect server: the fine-tuning dispatch key follows the
stage's inputs, only transient failures are retried (a stage command's exit 2 is recognised
through the CLI's error file), a worker finds its own checkout and tracking store at run time,
and a profile builds in a project of its own."""

import json
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import yaml
from dvc.exceptions import ReproductionError
from prefect.states import Failed

from privtune import profiles
from privtune.cli import main
from privtune.errors import ConfigError, ModelError
from privtune.workers import absolute_tracking_uri, project_root
from tasks.dispatch import finetune_key
from tasks.stages import PermanentStageError, _permanent_errors, transient
from tests.conftest import edit_params, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def keyed_project(tmp_path):
    """Just what `run_key` reads: params, the data card's hash, the base model's files."""
    write_params(tmp_path / "params.yaml")
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/data_card.json").write_text(json.dumps({"content_sha256": "a"}))
    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "models/base/config.json").write_text("{}")
    return tmp_path


def test_dispatch_key_changes_with_the_inputs_and_only_with_them(keyed_project):
    first = finetune_key(keyed_project, "dpsgd")
    assert finetune_key(keyed_project, "dpsgd") == first
    assert finetune_key(keyed_project, "nonprivate") != first
    write_params(keyed_project / "params.yaml", finetune={"lr": 0.02})
    changed_lr = finetune_key(keyed_project, "dpsgd")
    assert changed_lr != first
    # a DVC parameter of the stage that no run key holds (how a step is computed): the stage
    # is stale, so a dispatch with it is another flow run (which then reuses the MLflow run)
    write_params(keyed_project / "params.yaml", finetune={"lr": 0.02, "checkpoint_every": 3})
    assert finetune_key(keyed_project, "dpsgd") != changed_lr
    write_params(keyed_project / "params.yaml", finetune={"lr": 0.02})
    # another method's options are not an input of finetune@dpsgd
    write_params(
        keyed_project / "params.yaml",
        finetune={"lr": 0.02},
        methods={"nonprivate": {}, "dpsgd": {"clip": 1.0}, "auto_s": {}},
    )
    assert finetune_key(keyed_project, "dpsgd") == changed_lr
    # the default delta is capped by the registry's delta gate: lowering it changes the plan
    edit_params(keyed_project, registry={"gates": {"max_delta": 1e-6}})
    assert finetune_key(keyed_project, "dpsgd") != changed_lr
    edit_params(keyed_project, registry={"gates": {"max_delta": 1e-4}})
    assert finetune_key(keyed_project, "dpsgd") == changed_lr
    (keyed_project / "data/prepared/data_card.json").write_text('{"content_sha256": "b"}')
    assert finetune_key(keyed_project, "dpsgd") != changed_lr
    (keyed_project / "data/prepared/data_card.json").write_text('{"content_sha256": "a"}')
    (keyed_project / "models/base/config.json").write_text('{"n_layer": 2}')
    assert finetune_key(keyed_project, "dpsgd") != changed_lr


def _failed(exc: BaseException):
    return Failed(data=exc, message=repr(exc))


def test_only_transient_failures_are_retried():
    assert transient(None, None, _failed(RuntimeError("connection reset")))
    assert transient(None, None, _failed(OSError("disk busy")))
    assert not transient(None, None, _failed(ConfigError("finetune.lr", "negative", "use > 0")))
    assert not transient(None, None, _failed(ModelError("x", "no challenger", "register")))
    stage = PermanentStageError("finetune@dpsgd", 2, "ConfigError", "finetune.lr: ...")
    assert not transient(None, None, _failed(stage))
    wrapped = ReproductionError("failed to reproduce 'prepare'")
    wrapped.__cause__ = stage
    assert not transient(None, None, _failed(wrapped))


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("finetune.lr", "negative", "use > 0"),
        ModelError("base.source", "not installed", "make install-smollm2"),
        PermanentStageError("finetune@dpsgd", 3, "BudgetExhausted", "the guard refused"),
    ],
    ids=type,
)
def test_errors_survive_the_trip_from_a_ray_worker(error):
    """A fanned-out task's failure comes back to the flow pickled: it must arrive whole, not as
    a deserialisation error in its place, and still be recognised as permanent."""
    import pickle

    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)
    assert not transient(None, None, _failed(back))


def test_a_stage_commands_exit_2_becomes_a_permanent_error_with_its_message(tmp_path, capsys):
    """The error file is how `dvc repro`'s subprocess tells the task what went wrong."""
    write_params(tmp_path / "params.yaml", prepare={"n_private": 5})
    with pytest.raises(PermanentStageError) as raised, _permanent_errors("prepare"):
        if main(["--root", str(tmp_path), "--no-progress", "prepare"]) != 0:
            raise RuntimeError("stage command failed")  # what DVC raises, without the reason
    assert raised.value.exit_code == 2 and raised.value.error == "ConfigError"
    assert "prepare.n_private" in str(raised.value) and "not retried" in str(raised.value)
    assert "error: prepare.n_private" in capsys.readouterr().err  # the CLI still prints it
    # any other failure passes through unchanged (and is retried)
    with pytest.raises(RuntimeError, match="lock busy"), _permanent_errors("prepare"):
        raise RuntimeError("lock busy")


def test_an_error_file_cut_short_leaves_the_stages_own_failure(tmp_path):
    """A command killed while writing its report (or one that wrote something else) left a
    file that is not a report: the stage's failure passes through, retried like any other,
    instead of a JSONDecodeError from the reader."""
    from privtune.cli import ERROR_FILE_ENV, read_error_file

    for text in ('{"exit_code": 2, "error": "ConfigE', '{"exit_code": 2}', "[]", ""):
        failed = pytest.raises(RuntimeError, match="stage command failed")
        with failed, _permanent_errors("prepare"):
            Path(os.environ[ERROR_FILE_ENV]).write_text(text)
            raise RuntimeError("stage command failed")
        assert read_error_file(tmp_path / "none.json") is None


def test_a_worker_finds_its_checkout_and_store_at_run_time(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert project_root({"PRIVTUNE_ROOT": str(tmp_path)}) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="PRIVTUNE_ROOT=/path/to/your/checkout"):
        project_root({"PRIVTUNE_ROOT": str(tmp_path / "elsewhere")})
    assert (
        absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    )
    assert absolute_tracking_uri("sqlite:////srv/m.db", tmp_path) == "sqlite:////srv/m.db"
    assert absolute_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"


@pytest.fixture
def checkout(tmp_path):
    from dvc.repo import Repo

    for name in ("dvc.yaml", "profiles.yaml"):
        shutil.copy(ROOT / name, tmp_path)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True).close()
    return tmp_path


def test_a_profile_builds_in_a_project_of_its_own(checkout):
    from dvc.repo import Repo

    before = (checkout / "params.yaml").read_text()
    quick = profiles.project(checkout, "quick", {"finetune.lr": 0.02})
    assert quick == checkout / "profiles/quick"
    params = yaml.safe_load((quick / "params.yaml").read_text())
    assert params["base"]["n_embd"] == 64 and params["finetune"]["device"] == "cpu"
    assert params["finetune"]["lr"] == 0.02 and params["finetune"]["lora"]["r"] == 4
    assert params["finetune"]["lora"]["alpha"] == 16  # untouched keys keep their value
    assert params["registry"]["name"] == "privtune-clinical-notes-quick"
    assert params["tracking"]["experiment"] == "privtune-quick"  # runs never mix either
    assert (checkout / "params.yaml").read_text() == before
    with Repo(str(quick)) as repo:
        assert "finetune@dpsgd" in {s.name for s in repo.index.stages}
    with Repo(str(checkout)) as repo:  # the checkout's own pipeline does not see it
        assert all(Path(s.path).parent == checkout for s in repo.index.stages)
    # overrides alone: a project named by their content
    custom = profiles.project(checkout, None, {"finetune.epochs": 0.5})
    assert custom.parent == checkout / "profiles" and custom.name.startswith("overrides-")


def test_what_the_preflight_refuses_leaves_a_profile_as_it_was(checkout):
    """A value only the preflight refuses (an epsilon whose noise the guard would not admit:
    a ConfigError of the plan, not of the schema) fails before any stage, and is not left in
    the profile's params.yaml for the next `dvc repro` there (walkthrough finding); a new
    project it refused is not left behind at all."""
    from privtune.errors import PrivtuneError

    quick = profiles.project(checkout, "quick", None)
    good = (quick / "params.yaml").read_text()
    with pytest.raises(PrivtuneError, match=r"finetune\.epsilon") as refused:
        profiles.project(checkout, "quick", {"finetune.epsilon": 1e-4})
    assert (quick / "params.yaml").read_text() == good
    where = "(in the run's overrides (finetune.epsilon))"
    assert str(refused.value).endswith(where)  # where the value came from
    before = sorted(p.name for p in (checkout / "profiles").iterdir())
    with pytest.raises(PrivtuneError, match=r"finetune\.epsilon"):
        profiles.project(checkout, None, {"finetune.epsilon": 1e-4})
    assert sorted(p.name for p in (checkout / "profiles").iterdir()) == before
    # only these methods' plans: a run of nonprivate alone takes it (no noise to calibrate)
    alone = profiles.project(checkout, "quick", {"finetune.epsilon": 1e-4}, methods=["nonprivate"])
    assert yaml.safe_load((alone / "params.yaml").read_text())["finetune"]["epsilon"] == 1e-4
    # the tracking and registry names an override gives are kept
    named = profiles.project(
        checkout, "quick", {"tracking.experiment": "mine", "registry.name": "ours"}, check=False
    )
    params = yaml.safe_load((named / "params.yaml").read_text())
    assert (params["tracking"]["experiment"], params["registry"]["name"]) == ("mine", "ours")


def test_an_unknown_profile_or_key_fails_naming_it(checkout):
    with pytest.raises(ConfigError, match="no such profile.*quick"):
        profiles.project(checkout, "tiny", None)
    with pytest.raises(ConfigError, match="finetune.lrr"):
        profiles.project(checkout, None, {"finetune.lrr": 0.02})


class _Runs:
    """A Prefect client that knows flow runs by idempotency key (what `_usable_key` asks)."""

    def __init__(self, runs: dict[str, object]) -> None:
        self.runs = runs

    def read_flow_runs(self, flow_run_filter, deployment_filter):
        (key,) = flow_run_filter.idempotency_key.any_
        return [self.runs[key]] if key in self.runs else []


def _run(run_id: str, state):
    return SimpleNamespace(id=run_id, state=state, start_time=None, created=None, name=run_id)


def test_a_keyed_run_is_reused_only_while_it_can_still_give_the_stage(monkeypatch):
    from prefect.states import Completed, Crashed, Running

    from tasks import dispatch

    current = {"value": True}
    monkeypatch.setattr(dispatch, "stage_is_current", lambda root, target: current["value"])

    def usable(runs, check_outputs=True):
        deployment = SimpleNamespace(id=uuid4(), job_variables={})  # no heartbeats asked for
        return dispatch._usable_key(_Runs(runs), deployment, "k", "/p", "finetune@x", check_outputs)

    assert usable({}) == ("k", None)  # nothing yet: a new run under the inputs' key
    running = _run("r1", Running())
    assert usable({"k": running}) == ("k", running)  # a retried pipeline waits for it
    done = _run("r1", Completed())
    assert usable({"k": done}) == ("k", done)
    # changed and changed back: dvc.lock holds the other inputs' model, so not this run
    current["value"] = False
    assert usable({"k": done}) == ("k:after-r1", None)
    assert usable({"k": done}, check_outputs=False) == ("k", done)  # outputs on another machine
    # a crashed run is passed over; every dispatcher derives the same next key from it
    again = _run("r2", Completed())
    current["value"] = True
    assert usable({"k": _run("r1", Crashed()), "k:after-r1": again}) == ("k:after-r1", again)


class _Beating(_Runs):
    """...that also knows each run's last heartbeat, and takes state changes."""

    def __init__(self, runs, beats) -> None:
        super().__init__(runs)
        self.beats, self.crashed = beats, {}

    def read_events(self, filter, limit):
        (resource,) = filter.resource.id
        beat = self.beats.get(resource.removeprefix("prefect.flow-run."))
        return SimpleNamespace(events=[SimpleNamespace(occurred=beat)] if beat else [])

    def set_flow_run_state(self, run_id, state, force):
        assert force  # a crash is recorded over the Running the dead worker left
        self.crashed[run_id] = state.message
        for key, run in self.runs.items():
            if run.id == run_id:
                self.runs[key] = _run(run_id, state)

    def read_flow_run(self, run_id):
        return next(r for r in self.runs.values() if r.id == run_id)


def test_a_running_run_whose_heartbeats_stopped_is_crashed_and_passed_over(monkeypatch):
    """A worker killed mid-run leaves its flow run Running for ever; waiting on it again (every
    later pipeline run, up to its timeout) is what the heartbeats prevent."""
    from prefect.states import Running

    from tasks import dispatch

    monkeypatch.setattr(dispatch, "stage_is_current", lambda root, target: True)
    now = datetime.now(UTC)
    beating = SimpleNamespace(id=uuid4(), job_variables={"env": {dispatch.HEARTBEAT_ENV: "30"}})
    silent = SimpleNamespace(id=uuid4(), job_variables={})

    def usable(client, deployment):
        return dispatch._usable_key(client, deployment, "k", "/p", "finetune@x", True)

    # the last heartbeat 60 s ago, at one every 30 s: alive, a retried pipeline waits for it
    client = _Beating({"k": _run("r1", Running())}, {"r1": now - timedelta(seconds=60)})
    assert usable(client, beating)[1].id == "r1" and not client.crashed
    # 100 s ago (three missed, and the poll): dead; marked Crashed, naming why, a new key
    client = _Beating({"k": _run("r1", Running())}, {"r1": now - timedelta(seconds=100)})
    assert usable(client, beating) == ("k:after-r1", None)
    assert "sent no heartbeat since" in client.crashed["r1"]
    assert client.runs["k"].state.is_crashed()
    # no heartbeat ever, or a deployment that does not send them: not judged
    client = _Beating({"k": _run("r1", Running())}, {})
    assert usable(client, beating)[1].id == "r1"
    # none ever, but started long ago and asked to beat: killed before its first beat
    asked = {"env": {dispatch.HEARTBEAT_ENV: "30"}}
    started = SimpleNamespace(**vars(_run("r1", Running())), job_variables=asked)
    started.start_time = now - timedelta(seconds=100)  # within the grace for late events
    client = _Beating({"k": started}, {})
    assert usable(client, beating)[1].id == "r1" and not client.crashed
    started.start_time = now - timedelta(seconds=160)
    assert usable(client, beating) == ("k:after-r1", None)
    assert "sent no heartbeat since it started at" in client.crashed["r1"]
    # a run created before its deployment asked for heartbeats is not judged by them
    unasked = SimpleNamespace(**vars(_run("r2", Running())), job_variables={})
    unasked.start_time = now - timedelta(hours=2)
    client = _Beating({"k": unasked}, {})
    assert usable(client, beating)[1].id == "r2" and not client.crashed
    client = _Beating({"k": _run("r1", Running())}, {"r1": now - timedelta(hours=5)})
    assert usable(client, silent)[1].id == "r1" and not client.crashed


def test_a_dispatch_waiting_on_its_fine_tuning_says_so_until_it_ends(monkeypatch):
    """A GPU fine-tuning takes up to its timeout: the pipeline's log says what it waits on."""
    from prefect.states import Completed, Running

    from tasks import dispatch

    monkeypatch.setattr(dispatch, "POLL_SECONDS", 0.0)
    monkeypatch.setattr(dispatch, "WAIT_LOG_SECONDS", 0.0)
    states = [Running(), Running(), Completed()]

    class _Client:
        def read_flow_run(self, run_id):
            return SimpleNamespace(id=run_id, name="finetune-dpsgd", state=states.pop(0))

    said: list[str] = []
    logger = SimpleNamespace(info=lambda message, *args: said.append(message % args))
    run = SimpleNamespace(id="r1", name="finetune-dpsgd", state=None)
    done = dispatch._wait(_Client(), run, 7200, None, logger)
    assert done.state.is_completed()
    assert len(said) == 2 and all("waiting for flow run finetune-dpsgd: Running" in m for m in said)
    assert "(timeout 7200 s)" in said[0]


def test_a_fine_tuning_queued_on_a_pool_whose_workers_are_gone_fails_the_wait(monkeypatch):
    """A run Late on a pool with no live worker would wait out the whole timeout (two hours
    by default; walkthrough finding): the wait fails naming the pool, the run stays queued."""
    from datetime import UTC, datetime

    from prefect.client.schemas.objects import WorkerStatus
    from prefect.states import Completed, Late, Pending

    from tasks import dispatch

    monkeypatch.setattr(dispatch, "POLL_SECONDS", 0.0)
    worker = SimpleNamespace(
        status=WorkerStatus.ONLINE,
        last_heartbeat_time=datetime.now(UTC),
        heartbeat_interval_seconds=30,
    )

    class _Client:
        def __init__(self, states, workers):
            self.states, self.workers = states, workers

        def read_flow_run(self, run_id):
            return SimpleNamespace(id=run_id, name="finetune-dpsgd", state=self.states.pop(0))

        def read_work_pool(self, pool):
            return SimpleNamespace(is_paused=False)

        def read_workers_for_work_pool(self, pool):
            return self.workers

    run = SimpleNamespace(id="r1", name="finetune-dpsgd", state=None)
    with pytest.raises(dispatch.NoLiveWorker) as gone:
        dispatch._wait(_Client([Late(), Late()], []), run, 7200, None, None, "privtune-gpu")
    message = str(gone.value)
    assert "finetune-dpsgd (flow run r1) is Late on pool 'privtune-gpu'" in message
    assert "prefect worker start --pool privtune-gpu" in message and "stays queued" in message
    # a live worker (busy, or about to pick the run up): the wait goes on
    client = _Client([Late(), Pending(), Completed()], [worker])
    assert dispatch._wait(client, run, 7200, None, None, "privtune-gpu").state.is_completed()


def test_heartbeat_interval_is_read_from_the_deployment():
    from tasks.dispatch import heartbeat_seconds

    def interval(env):
        return heartbeat_seconds(SimpleNamespace(job_variables={"env": env}))

    assert interval({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "45"}) == 45.0
    assert interval({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "5"}) == 30.0  # Prefect's minimum
    assert interval({}) is None and interval({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "x"}) is None
    assert heartbeat_seconds(SimpleNamespace(job_variables=None)) is None
    shipped = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in shipped["deployments"]:  # every worker's flow runs send them
        env = deployment["work_pool"]["job_variables"]["env"]
        assert float(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) >= 30


def test_prefect_logs_bad_input_without_a_traceback_and_the_rest_with_it():
    """Prefect logs a failed run's exception with its traceback on the task, flow and engine
    loggers; bad input keeps only its message (the field and the fix), a budget refusal, a
    server that does not answer and a bug keep their tracebacks."""
    import logging

    from privtune.errors import ConfigError, ServerError
    from tasks.stages import InputErrorsWithoutTraceback, PermanentStageError

    failures = {
        PermanentStageError("prepare", 2, "DataError", "prepare.source: ..."): False,
        ConfigError("finetune.epsilon", "must be > 0", "set it"): False,
        PermanentStageError("finetune@dpsgd", 3, "BudgetExhausted", "refused"): True,
        ServerError("MLFLOW_TRACKING_URI", "no answer", "start it"): True,
        RuntimeError("a bug"): True,
    }
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    for name in InputErrorsWithoutTraceback.LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            for failure in failures:
                try:
                    raise failure
                except Exception:
                    logger.error("Task run failed with exception: %r", failure, exc_info=True)
        finally:
            logger.removeHandler(handler)
    assert len(records) == len(failures) * 3
    for record in records:
        failure = next(f for f in failures if repr(f) in record.getMessage())
        assert (record.exc_info is not None) == failures[failure], record.getMessage()
