"""A retried fine-tuning stage neither trains (and spends the budget) again nor leaves a
duplicate MLflow run: runs are keyed by stage and inputs."""

import shutil

import mlflow
import pytest

from privtune import tracking
from privtune.cli import main
from privtune.config import load_params
from privtune.stages.finetune import run_key
from tests.conftest import write_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_params(root / "params.yaml")
    for stage in ("prepare", "base"):
        assert main(["--root", str(root), "--no-progress", stage]) == 0
    return root


@pytest.fixture
def project(prepared, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    shutil.copytree(prepared, root)
    return root


def _dpsgd_runs(root):
    client = mlflow.MlflowClient(tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "dpsgd"]


def test_retry_after_outputs_were_lost_reuses_the_finished_run(project, capsys):
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    ledger = (project / "models/dpsgd/ledger.json").read_text()
    metrics = (project / "metrics/finetune-dpsgd.json").read_text()
    # DVC deletes a stage's outputs before it reruns the stage: simulate that, then retry.
    shutil.rmtree(project / "models/dpsgd")
    (project / "metrics/finetune-dpsgd.json").unlink()
    capsys.readouterr()
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    assert "reusing finished MLflow run" in capsys.readouterr().err
    assert len(_dpsgd_runs(project)) == 1
    assert (project / "models/dpsgd/ledger.json").read_text() == ledger  # nothing re-spent
    assert (project / "metrics/finetune-dpsgd.json").read_text() == metrics
    assert (project / "models/dpsgd/adapter/adapter_config.json").is_file()
    assert (project / "plots/finetune-dpsgd.png").is_file()


def test_crashed_attempt_is_replaced_not_duplicated(project):
    params = load_params(project / "params.yaml")
    key = run_key(params, "dpsgd", project)
    with pytest.raises(RuntimeError), tracking.start_run("dpsgd", root=project, key=key):
        raise RuntimeError("worker lost mid-training")
    assert [r.info.status for r in _dpsgd_runs(project)] == ["FAILED"]
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    assert [r.info.status for r in _dpsgd_runs(project)] == ["FINISHED"]


def test_changed_inputs_train_anew(project):
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    write_params(project / "params.yaml", methods={"nonprivate": {}, "dpsgd": {"clip": 0.5}})
    assert main(["--root", str(project), "--no-progress", "finetune", "dpsgd"]) == 0
    runs = _dpsgd_runs(project)
    assert len(runs) == 2 and len({r.data.tags[tracking.RUN_KEY_TAG] for r in runs}) == 2


def test_a_running_attempt_elsewhere_is_not_deleted(project, monkeypatch):
    """Workers on several machines share one store: a run of the same key still RUNNING there
    may be alive, and this machine cannot tell; only ended attempts are replaced."""
    import socket

    params = load_params(project / "params.yaml")
    key = run_key(params, "dpsgd", project)
    with tracking.start_run("dpsgd", root=project, key=key) as other:
        other_id = other.run_id
    client = mlflow.MlflowClient(tracking.tracking_uri(project))
    client.update_run(other_id, status="RUNNING")  # still going, on another machine
    client.set_tag(other_id, tracking.HOST_TAG, f"not-{socket.gethostname()}")
    assert tracking.discard_unfinished(project, key) == 0
    client.set_terminated(other_id, status="FAILED")  # it ended there without finishing
    assert tracking.discard_unfinished(project, key) == 1
    assert _dpsgd_runs(project) == []


def test_a_non_private_run_is_reused_across_an_epsilon_sweep_and_a_private_one_is_not(
    project, capsys, monkeypatch, tmp_path
):
    """What only a private run reads (the target ε, the accountant) is not in a non-private
    run's key: an ε sweep reuses its model (δ is: its attack audits the model at the plan's
    δ). The premise, checked: with reproducible seeds the non-private run trains the very same
    adapter at another ε and accountant."""
    write_params(project / "params.yaml", finetune={"secret_noise": False})
    params = load_params(project / "params.yaml")
    assert main(["--root", str(project), "--no-progress", "finetune", "nonprivate"]) == 0
    adapter = (project / "models/nonprivate/adapter/adapter_model.safetensors").read_bytes()
    other = {"secret_noise": False, "epsilon": 2.0, "accountant": "rdp"}
    write_params(project / "params.yaml", finetune=other)
    swept = load_params(project / "params.yaml")
    assert run_key(swept, "nonprivate", project) == run_key(params, "nonprivate", project)
    assert run_key(swept, "dpsgd", project) != run_key(params, "dpsgd", project)
    audited_elsewhere = swept.model_copy(
        update={"finetune": swept.finetune.model_copy(update={"delta": 1e-6})}
    )
    assert run_key(audited_elsewhere, "nonprivate", project) != run_key(
        swept, "nonprivate", project
    )
    changed = load_params(project / "params.yaml").model_copy(
        update={"finetune": swept.finetune.model_copy(update={"lr": 0.02})}
    )
    assert run_key(changed, "nonprivate", project) != run_key(swept, "nonprivate", project)
    capsys.readouterr()
    assert main(["--root", str(project), "--no-progress", "finetune", "nonprivate"]) == 0
    assert "reusing finished MLflow run" in capsys.readouterr().err
    assert (project / "models/nonprivate/adapter/adapter_model.safetensors").read_bytes() == adapter
    # trained again at the other ε and accountant (in a new store): the same adapter
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/fresh.db")
    assert main(["--root", str(project), "--no-progress", "finetune", "nonprivate"]) == 0
    assert "reusing" not in capsys.readouterr().err
    assert (project / "models/nonprivate/adapter/adapter_model.safetensors").read_bytes() == adapter


def test_how_a_step_is_computed_is_not_part_of_a_run_key(project):
    """A run retried with smaller micro-batches (out of memory), the other per-sample gradient
    code or another checkpoint interval makes the same release (the same ledger and noise:
    tests/test_mechanisms.py): it resumes or reuses the run instead of releasing another."""
    params = load_params(project / "params.yaml")
    for name in ("dpsgd", "nonprivate"):
        for change in ({"physical_batch_size": 2}, {"grad_sampler": "opacus"},
                       {"checkpoint_every": 3}):  # fmt: skip
            other = params.model_copy(
                update={"finetune": params.finetune.model_copy(update=change)}
            )
            assert run_key(other, name, project) == run_key(params, name, project), change
