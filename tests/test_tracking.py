"""What MLflow shows for a run and the experiment, against a real sqlite store: final metrics at
the last step under self-explaining names, the experiment described and typed for training,
the headline view in the form MLflow's UI reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privtune import tracking


def test_final_metrics_take_their_own_names_where_they_differ_from_the_step_series():
    finals = tracking.final_metrics(
        {
            "epsilon": 7.99,
            "epsilon_rdp": 9.94,
            "noise_multiplier": 0.49,
            "valid_perplexity": 248.0,
            "steps": 41,  # an int: the step count is a param, not a metric
            "private": True,
            "accountant": "pld",
        }
    )
    assert finals == {
        "epsilon": 7.99,  # continues the per-step curve at the last step
        "epsilon_rdp_looser_bound": 9.94,
        "noise_multiplier_calibrated": 0.49,  # not the last step's z
        "valid_perplexity": 248.0,
    }


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runs_log_finals_at_the_last_step_and_the_epsilon_curve_stays_monotone(store):
    import mlflow

    with tracking.start_run("dpsgd", root=store) as run:
        for step, eps in [(0, 1.0), (5, 3.0), (9, 4.0)]:
            run.log_metrics({"epsilon": eps, "noise_multiplier": 0.8}, step=step)
        run.log_metrics(tracking.final_metrics({"epsilon": 4.0, "noise_multiplier": 0.7}), step=9)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.run_id, "epsilon")
    ordered = sorted(history, key=lambda m: (m.step, m.timestamp))
    assert [m.step for m in ordered][0] == 0 and ordered[-1].step == 9
    values = [m.value for m in ordered]
    assert values == sorted(values)
    assert client.get_run(run.run_id).data.metrics["noise_multiplier_calibrated"] == 0.7
    assert {m.value for m in client.get_metric_history(run.run_id, "noise_multiplier")} == {0.8}


def test_experiment_is_described_typed_and_has_the_headline_view(store):
    import mlflow

    with tracking.start_run("dpsgd", root=store):
        pass
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    tags = experiment.tags
    assert tags[tracking.NOTE_TAG].startswith("**privtune")
    assert "`epsilon_rdp_looser_bound`" in tags[tracking.NOTE_TAG]
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    # The envelope MLflow 3.17's UI parses (name, numeric createdAt, state as a JSON string).
    envelope = json.loads(tags["mlflow.sharedViewState.privtune-headline"])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    columns = state["selectedColumns"]
    assert "metrics.`epsilon`" in columns and "params.`method`" in columns
    # the fine-tuning runs only (the report run has no headline numbers), the audit's bound
    # beside the epsilon it must not pass; widths apply along the order (MLflow 3.17's UI)
    assert state["searchFilter"] == "tags.stage = 'finetune'"
    assert state["columnOrder"] == columns
    at = columns.index("metrics.`epsilon`")
    assert columns[at + 1] == "metrics.`attack.audit_epsilon_lower_bound`"
    for column in columns:  # wide enough for the name, and a metric's 17 significant digits
        name = column.split("`")[1]
        assert state["columnWidths"][column] >= 7 * len(name) + 28
        # a number's widest value: "9.671179883945841e-05" (21 characters, δ, a param)
        assert (
            column in ("params.`method`", "params.`private`")
            or state["columnWidths"][column] >= 190
        )
    assert all(c.split(".", 1)[0] in {"metrics", "params"} for c in columns)
    assert all(c.count("`") == 2 for c in columns)
    # Describing again changes nothing (the view keeps its creation time).
    tracking.describe_experiment(client, experiment.experiment_id)
    assert client.get_experiment(experiment.experiment_id).tags == tags
    url = tracking.headline_url(experiment.experiment_id)
    assert "workflowType=machine_learning" in url and "viewStateShareKey=privtune-headline" in url


def test_attached_metrics_leave_a_finished_run_closed(store):
    import mlflow

    with tracking.start_run("dpsgd", root=store) as run:
        run.log_metrics({"loss": 2.0}, step=3)
    client = mlflow.MlflowClient()
    before = client.get_run(run.run_id).info
    tracking.attach_metrics(store, run.run_id, {"test_perplexity": 40.0, "bad": float("nan")}, 3)
    after = client.get_run(run.run_id)
    assert (after.info.status, after.info.end_time) == (before.status, before.end_time)
    assert after.data.metrics["test_perplexity"] == 40.0 and "bad" not in after.data.metrics
    assert client.get_metric_history(run.run_id, "test_perplexity")[0].step == 3


def test_git_modified_names_uncommitted_changes_but_not_the_pipelines_outputs(tmp_path):
    """Beside git_commit (a run's param, the card's provenance): whether that commit is all
    that trained the model. The pipeline's own tracked outputs do not count."""
    import subprocess

    assert tracking.git_modified(tmp_path) == "unknown"  # not a git checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    for name in ("params.yaml", "dvc.lock", "metrics/finetune-dpsgd.json", "train.py"):
        (tmp_path / name).write_text("v1\n")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    assert tracking.git_modified(tmp_path) == "none"
    (tmp_path / "dvc.lock").write_text("v2\n")  # what `dvc repro` rewrites
    (tmp_path / "metrics/finetune-dpsgd.json").write_text("v2\n")
    (tmp_path / "notes.jsonl").write_text("untracked\n")
    assert tracking.git_modified(tmp_path) == "none"
    (tmp_path / "params.yaml").write_text("v2\n")
    (tmp_path / "train.py").write_text("v2\n")
    assert tracking.git_modified(tmp_path) == "params.yaml, train.py"


def test_git_modified_of_a_profiles_project_sees_the_checkout_and_its_own_edits(
    tmp_path, monkeypatch
):
    """profiles/<name>/ is git-ignored: git saw nothing there, so a profile's run (the way
    SmolLM2 runs) said "none" though the checkout's code was edited, or the profile's own
    params.yaml by hand before a `dvc repro` in it."""
    import shutil
    import subprocess

    from privtune import profiles

    checkout = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "src" / "privtune").mkdir(parents=True)
    for name in ("params.yaml", "profiles.yaml", "dvc.yaml"):
        shutil.copy(checkout / name, repo / name)
    (repo / "src" / "privtune" / "stage.py").write_text("STEPS = 1\n")
    (repo / ".gitignore").write_text("/profiles/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=repo, check=True)
    built = profiles.project(repo, "quick", None, check=False)
    assert built == repo / "profiles" / "quick"
    assert tracking.git_modified(built) == "none"
    code = repo / "src" / "privtune" / "stage.py"
    code.write_text("STEPS = 2\n")  # the checkout's code, edited after the build
    assert (
        tracking.git_modified(built)
        == "src/privtune/stage.py, profiles/quick/src/privtune/stage.py"
    )
    profiles.project(repo, "quick", None, check=False)  # rebuilt from the edited checkout
    assert tracking.git_modified(built) == "src/privtune/stage.py"
    code.write_text("STEPS = 1\n")
    profiles.project(repo, "quick", None, check=False)
    params = built / "params.yaml"
    params.write_text(params.read_text().replace("epsilon: 8.0", "epsilon: 7.0", 1))  # by hand
    assert "epsilon: 7.0" in params.read_text()
    assert tracking.git_modified(built) == "profiles/quick/params.yaml"
    assert tracking.git_modified(repo) == "none"  # the checkout itself: as before
    # the pipeline flow's overrides on a profile are what it was built of, not an edit
    profiles.project(repo, "quick", {"finetune.epsilon": 7.0}, check=False)
    assert "epsilon: 7.0" in params.read_text() and tracking.git_modified(built) == "none"
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # a slim image without git
    assert tracking.git_modified(built) == "unknown"  # as outside git, not a crash
    monkeypatch.undo()
    (built / tracking.BUILT_FROM).unlink()  # a project built before this record was kept
    assert tracking.git_modified(built) == (
        "profiles/quick (not compared with the checkout: rebuild it to know)"
    )


def test_a_project_tracks_its_runs_in_its_own_experiment(tiny_project, tmp_path, capsys):
    """`tracking.experiment` names where a project's runs go (a profile's project gets
    `privtune-<profile>`): the fine-tuning is tracked there, and a rerun with the same inputs
    finds it and reuses it instead of training (and releasing a model) again. After a rename
    the finished run is still reused (the same release wherever it is filed), through a copy
    filed in the new experiment, which the project's later stages then write to."""
    import shutil

    import mlflow

    from privtune.cli import main
    from privtune.io import read_json
    from tests.conftest import edit_params

    root = tmp_path / "p"
    shutil.copytree(tiny_project, root)
    edit_params(root, tracking={"experiment": "cardiology-notes"})
    for _ in range(2):
        assert main(["--root", str(root), "--no-progress", "finetune", "dpsgd"]) == 0
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert client.get_experiment_by_name(tracking.EXPERIMENT) is None
    experiment = client.get_experiment_by_name("cardiology-notes")
    [trained] = client.search_runs([experiment.experiment_id])
    assert trained.data.tags["entry"] == "dpsgd"
    capsys.readouterr()

    edit_params(root, tracking={"experiment": "renamed"})
    for _ in range(2):  # the second run reuses the copy: no copy of a copy
        assert main(["--root", str(root), "--no-progress", "finetune", "dpsgd"]) == 0
    err = capsys.readouterr().err
    assert f"reusing finished MLflow run {trained.info.run_id}" in err
    assert "of experiment cardiology-notes (same inputs), copied into experiment renamed" in err
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [
        trained.info.run_id
    ]
    renamed = client.get_experiment_by_name("renamed")
    [copy] = client.search_runs([renamed.experiment_id])
    assert copy.info.status == "FINISHED"
    assert copy.data.tags[tracking.REUSED_FROM_TAG] == trained.info.run_id
    assert copy.data.tags[tracking.RUN_KEY_TAG] == trained.data.tags[tracking.RUN_KEY_TAG]
    assert copy.data.params == trained.data.params
    assert copy.data.metrics == trained.data.metrics

    def curve(run_id, key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    for key in ("loss", "epsilon"):  # whole curves, at their steps
        assert curve(copy.info.run_id, key) == curve(trained.info.run_id, key)
    note = copy.data.tags[tracking.NOTE_TAG]
    assert note.startswith(f"**A copy of run `{trained.info.run_id}`** (experiment `cardiology")
    assert note.endswith(trained.data.tags[tracking.NOTE_TAG])  # the run's own description
    info = read_json(root / "models/dpsgd/finetune.json")
    assert (info["run_id"], info["reused_from"]) == (copy.info.run_id, trained.info.run_id)
    artifacts = {f.path for f in client.list_artifacts(copy.info.run_id)}
    assert {"adapter", "ledger.json", "finetune.json", "finetune-dpsgd.png"} <= artifacts
    # this project's evaluation and registration go to its copy; the source stays as it was
    for stage in ("evaluate", "register"):
        assert main(["--root", str(root), "--no-progress", stage, "dpsgd"]) == 0
    [version] = client.search_model_versions("name = 'privtune-clinical-notes'")
    assert version.run_id == copy.info.run_id
    assert f"(a copy of run `{trained.info.run_id}`, which trained it)" in version.description
    assert "test_perplexity" in client.get_run(copy.info.run_id).data.metrics
    assert client.get_run(trained.info.run_id).data.metrics == trained.data.metrics
    # the adapter and ledger released once: the copy holds the same bytes
    for item in ("adapter/adapter_model.safetensors", "ledger.json"):
        copied = Path(client.download_artifacts(copy.info.run_id, item, str(tmp_path / "c")))
        original = Path(client.download_artifacts(trained.info.run_id, item, str(tmp_path / "o")))
        assert copied.read_bytes() == original.read_bytes()


def test_a_copied_run_leaves_behind_what_was_attached_after_its_source_ended(store):
    """Another project's evaluation, attached to its finished fine-tuning run, is that
    project's: a copy takes what the run logged while it ran, and runs as a run of its own. A
    copy of a copy names the run that trained, once; a lookup from a third experiment finds
    that run, not a copy; another experiment's failed attempts are not this one's to delete."""
    import mlflow

    with tracking.start_run("dpsgd", root=store, key="k", experiment="default") as run:
        run.log_params({"method": "dpsgd"})
        run.set_tags({"entry": "dpsgd", tracking.NOTE_TAG: "DP-SGD at ε 8."})
        for step in range(3):
            run.log_metrics({"loss": 3.0 - step}, step=step)
    tracking.attach_metrics(store, run.run_id, {"test_perplexity": 40.0}, 2)
    client = mlflow.MlflowClient()
    source = client.get_run(run.run_id)
    with tracking.copy_run(store, source, key="k", experiment="profile") as copy:
        pass
    copied = client.get_run(copy.run_id)
    assert copied.data.metrics == {"loss": 1.0} and copied.data.params == {"method": "dpsgd"}
    assert copied.data.tags["entry"] == "dpsgd"
    assert copied.data.tags[tracking.HEARTBEAT_TAG] != source.data.tags[tracking.HEARTBEAT_TAG]
    profile = client.get_experiment_by_name("profile").experiment_id
    assert copied.info.experiment_id == profile
    assert tracking.finished_run(store, "k", "profile").info.run_id == copy.run_id
    assert tracking.finished_run(store, "k", "default").info.run_id == run.run_id
    assert tracking.finished_run(store, "k", "elsewhere").info.run_id == run.run_id  # trained

    with tracking.copy_run(store, copied, key="k", experiment="third") as second:
        pass
    tags = client.get_run(second.run_id).data.tags
    assert tags[tracking.REUSED_FROM_TAG] == run.run_id  # the run that trained, not the copy
    note = tags[tracking.NOTE_TAG]
    assert note.startswith(f"**A copy of run `{run.run_id}`** (experiment `default`)")
    assert note.count("A copy of run") == 1 and note.endswith("DP-SGD at ε 8.")

    with pytest.raises(RuntimeError), tracking.start_run(root=store, key="k", experiment="default"):
        raise RuntimeError("an attempt of the default project")
    assert tracking.discard_unfinished(store, "k", experiment="profile") == 0
    assert tracking.discard_unfinished(store, "k", experiment="default") == 1


def test_promote_and_rollback_find_no_store_where_there_is_none_or_an_empty_file(
    tmp_path, monkeypatch
):
    """`tracking.require_store`: a sqlite file that is not there, or empty (MLflow would create
    or migrate it), holds nothing to judge; one that exists is found, with a query string."""
    from privtune.errors import ModelError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelError, match="--root: no MLflow store at"):
        tracking.require_store(tmp_path)
    (tmp_path / "mlflow.db").touch()
    with pytest.raises(ModelError, match="nothing is registered there"):
        tracking.require_store(tmp_path)
    assert (tmp_path / "mlflow.db").stat().st_size == 0  # not migrated
    other = tmp_path / "other.db"
    other.write_bytes(b"SQLite format 3\x00")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}?mode=ro")
    tracking.require_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/gone/mlflow.db")
    with pytest.raises(ModelError, match="MLFLOW_TRACKING_URI: no MLflow store"):
        tracking.require_store(tmp_path)
    assert not (tmp_path / "gone").exists()
