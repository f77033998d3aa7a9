"""Each project's runs land in its own store, whatever ran before in the same process."""

from __future__ import annotations

import os

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
