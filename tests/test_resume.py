"""Resumable runs: a run stopped after a checkpoint and started again ends exactly where an
uninterrupted run ends (ledger, epsilon, adapter, history), spending nothing twice."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from privtune.callbacks import Callback
from privtune.modeling import attach_lora
from privtune.train import Checkpointing, train
from tests.conftest import write_params
from tests.test_train import PARAMS, _data, _lora_state


class Crash(Callback):
    """Dies after ``at`` steps, as a killed process would (its memory is lost)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, step, info):
        if step + 1 == self.at:
            raise KeyboardInterrupt(f"crash after step {step}")
        return True


@pytest.mark.parametrize(("method", "options"), [("dpsgd", {}), ("rldp", {"rl_interval": 2})])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(
    method, options, tiny_model, tiny_tokenizer, tmp_path
):
    train_data, valid_data = _data(tiny_tokenizer)
    params = PARAMS.model_copy(update={"audit_canaries": 24})
    start = attach_lora(tiny_model, params.lora)

    def run(callbacks=(), checkpoint=None):
        model = copy.deepcopy(start)  # a new process: nothing survives but the checkpoint
        result = train(
            model,
            train_data,
            valid_data,
            params,
            method,
            options,
            callbacks=list(callbacks),
            checkpoint=checkpoint,
            show_progress=False,
        )
        return result, _lora_state(model)

    reference, reference_state = run()
    checkpoint = Checkpointing(tmp_path / "run.pt", every=3, key="same-inputs")
    with pytest.raises(KeyboardInterrupt):
        run([Crash(at=5)], checkpoint)  # checkpoint at step 3, dies during step 5
    assert checkpoint.path.is_file()
    resumed, resumed_state = run(checkpoint=checkpoint)

    assert resumed.resumed_at == 3 and reference.resumed_at is None
    assert resumed.ledger.state_dict() == reference.ledger.state_dict()  # nothing spent twice
    assert resumed.epsilon == reference.epsilon and resumed.steps_taken == reference.steps_taken
    for name, value in reference_state.items():
        assert torch.equal(resumed_state[name], value), name
    assert resumed.history == reference.history
    assert (resumed.audit.scores == reference.audit.scores).all()


def test_a_checkpoint_of_other_inputs_is_not_resumed(tiny_model, tiny_tokenizer, tmp_path):
    train_data, valid_data = _data(tiny_tokenizer)
    model = attach_lora(tiny_model, PARAMS.lora)
    mine = Checkpointing(tmp_path / "run.pt", every=2, key="inputs-a")
    with pytest.raises(KeyboardInterrupt):
        train(
            copy.deepcopy(model),
            train_data,
            valid_data,
            PARAMS,
            "dpsgd",
            callbacks=[Crash(at=3)],
            checkpoint=mine,
            show_progress=False,
        )
    other = Checkpointing(tmp_path / "run.pt", every=2, key="inputs-b")
    result = train(
        model, train_data, valid_data, PARAMS, "dpsgd", checkpoint=other, show_progress=False
    )
    assert result.resumed_at is None and result.steps_taken == result.plan.steps


def _mlflow_runs(root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("privtune")
    return client.search_runs([experiment.experiment_id], run_view_type=3)  # ALL


def _digest(root: Path, method: str) -> tuple[dict, bytes]:
    ledger = json.loads((root / "models" / method / "ledger.json").read_text())
    adapter = (root / "models" / method / "adapter" / "adapter_model.safetensors").read_bytes()
    return ledger, adapter


def _checkpointing_project(tmp_path: Path, epochs: float) -> Path:
    """A prepared project with its base, checkpointing every 2 steps, logging every step."""
    from privtune.cli import main

    project = tmp_path / "project"
    project.mkdir()
    finetune = {"epochs": epochs, "checkpoint_every": 2, "log_every": 1}
    write_params(project / "params.yaml", finetune=finetune)
    assert main(["--root", str(project), "--no-progress", "prepare"]) == 0
    assert main(["--root", str(project), "--no-progress", "base"]) == 0
    return project


@pytest.mark.slow
def test_kill_9_mid_training_resumes_in_the_same_mlflow_run(tmp_path):
    """The real thing: `privtune finetune` killed with SIGKILL after a checkpoint, run again:
    the same ledger and adapter bytes as an uninterrupted run, one MLflow run (resumed)."""
    from privtune.cli import main

    project = _checkpointing_project(tmp_path, epochs=3.0)
    reference = tmp_path / "reference"
    shutil.copytree(project, reference)
    assert main(["--root", str(reference), "--no-progress", "finetune", "dpsgd"]) == 0

    command = [sys.executable, "-m", "privtune.cli", "--root", str(project), "--no-progress"]
    # the project's own store, whatever an earlier test left in the environment
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    # The real CLI, paused once step 3's metrics are in MLflow (tests/pause_cli.py), after the
    # checkpoint of steps 0-1: the kill lands past a checkpoint however fast the machine is,
    # and the resumed run replays steps 2 and 3, which the killed one logged.
    saved = tmp_path / "checkpoint-saved"
    pause = [sys.executable, str(Path(__file__).with_name("pause_cli.py")), str(saved)]
    process = subprocess.Popen([*pause, "log:3", "--", *command[3:], "finetune", "dpsgd"], env=env)
    checkpoint = project / ".privtune" / "checkpoints" / "dpsgd.pt"
    deadline = time.time() + 300
    while not saved.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended (exit {process.returncode}) before its pause"
    assert checkpoint.is_file(), "no checkpoint was written"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed = _mlflow_runs(project)
    assert [r.info.status for r in killed] == ["RUNNING"]  # what kill -9 leaves behind

    assert subprocess.run([*command, "finetune", "dpsgd"], env=env).returncode == 0
    assert _digest(project, "dpsgd") == _digest(reference, "dpsgd")
    runs = _mlflow_runs(project)
    assert len(runs) == 1 and runs[0].info.run_id == killed[0].info.run_id
    assert runs[0].info.status == "FINISHED" and int(runs[0].data.tags["resumed_at_step"]) == 2
    # each step's metrics once: the replayed steps 2 and 3 are not logged twice
    import mlflow

    store = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    steps = [m.step for m in store.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(steps) == list(range(max(steps) + 1)) and 3 in steps
    assert not checkpoint.exists()  # done: nothing left to resume


@pytest.mark.parametrize("gone", ["deleted", "other store"])
def test_a_checkpoint_whose_mlflow_run_is_gone_resumes_in_a_new_run(
    tmp_path, monkeypatch, capsys, gone
):
    """A run killed after its checkpoint, then its MLflow run deleted in the UI or the store
    changed (MLFLOW_TRACKING_URI set to the team's): the rerun crashed (exit 5, "Run ... not
    found" / "in the deleted state") on every try until the checkpoint was deleted by hand.
    It now resumes the training in a new run that names the lost one, its ledger whole."""
    import mlflow

    from privtune import callbacks
    from privtune.cli import EXIT_INTERRUPTED, main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = _checkpointing_project(tmp_path, epochs=2.0)
    real_save = callbacks.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(callbacks, "save_checkpoint", save_then_die)
        assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == (
            EXIT_INTERRUPTED
        )
    (killed,) = _mlflow_runs(project)
    assert (project / ".privtune" / "checkpoints" / "dpsgd.pt").is_file()
    store = f"sqlite:///{project}/mlflow.db"
    if gone == "deleted":
        mlflow.MlflowClient(store).delete_run(killed.info.run_id)
    else:
        store = f"sqlite:///{tmp_path}/team.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    capsys.readouterr()
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    err = capsys.readouterr().err
    assert "resuming at step 2" in err
    assert f"the checkpoint's MLflow run {killed.info.run_id} is not in this store" in err
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("privtune").experiment_id], "attributes.status = 'FINISHED'"
    )
    assert run.info.run_id != killed.info.run_id
    assert run.data.tags["privtune.resumed_from_run"] == killed.info.run_id
    assert run.data.tags["resumed_at_step"] == "2" and "data_sha256" in run.data.params
    finished = json.loads((project / "metrics" / "finetune-dpsgd.json").read_text())
    ledger = json.loads((project / "models" / "dpsgd" / "ledger.json").read_text())
    steps = [entry["step"] for entry in ledger["entries"]]
    assert steps == list(range(finished["steps"])) and finished["steps"] > 2  # each step once
