"""`python -m privtune.profiles run <profile> --lanes N`: the methods' stages at once, with
the outputs and dvc.lock that `dvc repro` leaves, and a failed method stopping only its lane."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from privtune import lanes, profiles
from tests.conftest import FAST_BASE, write_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path):
    """A checkout with the tiny params and one profile, `pair`: nonprivate and dpsgd."""
    from dvc.repo import Repo

    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(tmp_path / "params.yaml", **FAST_BASE)
    pair = {"finetune": {"epochs": 0.5}}
    (tmp_path / "profiles.yaml").write_text(yaml.safe_dump({"pair": pair}))
    Repo.init(str(tmp_path), no_scm=True).close()
    return tmp_path


def _times(target: Path) -> dict[str, dict]:
    found = json.loads((target / "logs" / lanes.TIMES_FILE).read_text())
    return {record["stage"]: record for record in found["stages"]}


@pytest.mark.slow
def test_lanes_run_methods_at_once_and_leave_what_dvc_repro_leaves(checkout, capsys):
    from dvc.repo import Repo

    assert profiles.main(["run", "pair", "--root", str(checkout), "--lanes", "2"]) == 0
    target = checkout / "profiles" / "pair"
    times = _times(target)
    assert sorted(times) == sorted(
        f"{stage}@{method}" for stage in lanes.METHOD_STAGES for method in ("nonprivate", "dpsgd")
    )
    assert all(record["status"] == "ok" for record in times.values())
    # the two fine-tunings overlapped: each began before the other ended
    one, other = times["finetune@nonprivate"], times["finetune@dpsgd"]
    assert one["started_s"] < other["started_s"] + other["seconds"]
    assert other["started_s"] < one["started_s"] + one["seconds"]
    # each stage's output is in its own log, DVC's and the stage's
    assert "Running stage 'finetune@dpsgd'" in (target / times["finetune@dpsgd"]["log"]).read_text()
    # register and report ran after the lanes, and DVC finds nothing left to do
    assert (target / "reports" / "report.md").is_file()
    with Repo(str(target)) as repo:
        assert repo.status() == {}
    printed = capsys.readouterr().out
    assert "attack@dpsgd: ok in" in printed
    # the same command again: every stage is up to date, and says so; the logs and times of
    # the run that did the work are kept
    assert profiles.main(["run", "pair", "--root", str(checkout), "--lanes", "2"]) == 0
    again = _times(target)
    assert {record["status"] for record in again.values()} == {"up to date"}
    assert again["finetune@dpsgd"]["ran"]["seconds"] == other["seconds"]
    assert "Running stage 'finetune@dpsgd'" in (target / times["finetune@dpsgd"]["log"]).read_text()
    assert "finetune@dpsgd: up to date in" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failed_stage_stops_its_lane_only_and_names_the_field(checkout, capsys):
    broken = {"method": "rldp", "warm_start": "missing-policy.pt"}
    (checkout / "profiles.yaml").write_text(
        yaml.safe_dump({"broken": {"methods": {"nonprivate": {}, "warm": broken}}})
    )
    assert profiles.main(["run", "broken", "--root", str(checkout), "--lanes", "2"]) == 1
    target = checkout / "profiles" / "broken"
    times = _times(target)
    assert times["finetune@warm"]["status"] == "failed"
    assert "methods.warm.warm_start" in times["finetune@warm"]["message"]
    assert times["evaluate@warm"]["status"] == times["attack@warm"]["status"] == "not run"
    assert all(times[f"{s}@nonprivate"]["status"] == "ok" for s in lanes.METHOD_STAGES)
    assert not (target / "reports" / "report.md").exists()  # register and report wait
    captured = capsys.readouterr()
    assert "finetune@warm: failed in " in captured.out
    # the path the user wrote, in the checkout (profiles.from_checkout)
    missing = checkout.resolve() / "missing-policy.pt"
    assert f"s (methods.warm.warm_start: warm_start '{missing}' is not" in captured.out
    assert "failed: finetune@warm" in captured.err and "rerun the same command" in captured.err


def test_lanes_share_the_cpus_unless_the_caller_set_the_threads(monkeypatch):
    monkeypatch.setattr(lanes.os, "sched_getaffinity", lambda pid: set(range(16)))
    env = lanes.lane_env({"PATH": "/bin"}, 3)
    assert {env[name] for name in lanes.THREAD_VARIABLES} == {"5"}
    assert lanes.lane_env({"OMP_NUM_THREADS": "2"}, 3)["OMP_NUM_THREADS"] == "2"
    assert lanes.lane_env({}, 32)["OMP_NUM_THREADS"] == "1"  # never zero


def test_lanes_must_be_positive(checkout, capsys):
    with pytest.raises(SystemExit) as done:
        profiles.main(["run", "pair", "--root", str(checkout), "--lanes", "0"])
    assert done.value.code == 2
    assert "--lanes must be at least 1" in capsys.readouterr().err
    assert not (checkout / "profiles").exists()  # refused before anything was built


def test_a_cpu_profile_stands_in_and_runs_one_stage_after_another(checkout, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profiles, "repro", lambda target, *stages: calls.append(target) or 0)
    monkeypatch.setattr(lanes, "run", lambda *args: pytest.fail("lanes on the CPU profile"))
    (checkout / "profiles.yaml").write_text(
        yaml.safe_dump({"gpu": {"finetune": {"epochs": 2.0}}, "cpu": {"extends": "gpu"}})
    )
    argv = ["run", "gpu", "--cpu-profile", "cpu", "--root", str(checkout), "--lanes", "3"]
    assert profiles.main(argv) == 0
    assert calls == [checkout.resolve() / "profiles" / "cpu"]


def test_ctrl_c_lets_the_running_stage_end_and_starts_no_other(tmp_path, monkeypatch):
    """SIGINT reaches the main thread while it waits for the lanes: the stage running ends,
    no stage starts after it, and lanes.json says the run was interrupted."""
    import os
    import signal
    import time

    started = []

    def stage(self, name, gpu=None):
        started.append(name)
        if len(started) == 1:
            time.sleep(0.2)  # the main thread waits for the lanes
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first stage runs
            time.sleep(0.5)
        self.ended({"stage": name, "status": "ok", "seconds": 0.0})
        return True

    monkeypatch.setattr(lanes.Lanes, "stage", stage)
    run = lanes.Lanes(tmp_path, 1, ["a", "b", "c"])
    # Python's own handler, as `python -m privtune.profiles` has it (a library an earlier
    # test started, Ray or a server, may have installed another in this process)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.run()
    finally:
        signal.signal(signal.SIGINT, before)
    assert started == ["finetune@a"]
    found = json.loads((tmp_path / "logs" / lanes.TIMES_FILE).read_text())
    assert found["interrupted"] is True
    statuses = {record["stage"]: record["status"] for record in found["stages"]}
    assert statuses.pop("finetune@a") == "ok"
    expected = {f"{s}@{m}": "not run" for s in lanes.METHOD_STAGES for m in "abc"}
    assert statuses == {k: v for k, v in expected.items() if k != "finetune@a"}
    assert len(found["stages"]) == 9  # b's and c's lanes never started, and say so


def _fake_dvc(tmp_path: Path, output: str, code: int) -> str:
    """A `dvc` that prints ``output`` and exits with ``code``, as DVC reports a stage."""
    script = tmp_path / "dvc"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


def test_a_stage_is_told_by_what_dvc_and_the_stage_said(tmp_path):
    run = lanes.Lanes(tmp_path, 2, ["a"])
    log = tmp_path / "logs" / "finetune@a.log"
    log.write_text("Running stage 'finetune@a': the run that did the work")
    run.dvc = _fake_dvc(tmp_path, "Stage 'finetune@a' didn't change, skipping", 0)
    assert run.stage("finetune@a")
    assert run.records[-1]["status"] == "up to date"
    assert "did the work" in log.read_text()  # kept, not replaced by the skip
    failed = "ERROR: failed to reproduce 'evaluate@a': failed to run: privtune evaluate a"
    run.dvc = _fake_dvc(tmp_path, f"{failed}, exited with 130", 255)
    assert not run.stage("evaluate@a")
    assert run.records[-1]["status"] == "interrupted" and run.records[-1]["exit_code"] == 130
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    run.dvc = _fake_dvc(tmp_path, f"{oom}\n{failed}, exited with 5", 255)
    assert not run.stage("attack@a")
    record = run.records[-1]
    assert record["status"] == "failed" and record["exit_code"] == 5
    assert "out of memory with 2 lanes: run fewer" in record["message"]
    assert "OutOfMemoryError" in (tmp_path / record["log"]).read_text()
    assert run.running == []  # each stage left the bar's list of those running as it ended


def test_a_lane_that_crashes_stops_the_others_and_is_recorded(tmp_path, monkeypatch):
    def stage(self, name, gpu=None):
        raise OSError("disk full")

    monkeypatch.setattr(lanes.Lanes, "stage", stage)
    run = lanes.Lanes(tmp_path, 1, ["a", "b"])
    with pytest.raises(OSError, match="disk full"):
        run.run()
    found = json.loads((tmp_path / "logs" / lanes.TIMES_FILE).read_text())
    assert found["interrupted"] is True
    assert {record["status"] for record in found["stages"]} == {"not run"}
    assert len(found["stages"]) == 6  # b's lane never started, and says so


def _pretend_dvc_ran(monkeypatch) -> list[list[str]]:
    """The profile run's `dvc` calls recorded and answered 0 (prepare and base 'built')."""
    import subprocess

    calls = []

    def fake(command, **kwargs):
        calls.append(command[1:])
        return subprocess.CompletedProcess(command, 0)

    # the modules' own names for it, not the module: other libraries keep the real one
    for module in (lanes, profiles):
        monkeypatch.setattr(module, "subprocess", SimpleNamespace(run=fake))
    return calls


def test_a_tracking_server_that_does_not_answer_is_named_not_a_traceback(
    checkout, monkeypatch, capsys
):
    _pretend_dvc_ran(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert profiles.main(["run", "pair", "--root", str(checkout), "--lanes", "2"]) == 6
    err = capsys.readouterr().err
    assert err.count("unavailable: MLFLOW_TRACKING_URI") == 1 and "Traceback" not in err


def test_a_profile_without_methods_runs_dvc_repro_without_lanes(checkout, monkeypatch):
    calls = _pretend_dvc_ran(monkeypatch)
    (checkout / "profiles.yaml").write_text(yaml.safe_dump({"none": {"methods": {}}}))
    assert profiles.main(["run", "none", "--root", str(checkout), "--lanes", "3"]) == 0
    assert calls == [["repro", "prepare", "base"], ["repro"]]
    assert not (checkout / "profiles" / "none" / "logs").exists()


def test_a_stage_interrupted_alone_keeps_register_and_report_waiting(checkout, monkeypatch, capsys):
    """A stage stopped by a signal of its own (exit 130) while this process was not: the
    final `dvc repro` would redo it one stage after another, so it is not run."""
    calls = _pretend_dvc_ran(monkeypatch)
    done = [{"stage": f"{s}@nonprivate", "status": "ok"} for s in lanes.METHOD_STAGES]
    cut = [{"stage": "finetune@dpsgd", "status": "interrupted"}]
    monkeypatch.setattr(lanes.Lanes, "run", lambda self: done + cut)
    assert profiles.main(["run", "pair", "--root", str(checkout), "--lanes", "2"]) == 1
    assert calls == [["repro", "prepare", "base"]]
    assert "failed: finetune@dpsgd" in capsys.readouterr().err


def test_lanes_share_several_gpus_out_one_gpu_to_a_method(tmp_path):
    """Three lanes over GPUs 0 and 1: each method's stages see one GPU, the two first
    methods at once on different ones (a stage's command prints what it was given)."""
    script = tmp_path / "dvc"
    script.write_text('#!/bin/sh\necho "gpu=$CUDA_VISIBLE_DEVICES"; sleep 0.3\n')
    script.chmod(0o755)
    run = lanes.Lanes(tmp_path, 3, ["a", "b", "c"], gpus=["0", "1"])
    run.dvc = str(script)
    records = {record["stage"]: record for record in run.run()}
    for method in "abc":
        seen = {records[f"{s}@{method}"]["gpu"] for s in lanes.METHOD_STAGES}
        assert len(seen) == 1  # one GPU for the method's three stages
        log = (tmp_path / records[f"attack@{method}"]["log"]).read_text()
        assert f"gpu={seen.pop()}" in log
    assert records["finetune@a"]["gpu"] != records["finetune@b"]["gpu"]
    assert run.gpu_load == {"0": 0, "1": 0}  # every lane gave its GPU back
    # one GPU (or none): the lanes see what this process sees, unchanged
    single = lanes.Lanes(tmp_path, 2, ["a"], gpus=["0"])
    assert single.gpu_load == {}


def test_visible_gpus_keep_the_list_this_process_was_given(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert lanes.visible_gpus() == ["2", "3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert lanes.visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lanes.visible_gpus() == []
