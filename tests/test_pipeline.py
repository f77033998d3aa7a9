"""The default pipeline end to end on tiny parameters, in real temporary git+DVC repos:
`dvc repro` builds everything, a second repro does nothing, a method's parameter reruns only
its own stages, MLflow holds every run, no raw record leaks, and the Prefect flow runs the
same stages."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_params
from tests.leaks import find_leaks, private_probes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# A delta small against the 2 m delta term of the one-run audit (the tiny data's default
# delta, about 1/(10 N), would swamp it) and enough gradient canaries for the non-private
# model's audit to reach a clearly positive bound.
PIPELINE = {"finetune": {"delta": 1e-5, "audit_canaries": 128}}


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
    write_params(project / "params.yaml", **PIPELINE)
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
        "attack@nonprivate",
        "attack@dpsgd",
        "register",
        "report",
    ]:
        assert f"Running stage '{stage}'" in log
    for path in [
        "data/prepared/train.jsonl",
        "data/prepared/canaries.json",
        "data/prepared/data_card.json",
        "models/base/config.json",
        "models/dpsgd/adapter/adapter_config.json",
        "models/dpsgd/ledger.json",
        "models/dpsgd/audit.json",
        "plots/finetune-dpsgd.png",
        "plots/roc-dpsgd.png",
        "data/prepared/audit_canaries.json",
        "reports/report.md",
        "reports/utility_vs_attack.png",
        "reports/registered.json",
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
    for name in ["nonprivate", "dpsgd"]:
        attacked = shown[f"metrics/attack-{name}.json"]["data"]
        assert 0 <= attacked["mia_loss_auc"] <= 1 and "exposure_r4_mean" in attacked
        assert attacked["audit_blackbox_m"] == 16
        assert attacked["audit_whitebox_m"] == 128
    attacked = shown["metrics/attack-dpsgd.json"]["data"]
    assert attacked["audit_epsilon_lower_bound"] <= attacked["claimed_epsilon"] <= 4.0
    # the non-private model's released gradients give its gradient canaries away
    assert shown["metrics/attack-nonprivate.json"]["data"]["audit_whitebox_epsilon_lower_bound"] > 1
    registered = json.loads((project / "reports/registered.json").read_text())
    assert {registered[n]["version"] for n in ["nonprivate", "dpsgd"]} == {1, 2}
    # both measured on the same records, tokenizer and task: their utility is comparable, and
    # each registered version says so
    import mlflow

    on = {shown[f"metrics/evaluate-{n}.json"]["data"]["evaluated_on"] for n in registered}
    store = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db")
    versions = store.search_model_versions("name='privtune-clinical-notes'")
    assert len(on) == 1 and {v.tags["evaluated_on"] for v in versions} == on


def test_registered_pipeline_model_generates_and_goes_through_the_gates(built):
    """The pipeline's own dpsgd model: loads from the registry with one call and generates;
    `privtune promote` judges it (exit 0 promoted, 1 refused) and `rollback` needs a history."""
    project, _ = built
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    name = "privtune-clinical-notes"
    registered = json.loads((project / "reports/registered.json").read_text())
    version, nonprivate = (registered[n]["version"] for n in ["dpsgd", "nonprivate"])
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    generated = loaded.predict(["Discharge summary"], params={"max_new_tokens": 8})
    assert len(generated) == 1 and isinstance(generated[0], str)

    def cli(*args):
        cmd = [str(Path(sys.executable).parent / "privtune"), *args]
        return subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True)

    refused = cli("promote", "--version", str(nonprivate))  # epsilon is infinite
    assert refused.returncode == 1 and "inf!" in refused.stdout, refused.stdout
    assert re.search(rf"^v{nonprivate}\s+nonprivate\s", refused.stdout, re.M)  # its method
    judged = cli("promote", "--json", "--version", str(version))
    decision = json.loads(judged.stdout)
    assert judged.returncode == (0 if decision["promoted"] else 1)
    assert judged.returncode == 0 or decision["failed"], judged.stderr
    tags = mlflow.MlflowClient().get_model_version(name, str(version)).tags
    assert tags["promotion.decision"] == ("promoted" if decision["promoted"] else "refused")
    no_history = cli("rollback")
    assert no_history.returncode == 2 and "no previous champion" in no_history.stderr
    if decision["promoted"]:  # every version judged, the challenger promoted: an outcome
        again = cli("promote", "--json")
        assert again.returncode == 1 and not again.stderr, again.stderr
        idle = json.loads(again.stdout)
        assert idle["chosen"] is None and f"champion v{version}" in idle["why"]
        assert "nothing new to judge" in cli("promote").stdout

    # A reader that stops reading (`| head`) is not a bug: no traceback, the shell's 141.
    cmd = [str(Path(sys.executable).parent / "privtune"), "summary"]
    piped = subprocess.Popen(
        cmd, cwd=project, env=_env(project), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    piped.stdout.close()  # closed before the command writes: its first write fails
    assert piped.wait(timeout=120) == 141
    assert b"Traceback" not in piped.stderr.read()


def test_second_repro_does_nothing_and_params_rerun_only_dependents(built, tmp_path):
    project, _ = built
    log = _sh(project, "dvc", "repro")
    assert "Running stage" not in log
    write_params(
        project / "params.yaml", **PIPELINE, methods={"nonprivate": {}, "dpsgd": {"clip": 0.5}}
    )
    status = _sh(project, "dvc", "status", "--json")
    assert set(json.loads(status)) == {
        "finetune@dpsgd",
        "evaluate@dpsgd",
        "attack@dpsgd",
        "register",
        "report",
    }
    write_params(project / "params.yaml", **PIPELINE)  # restore


def test_mlflow_tracks_runs_without_raw_records(built):
    project, _ = built
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["privtune"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    dpsgd = by_name["dpsgd"]
    assert dpsgd.data.params["method"] == "dpsgd"
    assert float(dpsgd.data.params["noise_multiplier"]) > 0
    assert dpsgd.data.params["private"] == "True" and "delta" in dpsgd.data.params
    nonprivate = by_name["nonprivate"].data.params  # no delta or noise to show in the UI
    assert nonprivate["private"] == "False" and not {"delta", "noise_multiplier"} & set(nonprivate)
    assert len(dpsgd.data.params["data_sha256"]) == 64
    assert {"epsilon", "loss", "test_perplexity", "medication_accuracy"} <= set(dpsgd.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(dpsgd.info.run_id, "epsilon")
    assert len(history) > 2 and history[-1].value <= 4.0
    artifacts = Path(dpsgd.info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "ledger.json").is_file() and (artifacts / "adapter").is_dir()
    assert any(p.suffix == ".png" for p in artifacts.iterdir())

    # No private text anywhere it publishes: every canary (planted, held out, audit) and 100
    # records' identifying lines, searched in the whole MLflow store (params, tags, registry
    # versions and their tags and descriptions, every text artifact), reports, metrics, plots
    # and the repro log.
    project, log = built
    probes = private_probes(project, records=100)
    assert len(probes) > 100
    leaked = find_leaks(project, probes, logs=(log,))
    assert not leaked, f"{len(leaked)} private strings published (canaries or record lines)"


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


def _ui(project: Path):
    """scripts/mlflow_screenshots.py's `mlflow ui` over the project's store (its REST API and
    the UI's own routes, read as a browser would)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mlflow_screenshots", ROOT / "scripts" / "mlflow_screenshots.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Ui(project, project / "mlflow-server.log")


VERDICT = re.compile(r"^\w+ \(\w+\) · ε .* · δ .* · MIA AUC .* · (audit|no audit)")


def test_reviewer_reads_the_store_through_the_rest_api(built):
    """After the pipeline and promoting every version twice: epsilon charts monotone in step,
    one verdict line and one gate report per version, a dozen headline tags, the model card on
    each version consistent with metrics/, runs as long as their training, the experiment typed
    for training with its headline view, and the registered model naming its champion."""
    project, _ = built
    registered = json.loads((project / "reports/registered.json").read_text())
    for _ in range(2):
        for entry in ["nonprivate", "dpsgd"]:
            judged = subprocess.run(
                [str(Path(sys.executable).parent / "privtune"), "promote", "--version"]
                + [str(registered[entry]["version"])],
                cwd=project,
                env=_env(project),
                capture_output=True,
                text=True,
            )
            expected = {1} if entry == "nonprivate" else {0, 1, 2}  # 2: already the champion
            assert judged.returncode in expected, judged.stderr
    server = _ui(project)
    try:
        experiment = server.get(
            "api/2.0/mlflow/experiments/get-by-name", experiment_name="privtune"
        )["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert "mlflow.sharedViewState.privtune-headline" in tags
        assert tags["mlflow.note.content"].startswith("**privtune")
        runs = server.post(
            "api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment["experiment_id"]], "filter": "tags.stage = 'finetune'"},
        )["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(by_name) == {"nonprivate", "dpsgd"}
        dpsgd = by_name["dpsgd"]
        history = server.get(
            "api/2.0/mlflow/metrics/get-history",
            run_id=dpsgd["info"]["run_id"],
            metric_key="epsilon",
        )["metrics"]
        ordered = sorted(history, key=lambda m: (int(m["step"]), int(m["timestamp"])))
        values = [m["value"] for m in ordered]
        assert len(values) > 2 and values == sorted(values), values
        steps = json.loads((project / "metrics/finetune-dpsgd.json").read_text())["steps"]
        assert int(ordered[-1]["step"]) == steps - 1
        run_notes = {t["key"]: t["value"] for t in dpsgd["data"]["tags"]}["mlflow.note.content"]
        assert "`epsilon_rdp_looser_bound`" in run_notes

        name = "privtune-clinical-notes"
        versions = server.get("api/2.0/mlflow/model-versions/search", filter=f"name='{name}'")[
            "model_versions"
        ]
        assert len(versions) == 2
        for version in versions:
            number = int(version["version"])
            entry = next(e for e, r in registered.items() if r["version"] == number)
            lines = version["description"].splitlines()
            assert VERDICT.match(lines[0]) and lines[0].startswith(f"{entry} ("), lines[0]
            assert sum(1 for line in lines if VERDICT.match(line)) == 1
            assert version["description"].count("**Promotion gates**, judged") == 1
            assert len(version.get("tags", [])) <= 23  # README: 17 + 6 after a promotion
            # Runs were not reopened: training ended before its version was created.
            run = next(r for r in runs if r["info"]["run_id"] == version["run_id"])
            assert int(run["info"]["end_time"]) <= int(version["creation_timestamp"])

            card = server.get(
                "model-versions/get-artifact",
                path="model_card.json",
                name=name,
                version=version["version"],
            )
            inside = server.get(
                "model-versions/get-artifact",
                path="artifacts/model_card/model_card.json",
                name=name,
                version=version["version"],
            )
            assert card == inside
            metrics = {
                stage: json.loads((project / f"metrics/{stage}-{entry}.json").read_text())
                for stage in ("finetune", "evaluate", "attack")
            }
            contract = card["contract"]
            assert contract["epsilon"] == metrics["finetune"].get("epsilon")
            assert contract["delta"] == metrics["finetune"].get("delta")
            assert card["utility"]["test_perplexity"] == metrics["evaluate"]["test_perplexity"]
            membership = card["attacks"]["membership"]
            assert membership["best_auc"] == metrics["attack"]["mia_auc_max"]
            assert membership["members"] == metrics["attack"]["mia_members"]
            for score, found in membership["scores"].items():
                assert found["auc_ci_low"] == metrics["attack"][f"mia_{score}_auc_ci_low"]
            audit = card["audit"]
            assert audit["epsilon_lower_bound"] == metrics["attack"]["audit_epsilon_lower_bound"]
            assert audit["whitebox"]["m"] == metrics["attack"]["audit_whitebox_m"]
            assert f"{membership['members']} members" in lines[0]

        model = server.get("api/2.0/mlflow/registered-models/get", name=name)["registered_model"]
        model_tags = {t["key"]: t["value"] for t in model["tags"]}
        champion = {a["alias"]: a["version"] for a in model.get("aliases", [])}.get("champion")
        if champion is None:
            assert model["description"].startswith("**No champion.**")
            assert model_tags["champion"] == "none"
        else:
            assert model["description"].startswith(f"**Champion: v{champion} (dpsgd)**")
            assert model_tags["champion"] == f"v{champion}"
    finally:
        server.stop()
