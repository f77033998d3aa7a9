"""Interruptions leave nothing behind: a stage killed mid-training or mid-write (kill -9 by PID,
made deterministic by tests/pause_cli.py) and started again ends with complete outputs, no
RUNNING MLflow run and no temporary folder; a failed run says why; `dvc checkout` restores the
outputs an interrupted `dvc repro` removed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from privtune import io, tracking
from privtune.errors import ConfigError
from tests.conftest import edit_params
from tests.leaks import find_leaks, private_probes

HELPER = Path(__file__).with_name("pause_cli.py")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_the_temporary_outputs_of_dead_processes_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".dpsgd.tmp-{dead}-x1y2"
    stale.mkdir()
    (stale / "adapter.bin").write_bytes(b"half")
    stale_file = tmp_path / f".dpsgd.pt.tmp-{dead}"  # save_checkpoint's temporary file
    stale_file.write_bytes(b"half")
    live = tmp_path / f".dpsgd.tmp-{alive}-a1b2"
    live.mkdir()
    mine = tmp_path / "dpsgd"
    mine.mkdir()
    assert sorted(io.remove_stale_tmp(tmp_path)) == sorted([stale, stale_file])
    assert live.is_dir() and mine.is_dir() and not stale.exists()
    with io.atomic_dir(tmp_path / "out") as out:  # named so that a later start can tell
        assert out.name.startswith(f".out.tmp-{os.getpid()}-")


def test_a_replaced_folder_is_whole_even_if_removing_the_old_one_is_cut_short(
    tmp_path, monkeypatch
):
    """The old folder is renamed aside before it is deleted: a kill during the (long) deletion
    leaves the new output whole and the old one as a temporary leftover, not a half-deleted
    target."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.safetensors").write_text("old")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # what a kill during the deletion amounts to here

    with pytest.raises(KeyboardInterrupt), io.atomic_dir(target) as out:
        (out / "new.safetensors").write_text("new")
        monkeypatch.setattr(io.shutil, "rmtree", killed)
    assert [p.name for p in target.iterdir()] == ["new.safetensors"]
    [leftover] = [p for p in tmp_path.iterdir() if p != target]
    assert io._TMP_NAME.match(leftover.name)  # what remove_stale_tmp clears after the kill


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_get_the_permissions_the_umask_gives(tmp_path, umask):
    """Not tempfile's owner-only ones: a team sharing a checkout reads each other's outputs
    (umask 022 or 002), and a user who wants them private says so (077)."""
    old = os.umask(umask)
    try:
        assert io._umask() == umask
        with io.atomic_dir(tmp_path / "model") as out:
            io.write_json(out / "metrics.json", {"epsilon": 1.0})
        with io.atomic_file(tmp_path / "notes.txt") as handle:
            handle.write("text")
        plain_dir, plain_file = tmp_path / "plain", tmp_path / "plain.txt"
        plain_dir.mkdir()
        plain_file.write_text("text")
    finally:
        os.umask(old)
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "model") == mode(plain_dir) == 0o777 & ~umask
    for made in (tmp_path / "model" / "metrics.json", tmp_path / "notes.txt"):
        assert mode(made) == mode(plain_file) == 0o666 & ~umask, made


def test_failed_and_dead_runs_are_closed_with_why_and_the_store_does_not_leak(
    tmp_path, monkeypatch
):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError), tracking.start_run("bad", root=tmp_path, key="k1"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith(f"{tmp_path}/mlflow.db")
        raise ConfigError("finetune.epsilon", "must be > 0", "set it to 8")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # nothing leaks past the store's use
    with pytest.raises(RuntimeError), tracking.start_run("crash", root=tmp_path, key="k2"):
        raise RuntimeError("tokenizer choked on 'Patient Jane Roe, MRN 1234'")

    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert runs["bad"].info.status == "FAILED"
    error = runs["bad"].data.tags[tracking.ERROR_TAG]
    assert error.startswith("ConfigError: finetune.epsilon: must be > 0")
    assert runs["crash"].info.status == "FAILED"
    assert runs["crash"].data.tags[tracking.ERROR_TAG].startswith("RuntimeError (message withheld")
    assert "Jane" not in runs["crash"].data.tags[tracking.ERROR_TAG]

    host = socket.gethostname()
    owner = {tracking.HOST_TAG: host}
    dead = client.create_run(experiment, tags={**owner, tracking.PID_TAG: str(_dead_pid())})
    live = client.create_run(experiment, tags={**owner, tracking.PID_TAG: str(os.getpid())})
    elsewhere = client.create_run(
        experiment, tags={tracking.HOST_TAG: "other-host", tracking.PID_TAG: "1"}
    )
    assert tracking.close_dead_runs(tmp_path) == [dead.info.run_id]
    closed = client.get_run(dead.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags[tracking.ERROR_TAG].startswith("KilledProcess: process")
    for run in (live, elsewhere):  # alive, or not ours to judge
        assert client.get_run(run.info.run_id).info.status == "RUNNING"


def _beats(seconds_ago: float, interval: float = 60.0) -> dict[str, str]:
    from datetime import UTC, datetime, timedelta

    beat = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return {
        tracking.HEARTBEAT_TAG: beat.isoformat(timespec="milliseconds"),
        tracking.HEARTBEAT_SECONDS_TAG: f"{interval:g}",
    }


def test_a_run_of_another_machine_is_judged_by_its_heartbeats(tmp_path, monkeypatch):
    """Workers on several machines share one store: a RUNNING run of another machine is dead
    once it has missed MISSED_HEARTBEATS beats; a fresh one, or one that never beat (opened by
    an older privtune), is left alone."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run("first", root=tmp_path, key="k"):
        pass
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    owner = {tracking.HOST_TAG: "worker-2", tracking.PID_TAG: "4242"}
    limit = tracking.MISSED_HEARTBEATS * 60
    silent = client.create_run(experiment, tags={**owner, **_beats(limit + 30)})
    recent = client.create_run(experiment, tags={**owner, **_beats(limit - 30)})
    never = client.create_run(experiment, tags=owner)
    assert tracking.close_dead_runs(tmp_path) == [silent.info.run_id]
    closed = client.get_run(silent.info.run_id)
    assert closed.info.status == "KILLED"
    why = closed.data.tags[tracking.ERROR_TAG]
    assert why.startswith("KilledProcess: no heartbeat from worker-2 since ")
    assert "every 60 s" in why
    for run in (recent, never):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"


def test_a_run_of_a_machine_with_this_ones_name_is_judged_by_its_heartbeats(tmp_path, monkeypatch):
    """Two machines (or host-network containers) with one host name: the other's process id
    means nothing here, so a live run there is not closed for a pid that is free here; its
    heartbeats decide. A run opened before the namespace tag is still judged by host name."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run("first", root=tmp_path, key="k") as run:
        mine = mlflow.MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run.run_id)
    assert mine.data.tags[tracking.PID_NAMESPACE_TAG] == tracking.pid_namespace()
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    twin = {
        tracking.HOST_TAG: socket.gethostname(),
        tracking.PID_TAG: str(_dead_pid()),  # free here; alive, or not, over there
        tracking.PID_NAMESPACE_TAG: "another-boot/pid:[1]",
    }
    limit = tracking.MISSED_HEARTBEATS * 60
    alive = client.create_run(experiment, tags={**twin, **_beats(limit - 30)})
    silent = client.create_run(experiment, tags={**twin, **_beats(limit + 30)})
    here = {**twin, tracking.PID_NAMESPACE_TAG: tracking.pid_namespace()}
    dead_here = client.create_run(experiment, tags={**here, **_beats(1)})
    older = {k: v for k, v in twin.items() if k != tracking.PID_NAMESPACE_TAG}
    dead_older = client.create_run(experiment, tags={**older, **_beats(1)})
    closed = tracking.close_dead_runs(tmp_path)
    assert sorted(closed) == sorted(r.info.run_id for r in (silent, dead_here, dead_older))
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    why = client.get_run(silent.info.run_id).data.tags[tracking.ERROR_TAG]
    assert why.startswith(f"KilledProcess: no heartbeat from {socket.gethostname()} since ")
    why = client.get_run(dead_here.info.run_id).data.tags[tracking.ERROR_TAG]
    assert why.startswith(f"KilledProcess: process {twin[tracking.PID_TAG]} on ")


def test_an_open_run_beats_and_reopens_itself_if_judged_dead(tmp_path, monkeypatch):
    """The beat advances while the run is open; a run another start closed as silent (the store
    was out of its reach) is RUNNING again at its next beat, and finishes as usual."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.HEARTBEAT_ENV, "0.2")
    with tracking.start_run("beating", root=tmp_path, key="k") as run:
        client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
        first = client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG]
        assert client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_SECONDS_TAG] == "0.2"
        deadline = time.monotonic() + 30
        while client.get_run(run.run_id).data.tags[tracking.HEARTBEAT_TAG] == first:
            assert time.monotonic() < deadline, "no heartbeat in 30 s"
            time.sleep(0.1)
        client.set_tag(run.run_id, tracking.ERROR_TAG, f"{tracking.NO_HEARTBEAT} from x")
        client.set_terminated(run.run_id, status="KILLED")
        while client.get_run(run.run_id).info.status != "RUNNING":
            assert time.monotonic() < deadline, "not reopened in 30 s"
            time.sleep(0.1)
        assert tracking.ERROR_TAG not in client.get_run(run.run_id).data.tags
        # judged dead again, and it ends before its next beat: finished, and not called dead
        client.set_tag(run.run_id, tracking.ERROR_TAG, f"{tracking.NO_HEARTBEAT} from x")
        client.set_terminated(run.run_id, status="KILLED")
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert tracking.ERROR_TAG not in finished.data.tags


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_heartbeat_interval_names_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv(tracking.HEARTBEAT_ENV, value)
    with (
        pytest.raises(ConfigError, match=tracking.HEARTBEAT_ENV),
        tracking.start_run("x", root=tmp_path),
    ):
        pass
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store is touched


_REMOTE_WORKER = """
import socket, sys, time
socket.gethostname = lambda: "worker-2"  # another machine sharing the store
from privtune import tracking
tracking.pid_namespace = lambda: "worker-2-boot/pid:[4026531836]"
with tracking.start_run("remote", root=sys.argv[1], key="k") as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_a_run_whose_machine_died_is_closed_by_a_start_on_another(tmp_path, monkeypatch):
    """kill -9 of a fine-tuning on another machine: its run keeps beating while it lives, and
    once it is gone a start here closes it as KILLED after MISSED_HEARTBEATS intervals."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, tracking.HEARTBEAT_ENV: "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    worker = subprocess.Popen(
        [sys.executable, "-c", _REMOTE_WORKER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        run_id = worker.stdout.readline().strip()
        assert run_id, "the worker opened no run"
        time.sleep(tracking.MISSED_HEARTBEATS * 1 + 1.5)  # longer than the silence allowed
        assert tracking.close_dead_runs(tmp_path) == []  # alive: it kept beating
    finally:
        worker.kill()
        worker.wait()
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody left to close it
    deadline = time.monotonic() + 60
    while not tracking.close_dead_runs(tmp_path):
        assert time.monotonic() < deadline, "the silent run was never closed"
        time.sleep(0.5)
    closed = client.get_run(run_id)
    assert closed.info.status == "KILLED"
    assert "no heartbeat from worker-2" in closed.data.tags[tracking.ERROR_TAG]


def test_rldp_leaves_no_sb3_folder_in_the_temp_dir():
    """stable-baselines3's default logger makes an SB3-<time> folder per run in the temp dir."""
    from privtune.control import build_controller
    from tests.test_rldp import CTX, OPTIONS, _drive

    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("SB3-*"))
    controller = build_controller("rldp", CTX, OPTIONS)
    _drive(controller, 6)
    assert controller.sac._n_updates > 0  # SAC trained (and logged) several times
    assert set(temp.glob("SB3-*")) == before


# -- kill -9 of a real stage ---------------------------------------------------------------------


def _env(store: str | None = None) -> dict[str, str]:
    """A child's environment: the tracking store ``store``, else the project's own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env | ({"MLFLOW_TRACKING_URI": store} if store else {})


def _start(project: Path, marker: Path, point: str, store: str | None = None) -> subprocess.Popen:
    """`finetune dpsgd` paused at ``point`` (tests/pause_cli.py)."""
    argv = ["--root", str(project), "--no-progress", "finetune", "dpsgd"]
    helper = [sys.executable, str(HELPER), str(marker), point, "--", *argv]
    return subprocess.Popen(helper, env=_env(store))


def _start_plain(project: Path, err, store: str | None = None) -> subprocess.Popen:
    """`finetune dpsgd`, its stderr to ``err``."""
    argv = ["--root", str(project), "--no-progress", "finetune", "dpsgd"]
    return subprocess.Popen(
        [sys.executable, "-m", "privtune.cli", *argv], env=_env(store), stderr=err
    )


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"exited with {process.returncode} before {what}"
        assert time.time() < deadline, f"never {what}"
        time.sleep(0.1)


def _kill_when_paused(process: subprocess.Popen, marker: Path, timeout: float = 600) -> None:
    _wait_for(marker.exists, process, "reached the pause point", timeout)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _runs(project: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    return client.search_runs([experiment.experiment_id], run_view_type=3)  # deleted too


def _leftovers(project: Path) -> list[Path]:
    return [p for p in project.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_killed_mid_training_then_mid_write_a_rerun_completes_cleanly(
    tiny_project, tmp_path, monkeypatch, capsys
):
    from privtune.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    edit_params(project, finetune={"checkpoint_every": 2})
    checkpoint = project / ".privtune" / "checkpoints" / "dpsgd.pt"

    first = _start(project, tmp_path / "trained", "checkpoint")  # killed mid-training
    _kill_when_paused(first, tmp_path / "trained")
    assert checkpoint.is_file()
    (killed,) = _runs(project)
    assert killed.info.status == "RUNNING"  # what kill -9 leaves
    assert killed.data.tags[tracking.PID_TAG] == str(first.pid)

    second = _start(project, tmp_path / "writing", "write:dpsgd")  # resumes, killed mid-write
    _kill_when_paused(second, tmp_path / "writing")
    (half_written,) = (project / "models").glob(f".dpsgd.tmp-{second.pid}-*")
    assert (half_written / "finetune.json").is_file() and not (project / "models/dpsgd").exists()

    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    assert "finetune dpsgd: resuming at step " in capsys.readouterr().err  # said, not only tagged
    outputs = ["models/dpsgd/finetune.json", "models/dpsgd/ledger.json", "models/dpsgd/adapter"]
    outputs += [
        "metrics/finetune-dpsgd.json",
        "plots/finetune-dpsgd.csv",
        "plots/finetune-dpsgd.png",
    ]
    assert all((project / path).exists() for path in outputs)
    metrics = json.loads((project / "metrics/finetune-dpsgd.json").read_text())
    assert metrics["epsilon"] <= 4.0 and metrics["steps"] > 2
    assert not _leftovers(project) and not checkpoint.exists()
    runs = _runs(project)
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run, resumed and closed
    assert runs[0].info.run_id == killed.info.run_id
    assert tracking.ERROR_TAG not in runs[0].data.tags and "resumed_at_step" in runs[0].data.tags
    assert not find_leaks(project, private_probes(project))  # tags and artifacts included


@pytest.mark.slow
def test_dvc_checkout_restores_what_an_interrupted_repro_removed(tmp_path):
    """`dvc repro` removes a stage's outputs before running it: after an interruption,
    `dvc checkout <stage>` brings the cached ones back and git the git-tracked metrics."""
    project = tmp_path / "dvcproject"
    project.mkdir()
    (project / "stage.py").write_text(
        "import os, pathlib, sys\n"
        "if os.environ.get('INTERRUPT'):\n"
        "    sys.exit(3)\n"
        "pathlib.Path('model').mkdir(exist_ok=True)\n"
        "pathlib.Path('model/weights.bin').write_text(open('input.txt').read() * 2)\n"
        "pathlib.Path('metrics.json').write_text('{\"loss\": 1.5}')\n"
    )
    (project / "input.txt").write_text("v1")
    (project / "dvc.yaml").write_text(
        f"stages:\n  train:\n    cmd: {sys.executable} stage.py\n"
        "    deps: [input.txt, stage.py]\n    outs: [model]\n"
        "    metrics:\n      - metrics.json:\n          cache: false\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(*cmd: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, cwd=project, env={**env, **extra}, capture_output=True, text=True
        )

    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        assert sh(*cmd).returncode == 0, cmd
    assert sh("git", "add", "-A").returncode == 0
    assert (
        sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1").returncode
        == 0
    )
    (project / "input.txt").write_text("v2")
    assert sh("dvc", "repro", "-q", INTERRUPT="1").returncode != 0  # the stage died
    assert not (project / "model").exists() and not (project / "metrics.json").exists()

    # the outputs dvc.lock records (the last complete run), whatever the inputs are now
    assert sh("dvc", "checkout", "train").returncode == 0
    assert sh("git", "checkout", "--", "metrics.json").returncode == 0
    assert (project / "model/weights.bin").read_text() == "v1v1"
    assert json.loads((project / "metrics.json").read_text()) == {"loss": 1.5}


@pytest.mark.slow
def test_a_second_start_of_an_entry_waits_for_the_first_and_reuses_its_run(
    tiny_project, tmp_path, monkeypatch
):
    """Two processes fine-tuning one entry at once (a restart beside a killed launcher's
    orphaned workers, two shells) would release two models of the same records: the second
    waits for the first's lock, then reuses its finished run. Nothing is trained twice."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    edit_params(project, finetune={"checkpoint_every": 2})
    paused = tmp_path / "paused"
    first = _start(project, paused, "checkpoint")  # mid-training, holding the entry's lock
    _wait_for(paused.exists, first, "reached the pause")
    said = tmp_path / "second.err"
    with said.open("w") as err:
        second = _start_plain(project, err)
    try:
        lock = "is fine-tuning this entry in this project: waiting"  # the lock, not the run
        _wait_for(lambda: lock in said.read_text(), second, "said it waits")
        assert f"privtune pid {first.pid} on {socket.gethostname()}" in said.read_text()
        time.sleep(1)
        assert second.poll() is None and len(_runs(project)) == 1  # still waiting, no run
        paused.unlink()  # the first goes on and finishes
        assert first.wait(timeout=300) == 0
        assert second.wait(timeout=300) == 0
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    assert "reusing finished MLflow run" in said.read_text()
    runs = _runs(project)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert not list((project / ".privtune/checkpoints").glob("*.holder.json"))


@pytest.mark.slow
def test_a_start_in_another_checkout_sharing_the_store_waits_and_reuses_the_run(
    tiny_project, tmp_path
):
    """Two checkouts of one project sharing one tracking store (a team's PostgreSQL, or one
    sqlite file), each starting the same fine-tuning: the second's own project lock is free,
    so it waits on the store's lock for the run key, then reuses the first's finished run. One
    model of the records, not two."""
    import mlflow

    first_checkout, second_checkout = tmp_path / "first", tmp_path / "second"
    shutil.copytree(tiny_project, first_checkout)
    edit_params(first_checkout, finetune={"checkpoint_every": 2})
    shutil.copytree(first_checkout, second_checkout)
    store = f"sqlite:///{tmp_path}/shared.db"
    paused, said = tmp_path / "paused", tmp_path / "second.err"
    first = _start(first_checkout, paused, "checkpoint", store)
    second = None
    try:
        _wait_for(paused.exists, first, "reached the pause")
        with said.open("w") as err:
            second = _start_plain(second_checkout, err, store)
        waits = "is fine-tuning the same inputs against this tracking store"
        _wait_for(lambda: waits in said.read_text(), second, "said it waits")
        assert f"privtune pid {first.pid} on {socket.gethostname()}" in said.read_text()
        assert f"project {first_checkout})" in said.read_text()  # the holder's checkout
        time.sleep(1)
        client = mlflow.MlflowClient(store)
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert second.poll() is None and len(client.search_runs(experiments)) == 1
        paused.unlink()  # the first goes on and finishes
        assert first.wait(timeout=300) == 0
        assert second.wait(timeout=300) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    assert "reusing finished MLflow run" in said.read_text()
    runs = client.search_runs(experiments)
    assert [r.info.status for r in runs] == ["FINISHED"]
    ledgers = [c / "models/dpsgd/ledger.json" for c in (first_checkout, second_checkout)]
    assert ledgers[0].read_bytes() == ledgers[1].read_bytes()


@pytest.mark.slow
def test_sigterm_closes_the_run_as_killed_and_a_rerun_resumes_it(
    tiny_project, tmp_path, monkeypatch, capsys
):
    """SIGTERM (a scheduler's cancel, `kill`, torchrun passing it on) stops a stage as Ctrl-C
    does: exit 130, the MLflow run KILLED with why, not left RUNNING; a rerun resumes it, here
    with smaller micro-batches, which the run's tags then say (its params keep none)."""
    from privtune.cli import EXIT_INTERRUPTED, main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    edit_params(project, finetune={"checkpoint_every": 2})
    paused = tmp_path / "paused"
    first = _start(project, paused, "checkpoint")
    _wait_for(paused.exists, first, "reached the pause")
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(timeout=120) == EXIT_INTERRUPTED
    (run,) = _runs(project)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.ERROR_TAG] == "Terminated: interrupted"
    assert run.data.tags["privtune.physical_batch_size"] == "None"
    edit_params(project, finetune={"physical_batch_size": 2})
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    assert "resuming at step" in capsys.readouterr().err
    (resumed,) = _runs(project)
    assert (resumed.info.run_id, resumed.info.status) == (run.info.run_id, "FINISHED")
    assert resumed.data.tags["privtune.physical_batch_size"] == "2"
    assert not [k for k in resumed.data.params if k.endswith("physical_batch_size")]


def test_a_run_another_live_process_makes_is_waited_for_until_it_ends(tmp_path, monkeypatch):
    """Another checkout or machine sharing the store making a run with the same key: the
    fine-tuning waits for it (the project's lock cannot see it) and stops waiting when it
    ends; a run of a dead process is closed, not waited for, nor one whose heartbeats
    stopped (its pid may be another process's now)."""
    import contextlib
    import threading

    from privtune.privacy.distributed import Replica
    from privtune.stages import finetune

    monkeypatch.setattr(finetune, "LIVE_RUN_POLL_SECONDS", 0.1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with tracking.start_run("other", root=tmp_path, key="k") as other:
            run_id = other.run_id
        client = tracking._client(tmp_path)
        client.update_run(run_id, status="RUNNING")  # as its process left it, still alive
        client.set_tag(run_id, tracking.PID_TAG, str(sleeper.pid))
        assert tracking.running_elsewhere(tmp_path, "k").info.run_id == run_id
        assert tracking.running_elsewhere(tmp_path, "another key") is None
        beat = client.get_run(run_id).data.tags[tracking.HEARTBEAT_TAG]
        client.set_tag(run_id, tracking.HEARTBEAT_TAG, "2026-01-01T00:00:00.000+00:00")
        assert tracking.running_elsewhere(tmp_path, "k") is None  # silent for months
        client.set_tag(run_id, tracking.HEARTBEAT_TAG, beat)
        threading.Timer(1.0, lambda: (sleeper.kill(), sleeper.wait())).start()  # reaped
        began = time.monotonic()
        with contextlib.ExitStack() as held:
            finetune.wait_turn(tmp_path, "dpsgd", "k", Replica(), held, round_seconds=0.2)
            assert (tmp_path / ".privtune/checkpoints/dpsgd.holder.json").is_file()
        assert not (tmp_path / ".privtune/checkpoints/dpsgd.holder.json").exists()  # released
        assert time.monotonic() - began >= 0.9  # waited until its process was gone
        assert client.get_run(run_id).info.status == "KILLED"
        assert tracking.running_elsewhere(tmp_path, "k") is None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize(
    ("world", "error", "lost"),
    [
        ("2", RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"), True),
        ("2", RuntimeError("Connection reset by peer"), True),
        ("1", RuntimeError("Connection closed by peer"), False),  # not distributed: a bug
        ("2", RuntimeError("shape mismatch"), False),
        ("2", ValueError("Connection closed by peer"), False),
    ],
)
def test_a_rank_whose_peer_went_away_is_interrupted_not_a_bug(world, error, lost, monkeypatch):
    from privtune.cli import _lost_a_rank

    monkeypatch.setenv("WORLD_SIZE", world)
    assert _lost_a_rank(error) is lost
