"""The one place that talks to MLflow.

Default store: sqlite at <project>/mlflow.db with artifacts in <project>/mlruns (MLflow 3 refuses
the plain file store); MLFLOW_TRACKING_URI overrides both. Only configuration, numbers and
files we choose are logged: never record text.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

EXPERIMENT = "privtune"
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}


def disable_telemetry() -> None:
    """There is no internet here (nor, often, in a hospital): no tool may phone home."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def tracking_uri(root: str | Path = ".") -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve()}/mlflow.db"


def _experiment_id(mlflow: Any, root: Path, name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        # Artifacts beside the store's file, not under whichever directory the first run
        # happened to start in (MLflow's default): every stage and worker finds them.
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys, as MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def git_commit(root: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class RunTracker:
    """A live MLflow run: params, step metrics, final metrics and artifacts."""

    def __init__(self, mlflow: Any, run: Any) -> None:
        self._mlflow = mlflow
        self.run_id: str = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
        self._mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        finite = {
            k.replace("/", "."): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        }
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dir_contents(self, path: str | Path) -> None:
        """Every file and folder of ``path`` at the root of the run's artifacts."""
        self._mlflow.log_artifacts(str(path))


RUN_KEY_TAG = "privtune.run_key"


def _client(root: str | Path) -> Any:
    disable_telemetry()
    import mlflow

    return mlflow.MlflowClient(tracking_uri(root))


def _runs_with_key(root: str | Path, key: str, experiment: str = EXPERIMENT) -> list[Any]:
    client = _client(root)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'"
    )


def finished_run(root: str | Path, key: str) -> Any | None:
    """The latest FINISHED run with this key (same stage and inputs), if any."""
    runs = [r for r in _runs_with_key(root, key) if r.info.status == "FINISHED"]
    return max(runs, key=lambda r: r.info.start_time) if runs else None


def discard_unfinished(root: str | Path, key: str, keep: str | None = None) -> int:
    """Delete runs with this key that never finished (a crashed attempt), so a retry does not
    leave a duplicate beside its own run; ``keep``: a run to resume instead. Returns how many
    were deleted."""
    client = _client(root)
    stale = [
        r
        for r in _runs_with_key(root, key)
        if r.info.status != "FINISHED" and r.info.run_id != keep
    ]
    for run in stale:
        client.delete_run(run.info.run_id)
    return len(stale)


def download_run_artifacts(root: str | Path, run_id: str, destination: str | Path) -> Path:
    """Copy every artifact of a run into ``destination`` (a directory)."""
    disable_telemetry()
    import mlflow

    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, dst_path=str(destination), tracking_uri=tracking_uri(root)
    )
    return Path(path)


@contextlib.contextmanager
def start_run(
    run_name: str | None = None,
    *,
    root: str | Path = ".",
    run_id: str | None = None,
    experiment: str = EXPERIMENT,
    key: str | None = None,
) -> Iterator[RunTracker]:
    """Open (or reopen, with run_id) an MLflow run in the project's store.

    ``key`` tags the run with its stage and inputs, so a retry can find (and reuse or discard)
    an earlier attempt instead of duplicating it.
    """
    disable_telemetry()
    import mlflow

    root = Path(root)
    mlflow.set_tracking_uri(tracking_uri(root))
    tags = {RUN_KEY_TAG: key} if key else None
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            yield RunTracker(mlflow, run)
        return
    experiment_id = _experiment_id(mlflow, root, experiment)
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags) as run:
        yield RunTracker(mlflow, run)
