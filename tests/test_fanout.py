"""Fan-out on Ray (params.yaml `runner`): the section is validated, the runner factory builds
the RayTaskRunner it describes, and several fine-tunings run at once on a local Ray cluster
(CPU) give the same adapters, ledgers and metrics as the same runs one after another, with
dvc.lock and MLflow as `dvc repro` leaves them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from privtune.config import RunnerParams, parse_params
from privtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import runners  # noqa: E402


def test_runner_defaults_to_local():
    runner = parse_params({}).runner
    assert runner.kind == "local" and runner.address is None and runner.num_gpus == 0
    assert runners.task_runner(runner) is None  # the flows call their tasks in order


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"kind": "slurm"}, "runner.kind"),
        ({"kind": "ray", "address": "http://head:8265"}, "runner.address"),
        ({"kind": "ray", "num_gpus": -1}, "runner.num_gpus"),
        ({"kind": "ray", "num_cpus": 0}, "runner.num_cpus"),
        ({"kind": "ray", "max_concurrency": 0}, "runner.max_concurrency"),
        ({"kind": "ray", "gpus": 1}, "runner.gpus"),
        ({"address": "auto"}, "runner"),  # an address without kind: ray
        ({"num_gpus": 1}, "runner"),
        ({"kind": "ray", "address": "auto", "max_concurrency": 2}, "runner"),
    ],
)
def test_bad_runner_sections_are_refused_with_their_field(section, field):
    with pytest.raises(ConfigError) as err:
        parse_params({"runner": section})
    assert err.value.field == field
    assert "runner" in str(err.value)


@pytest.mark.parametrize("address", ["auto", "ray://head.internal:10001", "10.0.0.5:6379"])
def test_cluster_addresses_are_accepted(address):
    assert parse_params({"runner": {"kind": "ray", "address": address}}).runner.address == address


def test_local_ray_runner_is_lean_and_never_joins_another_ray():
    from prefect_ray import RayTaskRunner

    runner = RunnerParams(kind="ray", num_cpus=1, max_concurrency=3)
    made = runners.task_runner(runner, "http://127.0.0.1:4200/api")
    assert isinstance(made, RayTaskRunner) and made.address is None
    init = made.init_kwargs
    assert init["address"] == "local"  # not a cluster some other `ray start` made here
    assert init["num_cpus"] == 3 and init["include_dashboard"] is False
    env = init["runtime_env"]["env_vars"]
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["DO_NOT_TRACK"] == "true"


def test_cluster_runners_join_the_named_cluster():
    client = runners.task_runner(
        RunnerParams(kind="ray", address="ray://head:10001", num_gpus=1, num_cpus=4)
    )
    assert client.address == "ray://head:10001" and "address" not in client.init_kwargs
    assert "num_cpus" not in client.init_kwargs  # the cluster's own resources
    on_node = runners.task_runner(RunnerParams(kind="ray", address="auto"))
    assert on_node.init_kwargs["address"] == "auto"
    options = runners.remote_options(RunnerParams(kind="ray", num_gpus=0.5, num_cpus=2.5))
    assert options == {"num_cpus": 2.5, "num_gpus": 0.5}
    assert runners.threads(RunnerParams(num_cpus=2.5)) == 2
    assert runners.threads(RunnerParams(num_cpus=0.5)) == 1


def test_workers_log_to_the_flows_tracking_server(monkeypatch):
    """A worker that `ray start` began on another node has its own environment: the flow's
    MLflow server goes with every task, or the stages would log where `register` never looks."""
    cluster = RunnerParams(kind="ray", address="ray://head:10001")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        "MLFLOW_TRACKING_URI"
        not in runners.task_runner(cluster).init_kwargs["runtime_env"]["env_vars"]
    )  # the project's own store, found from the checkout as in a local run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    for runner in (cluster, RunnerParams(kind="ray")):
        env = runners.task_runner(runner).init_kwargs["runtime_env"]["env_vars"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"


def test_thread_limit_sets_and_restores_the_thread_variables(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with runners.thread_limit(2):
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ
    with runners.thread_limit(None):
        assert os.environ["OMP_NUM_THREADS"] == "7"


def test_unknown_per_method_stage_is_refused():
    from tasks import stages

    with pytest.raises(ValueError, match="unknown per-method stage"):
        stages.method_stages.fn("dpsgd", ".", steps=["finetune", "deploy"])


# -- several fine-tunings at once on a local Ray cluster ---------------------------------------

# Two methods: enough to overlap on Ray and to write dvc.lock at once (a third added 80 s of
# a 2-core CI run and nothing the two do not show).
METHODS = ["nonprivate", "dpsgd"]
FANOUT = {
    "finetune": {"delta": 1e-5, "audit_canaries": 32},
    "methods": {"nonprivate": {}, "dpsgd": {"clip": 1.0}},
}


def _sh(cwd: Path, *cmd: str) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _git_repo(project: Path, *more: tuple[str, ...]) -> None:
    """A new git repository at ``project`` with a committer, then the ``more`` commands."""
    project.mkdir()
    for cmd in (
        ("git", "init", "-q"),
        ("git", "config", "user.email", "t@example.com"),
        ("git", "config", "user.name", "t"),
        *more,
    ):
        _sh(project, *cmd)


def _results(project: Path, method: str) -> dict[str, object]:
    """What must not depend on how the run was scheduled: the adapter's bytes, the ledger and
    the privacy audit, the stage's metrics and training curve."""
    model = project / "models" / method
    found: dict[str, object] = {
        "adapter": (model / "adapter" / "adapter_model.safetensors").read_bytes(),
        "metrics": json.loads((project / f"metrics/finetune-{method}.json").read_text()),
        "history": (project / f"plots/finetune-{method}.csv").read_text(),
    }
    for name in ("ledger.json", "audit.json"):
        if (model / name).is_file():
            found[name] = (model / name).read_text()
    return found


def _mlflow_runs(project: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("privtune")
    return client.search_runs([experiment.experiment_id])


def _task_run_spans(prefix: str) -> list[tuple]:
    """(start, end) of the task runs whose names start with `prefix`, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        found = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix))
        )
    return [(run.start_time, run.end_time) for run in found if run.name.startswith(prefix)]


@pytest.mark.slow
def test_fine_tunings_at_once_on_ray_equal_the_same_runs_in_turn(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import fan_out
    from tasks.stages import reproduce
    from tests.conftest import write_params
    from tests.test_pipeline import make_project

    project = make_project(tmp_path)
    write_params(project / "params.yaml", **FANOUT)
    _sh(project, "git", "commit", "-qam", "two methods")
    _sh(project, "dvc", "repro", "base")  # shared inputs of both schedules
    in_turn, at_once = tmp_path / "in-turn", tmp_path / "at-once"
    shutil.copytree(project, in_turn, symlinks=True)
    shutil.copytree(project, at_once, symlinks=True)

    # Thread counts change float sums: both schedules give every run one thread.
    with runners.thread_limit(1):
        for method in METHODS:  # what runner.kind local does: dvc repro, one after another
            assert reproduce(str(in_turn), f"finetune@{method}") == [f"finetune@{method}"]
    runner = RunnerParams(kind="ray", num_cpus=1, max_concurrency=len(METHODS))
    with prefect_test_harness(server_startup_timeout=180):
        ran = fan_out(str(at_once), METHODS, False, runner, steps=["finetune"])
        spans = _task_run_spans("finetune-")
    assert ran == {m: {"finetune": [f"finetune@{m}"]} for m in METHODS}
    # the Ray workers reported to the flow's Prefect server, and the fine-tunings overlapped
    assert len(spans) == len(METHODS)
    assert max(start for start, _ in spans) < min(end for _, end in spans)

    for method in METHODS:
        assert _results(at_once, method) == _results(in_turn, method), method
    assert "ledger.json" in _results(at_once, "dpsgd")
    # dvc.lock holds every concurrent stage: DVC sees them all up to date
    status = _sh(at_once, "dvc", "status", *[f"finetune@{m}" for m in METHODS])
    assert "up to date" in status
    lock = (at_once / "dvc.lock").read_text()
    assert all(f"finetune@{m}:" in lock for m in METHODS)
    # one finished MLflow run per method in the project's one sqlite store
    runs = _mlflow_runs(at_once)
    assert sorted(r.info.run_name for r in runs) == sorted(METHODS)
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_sweep_points_copy_is_the_workspace_as_dvc_exp_run_temp_takes_it(tmp_path):
    """The clone a fanned-out sweep point runs in: HEAD, plus the workspace's changed and
    untracked files (what DVC's experiment stash takes), with the project's DVC cache."""
    from dvc.repo import Repo

    from tasks.stages import _copy_of

    project = tmp_path / "project"
    _git_repo(project, ("dvc", "init", "-q"))
    (project / "params.yaml").write_text("finetune: {epsilon: 8.0}\n")
    (project / "gone.txt").write_text("deleted in the workspace\n")
    _sh(project, "git", "add", "-A")
    _sh(project, "git", "commit", "-qm", "init")
    (project / "params.yaml").write_text("finetune: {epsilon: 4.0}\n")  # changed
    (project / "dvc.lock").write_text("schema: '2.0'\n")  # untracked
    (project / "gone.txt").unlink()
    copy = tmp_path / "copy"
    _copy_of(project, copy)
    assert (copy / "params.yaml").read_text() == "finetune: {epsilon: 4.0}\n"
    assert (copy / "dvc.lock").is_file() and not (copy / "gone.txt").exists()
    with Repo(str(project)) as original, Repo(str(copy)) as cloned:
        assert cloned.cache.local_cache_dir == original.cache.local_cache_dir
    assert _sh(copy, "git", "rev-parse", "HEAD") == _sh(project, "git", "rev-parse", "HEAD")


def test_a_sweep_refuses_points_the_project_already_has_before_running_any(tmp_path):
    """DVC would find the clash only when bringing a finished point back."""
    from dvc.repo.experiments.refs import ExpRefInfo

    from flows.sweep import existing_experiments, sweep

    project = tmp_path / "project"
    _git_repo(project, ("git", "commit", "-q", "--allow-empty", "-m", "init"))
    (project / "params.yaml").write_text("{}\n")  # a project (the flow checks its root first)
    head = _sh(project, "git", "rev-parse", "HEAD").strip()
    _sh(project, "git", "update-ref", str(ExpRefInfo(head, "eps1-seed0")), head)
    assert existing_experiments(str(project), ["eps1-seed0", "eps8-seed0"]) == ["eps1-seed0"]
    with pytest.raises(ValueError, match=r"dvc exp remove eps1-seed0"):
        sweep.fn(root=str(project), epsilons=[1.0, 8.0], seeds=[0])


def test_a_stage_task_logs_its_progress_lines_and_whether_it_ran_or_was_restored(
    tmp_path, monkeypatch
):
    """A stage task forwards privtune's own lines from DVC's subprocess (progress, notices)
    into its run log, not the rest of its stderr (a traceback may quote data), and says whether
    the stage ran, was restored from DVC's run cache (inputs as in an earlier run) or skipped."""
    import logging

    from tasks import stages

    project = tmp_path / "project"
    _git_repo(project, ("dvc", "init", "-q"))
    script = (
        "from privtune.progress import notice, progress_bar\n"
        "import sys\n"
        "notice('stage: a notice')\n"
        "print('Traceback: secret note text', file=sys.stderr)\n"
        "with progress_bar(True) as bar:\n"
        "    task = bar.add_task('steps', total=10, status='')\n"
        "    for _ in range(10):\n"
        "        bar.advance(task)\n"
        "open('out.txt', 'w').write('done')\n"
    )
    (project / "stage.py").write_text(script)
    (project / "params.yaml").write_text("p: 1\n")
    (project / "dvc.yaml").write_text(
        f"stages:\n  hello:\n    cmd: {sys.executable} stage.py\n    deps: [stage.py]\n"
        "    params: [p]\n    outs: [out.txt]\n"
    )
    _sh(project, "git", "add", "-A")
    _sh(project, "git", "commit", "-qm", "init")
    logged: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logger = logging.getLogger("stage-task")
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(logger, "handlers", [Lines()])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(stages, "get_run_logger", lambda: logger)

    def run() -> list[str]:
        logged.clear()
        stages._run(str(project), "hello", force=False)
        return list(logged)

    lines = run()
    assert lines[0] == "hello | stage: a notice"
    assert [line.split(",")[0] for line in lines[1:11]] == [
        f"hello | steps: {n}/10 ({n * 10}%)" for n in range(1, 11)
    ]
    assert lines[-1] == "hello: ran" and not any("secret" in line for line in lines)
    assert run() == ["hello: up to date, skipped"]
    (project / "params.yaml").write_text("p: 2\n")
    assert run()[-1] == "hello: ran"
    (project / "params.yaml").write_text("p: 1\n")
    assert run() == [
        "hello: restored from DVC's run cache (its inputs were as in an earlier run: nothing ran)"
    ]


def test_a_worker_console_shows_dvcs_lines_once(tmp_path):
    """DVC writes its lines ("Running stage ...") through its own handlers; a Prefect process
    also has a console handler on the root logger (prefect/logging/logging.yml), which printed
    every DVC line a second time in the worker's log. Run as a worker's flow process is set up."""
    _sh(tmp_path, "dvc", "init", "-q", "--no-scm")
    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > out.txt\n")
    script = (
        "import sys\n"
        "from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "from tasks.stages import reproduce\n"
        "assert reproduce(sys.argv[1], 'hello') == ['hello']\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    assert shown.count("Running stage 'hello'") == 1, shown


# -- a sweep fanned out on a local Ray cluster -------------------------------------------------

# The shortest whole pipeline a sweep point runs: one private method at the tiny sizes.
SWEEP = {
    "finetune": {"delta": 1e-5, "audit_canaries": 32},
    "methods": {"dpsgd": {"clip": 1.0}},
    "runner": {"kind": "ray", "num_cpus": 1, "max_concurrency": 2},
}


def _experiments(project: Path) -> dict[str, dict]:
    """Each experiment of `dvc exp show --json`, by name: its params.yaml and its metrics."""
    found = {}
    for baseline in json.loads(_sh(project, "dvc", "exp", "show", "--json")):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {
                "params": data["params"]["params.yaml"]["data"],
                "metrics": {path: m.get("data", {}) for path, m in data["metrics"].items()},
            }
    return found


@pytest.mark.slow
def test_a_fanned_out_sweep_ends_as_dvc_experiments_and_mlflow_runs(tmp_path):
    """Two points of a sweep at once on a local Ray (flows/sweep.py, `runner.kind: ray`): each
    runs the whole pipeline in a clone of its own and comes back to the project as a DVC
    experiment with its params and metrics, its fine-tuning a finished run in the project's
    MLflow store; the workspace keeps its own params and no clone is left behind."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import sweep
    from tests.conftest import write_params
    from tests.test_pipeline import make_project

    project = make_project(tmp_path)
    write_params(project / "params.yaml", **SWEEP)
    _sh(project, "git", "commit", "-qam", "a sweep of dpsgd on ray")
    params_before = (project / "params.yaml").read_text()
    with prefect_test_harness(server_startup_timeout=180):
        names = sweep(root=str(project), epsilons=[1.0, 8.0], seeds=[1])
    assert names == ["eps1-seed1", "eps8-seed1"]

    shown = _experiments(project)
    assert sorted(shown) == names
    for name, epsilon in zip(names, (1.0, 8.0), strict=True):
        params, metrics = shown[name]["params"], shown[name]["metrics"]
        assert params["finetune"]["epsilon"] == epsilon and params["finetune"]["seed"] == 1
        assert list(params["methods"]) == ["dpsgd"]
        spent = metrics["metrics/finetune-dpsgd.json"]["epsilon"]
        assert 0.5 * epsilon < spent <= epsilon, (name, spent)  # the plan spends its target
        for stage in ("evaluate", "attack"):
            assert metrics[f"metrics/{stage}-dpsgd.json"], (name, stage)
    # the workspace is untouched; the points' clones are gone
    assert (project / "params.yaml").read_text() == params_before
    assert not any((project / ".dvc" / "tmp" / "fanout").iterdir())

    runs = [r for r in _mlflow_runs(project) if r.data.tags.get("stage") == "finetune"]
    points = sorted(
        (r.data.params["finetune.epsilon"], r.data.params["finetune.seed"]) for r in runs
    )
    assert points == [("1.0", "1"), ("8.0", "1")]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_failed_run_lets_the_others_end_before_the_flow_fails(tmp_path, monkeypatch):
    """Leaving the flow shuts the task runner down, and Ray's kills the runs still going
    (MLflow runs left RUNNING, a point's clone left behind): a failure is raised only after
    every run ended. The runner here marks what was still running when it shut down."""
    import time

    from prefect import task
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows import pipeline

    shut = tmp_path / "runner-shut-down"

    class KillsOnExit(ThreadPoolTaskRunner):
        def __exit__(self, *exc_info):
            shut.touch()  # what ray.shutdown() is to the tasks still running
            super().__exit__(*exc_info)

    @task
    def method_stages(method, root, force, steps, threads):
        if method == "broken":
            raise RuntimeError("finetune@broken failed")
        time.sleep(2)
        Path(root, f"{method}.end").write_text("killed" if shut.exists() else "finished")
        return {"ran": [method]}

    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.setattr(pipeline.stages, "method_stages", method_stages)
    flow = pipeline.per_method.with_options(task_runner=KillsOnExit(max_workers=3))
    # a server of the test's own, stopped with it (an ephemeral one outlives pytest's output)
    with (
        prefect_test_harness(server_startup_timeout=180),
        pytest.raises(RuntimeError, match="finetune@broken"),
    ):
        flow(root=str(tmp_path), methods=["broken", "nonprivate", "dpsgd"])
    for method in ("nonprivate", "dpsgd"):
        assert (tmp_path / f"{method}.end").read_text() == "finished"
