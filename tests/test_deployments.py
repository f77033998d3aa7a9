"""The deployments of prefect.yaml, for real: a local Prefect server in a temporary home,
`prefect deploy --all`, one worker per pool, a triggered pipeline run that completes, with its
fine-tuning done as a run of the GPU-pool deployment."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, make_project

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--analytics-off"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_healthy(env["PREFECT_API_URL"])
        yield env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _prefect(env, cwd, *args, timeout=300):
    out = subprocess.run(
        [BIN / "prefect", "--no-prompt", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, (
        f"prefect {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def test_deploy_trigger_and_complete_with_a_gpu_pool_worker(server, tmp_path):
    project = make_project(tmp_path)
    for item in ("flows", "tasks"):
        shutil.copytree(ROOT / item, project / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", project)
    env = dict(server, PRIVTUNE_ROOT=str(project))
    for pool in ("privtune-cpu", "privtune-gpu"):
        _prefect(env, project, "work-pool", "create", "--type", "process", pool)
    deployed = _prefect(env, project, "deploy", "--all")
    for name in ("nightly-pipeline", "gpu-finetune", "sweep", "promote", "rollback"):
        assert name in deployed

    # The GPU pool's worker stays up for the fine-tuning runs the pipeline starts.
    gpu_worker = subprocess.Popen(
        [BIN / "prefect", "--no-prompt", "worker", "start", "--pool", "privtune-gpu",
         "--limit", "1", "--install-policy", "never"],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        _prefect(
            env, project, "deployment", "run", "privtune-pipeline/nightly-pipeline",
            "--param", 'methods=["dpsgd"]', "--param", "promote=true",
        )  # fmt: skip
        log = _prefect(
            env, project, "worker", "start", "--pool", "privtune-cpu", "--run-once",
            "--install-policy", "never", timeout=1200,
        )  # fmt: skip
    finally:
        os.killpg(gpu_worker.pid, signal.SIGKILL)  # a background worker ignores SIGINT
        gpu_worker.wait(timeout=30)

    runs = json.loads(
        subprocess.run(
            [BIN / "python", "-c", _LIST_RUNS], env=env, capture_output=True, text=True,
            check=True,
        ).stdout
    )  # fmt: skip
    states = {name: state for name, state in runs}
    assert states.get("finetune-dpsgd") == "COMPLETED", (states, log[-2000:])
    assert any(state == "COMPLETED" for name, state in runs if name != "finetune-dpsgd"), (
        states,
        log[-4000:],
    )
    assert (project / "metrics/attack-dpsgd.json").is_file()
    # a run over some of the methods registers just those (and leaves the report alone)
    import mlflow

    registry = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    versions = registry.search_model_versions("name='privtune-clinical-notes'")
    assert [v.tags["method"] for v in versions] == ["dpsgd"]
    assert not (project / "reports/report.md").exists()


_LIST_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs()
        print(json.dumps([[r.name, r.state.type.value] for r in runs]))

asyncio.run(main())
"""
