"""The default pipeline end to end on tiny parameters, in real temporary git+DVC repos:
`dvc repro` builds everything, a second repro does nothing, a method's parameter reruns only
its own stages, MLflow holds every run, no raw record leaks, and the Prefect flow runs the
same stages."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own default store must work
    return env


def _sh(project: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def make_project(tmp_path: Path) -> Path:
    """A fresh clone's worth of the project: dvc.yaml, code (the stages' deps), tiny params."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    write_params(project / "params.yaml")
    _sh(project, "git", "init", "-q")
    _sh(project, "git", "config", "user.email", "t@example.com")
    _sh(project, "git", "config", "user.name", "t")
    _sh(project, "dvc", "init", "-q")
    _sh(project, "dvc", "config", "core.check_update", "false")
    _sh(project, "git", "add", "-A")
    _sh(project, "git", "commit", "-qm", "init")
    return project


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("repro"))
    log = _sh(project, "dvc", "repro")
    return project, log


def test_repro_builds_every_stage(built):
    project, log = built
    for stage in [
        "prepare",
        "base",
        "finetune@nonprivate",
        "finetune@dpsgd",
        "evaluate@nonprivate",
        "evaluate@dpsgd",
    ]:
        assert f"Running stage '{stage}'" in log
    for path in [
        "data/prepared/train.jsonl",
        "data/prepared/canaries.json",
        "data/prepared/data_card.json",
        "models/base/config.json",
        "models/dpsgd/adapter/adapter_config.json",
        "models/dpsgd/ledger.json",
        "plots/finetune-dpsgd.png",
    ]:
        assert (project / path).is_file(), path
    assert not (project / "models/nonprivate/ledger.json").exists()


def test_metrics_side_by_side(built):
    project, _ = built
    shown = json.loads(_sh(project, "dvc", "metrics", "show", "--json"))[""]["data"]
    dpsgd = shown["metrics/finetune-dpsgd.json"]["data"]
    assert 0.95 * 4.0 <= dpsgd["epsilon"] <= 4.0 and dpsgd["epsilon_rdp"] > dpsgd["epsilon"]
    for name in ["nonprivate", "dpsgd"]:
        evaluated = shown[f"metrics/evaluate-{name}.json"]["data"]
        assert evaluated["test_perplexity"] > 1
        assert 0 <= evaluated["medication_accuracy"] <= 1
    assert "test_perplexity" in shown["metrics/base.json"]["data"]


def test_second_repro_does_nothing_and_params_rerun_only_dependents(built, tmp_path):
    project, _ = built
    log = _sh(project, "dvc", "repro")
    assert "Running stage" not in log
    write_params(project / "params.yaml", methods={"nonprivate": {}, "dpsgd": {"clip": 0.5}})
    status = _sh(project, "dvc", "status", "--json")
    assert set(json.loads(status)) == {"finetune@dpsgd", "evaluate@dpsgd"}
    write_params(project / "params.yaml")  # restore


def test_mlflow_tracks_runs_without_raw_records(built):
    project, _ = built
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["privtune"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    dpsgd = by_name["dpsgd"]
    assert dpsgd.data.params["method"] == "dpsgd"
    assert float(dpsgd.data.params["noise_multiplier"]) > 0
    assert len(dpsgd.data.params["data_sha256"]) == 64
    assert {"epsilon", "loss", "test_perplexity", "medication_accuracy"} <= set(dpsgd.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(dpsgd.info.run_id, "epsilon")
    assert len(history) > 2 and history[-1].value <= 4.0
    artifacts = Path(dpsgd.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "ledger.json").is_file() and (artifacts / "adapter").is_dir()
    assert any(p.suffix == ".png" for p in artifacts.iterdir())

    # No raw training text anywhere in the store: canaries and record lines are the test.
    canaries = json.loads((project / "data/prepared/canaries.json").read_text())["canaries"]
    secrets = [c["secret"] for c in canaries]
    records = [
        json.loads(line)["text"]
        for line in (project / "data/prepared/train.jsonl").read_text().splitlines()
    ]
    probes = secrets + [
        line for text in records[:20] for line in text.splitlines() if len(line) > 25
    ]
    db = sqlite3.connect(project / "mlflow.db")
    dump = "\n".join(
        str(row)
        for table in ("params", "tags", "metrics", "runs")
        for row in db.execute(f"SELECT * FROM {table}")
    )  # noqa: S608
    blobs = dump + "".join(
        p.read_text(errors="ignore")
        for p in (project / "mlruns").rglob("*")
        if p.is_file() and p.suffix in {".json", ".txt", ".yaml", ""}
    )
    leaked = [p for p in probes if p in blobs]
    assert not leaked, f"{len(leaked)} raw training strings found in MLflow"


def test_prefect_flow_runs_the_same_stages(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(ROOT))
    from flows.pipeline import pipeline

    project = make_project(tmp_path)
    with prefect_test_harness(server_startup_timeout=120):
        metrics = pipeline(root=str(project))
    assert "metrics/evaluate-dpsgd.json" in metrics
    assert metrics["metrics/finetune-dpsgd.json"]["epsilon"] <= 4.0
    # the flow left dvc.lock consistent: DVC sees nothing to do
    assert "Data and pipelines are up to date" in _sh(project, "dvc", "status")


def test_default_dvc_remote_push_and_pull(built):
    """The project's own .dvc/config remote (a local directory) works out of the box."""
    project, _ = built
    shutil.copy(ROOT / ".dvc/config", project / ".dvc/config")
    _sh(project, "dvc", "push")
    assert (project / ".dvcstore").is_dir()
    adapter = project / "models/dpsgd/adapter/adapter_config.json"
    expected = adapter.read_text()
    shutil.rmtree(project / "models/dpsgd")
    shutil.rmtree(project / ".dvc/cache")  # so the outputs can only come from the remote
    _sh(project, "dvc", "pull", "finetune@dpsgd")
    assert adapter.read_text() == expected
