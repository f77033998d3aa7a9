"""Each project's runs land in its own store, whatever ran before in the same process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest

from privtune import tracking


def test_a_run_does_not_export_its_store_to_the_next_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    with tracking.start_run("one", root=first):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ  # subprocesses would inherit it
    assert tracking.tracking_uri(second) == f"sqlite:///{second.resolve()}/mlflow.db"
    with tracking.start_run("two", root=second):
        pass
    assert (second / "mlflow.db").is_file()


def test_an_exported_store_is_kept(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path.resolve()}/shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with tracking.start_run("one", root=tmp_path / "project"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == store
    assert (tmp_path / "shared.db").is_file() and not (tmp_path / "project" / "mlflow.db").exists()


_START_TOGETHER = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # the slow imports first: all reach the store at once
from privtune import tracking
project, go, i = sys.argv[1:]
(Path(go).parent / f"ready-{i}").touch()
while not Path(go).exists():
    time.sleep(0.005)
with tracking.start_run(f"run-{i}", root=project):
    pass
"""


@pytest.mark.slow
def test_runs_started_together_on_a_fresh_project_all_land_in_one_store(tmp_path, monkeypatch):
    """Six processes opening the same missing sqlite store at once: MLflow creates and migrates
    it on first use, which only one may do at a time; every run must land, and the project
    gains nothing but the store and its artifacts folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project, go = tmp_path / "project", tmp_path / "go"
    project.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _START_TOGETHER, str(project), str(go), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(6)
    ]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready-*"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0] * 6, "\n".join(outputs)[-3000:]
    client = mlflow.MlflowClient(tracking.tracking_uri(project))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run-{i}" for i in range(6)]
    assert {r.info.status for r in runs} == {"FINISHED"}
    left = {p.name for p in project.iterdir()}
    assert "mlflow.db" in left and left <= {"mlflow.db", "mlruns"}, left
