"""Registry against a real sqlite MLflow store: register, load and generate, gated promotion,
rollback, idempotent registration."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from privtune import io
from privtune.config import BaseParams, LoraParams
from privtune.errors import ModelError
from privtune.record_scores import RecordScores
from privtune.registry import (
    CHALLENGER,
    CHAMPION,
    Gates,
    evaluate_gates,
    promote,
    register,
    rollback,
    version_tags,
)
from privtune.registry.promotion import HISTORY_TAG, PREVIOUS, alias_version, nothing_to_promote
from privtune.registry.register import KEY_TAG, _logged_model, client
from tests.conftest import write_params

SAFE_ATTACK = {
    "mia_auc_max": 0.52,
    "mia_auc_ci_low_max": 0.44,
    "mia_tpr_at_fpr_0.01_max": 0.012,
    "mia_tpr_at_fpr_0.01_ci_low_max": 0.0,
    "mia_loss_auc": 0.52,
    "mia_loss_auc_ci_low": 0.44,
    "mia_loss_auc_ci_high": 0.6,
    "mia_loss_tpr_at_fpr_0.01": 0.012,
    "mia_members": 83,
    "mia_non_members": 83,
    "exposure_r4_mean": 1.1,
    "exposure_calibrated_r4_mean": 2.5,
    "audit_whitebox_m": 64,
    "audit_whitebox_guesses": 20,
    "audit_whitebox_correct": 12,
}
# Two noise levels over three steps (a budget-paced schedule), one clipping threshold.
LEDGER = [
    {"step": i, "sample_rate": 0.05, "noise_multiplier": z, "clip_thresholds": [1.0]}
    | {"noise_stds": [z], "batch_size": 25, "mechanism": "gaussian"}
    for i, z in enumerate([1.1, 1.1, 0.9])
]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_tokenizer):
    """A project laid out like the real one (base model, data card, dvc.lock) with its own
    sqlite store; entries are added per test with `add_entry`."""
    from privtune.modeling import build_gpt2

    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)  # MLflow's default artifact root (./mlruns) lands here, not in the repo
        params = BaseParams(n_layer=1, n_head=2, n_embd=32, max_length=64)
        tok = tiny_tokenizer
        model = build_gpt2(params, len(tok), tok.bos_token_id, tok.eos_token_id)
        model.save_pretrained(root / "models/base")
        tok.save_pretrained(root / "models/base")
        io.write_json(root / "data/prepared/data_card.json", {"content_sha256": "c0ffee"})
        yield root


def add_entry(
    root,
    entry: str,
    *,
    perplexity: float | None = 50.0,
    attack: dict | None = None,
    epsilon: float | None = 4.0,
    audit: float | None = 0.5,
    seed: int = 0,
    secret_noise: bool | None = True,
) -> str:
    """Save an adapter, finetune.json (with a real run id) and metrics files for `entry`."""
    from privtune import tracking
    from privtune.modeling import attach_lora, load_pretrained

    model, _ = load_pretrained(root / "models/base")
    attach_lora(model, LoraParams(r=2), seed=seed).save_pretrained(root / f"models/{entry}/adapter")
    with tracking.start_run(run_name=entry, root=root) as run:
        run_id = run.run_id
        run.log_metrics({"loss": 3.0}, step=29)  # the last step of the 30 below
    metrics: dict = {"method": "dpsgd", "private": epsilon is not None, "steps": 30}
    metrics["sample_rate"] = 0.05
    if epsilon is not None:
        metrics |= {"epsilon": epsilon, "target_epsilon": 4.0, "delta": 1e-5, "accountant": "prv"}
        metrics |= {"epsilon_rdp": epsilon * 1.2, "mechanism": "gaussian"}
        io.write_json(root / f"models/{entry}/ledger.json", {"version": 1, "entries": LEDGER})
    plan = {"n_records": 500, "steps": 30}
    info = {"entry": entry, "method": "dpsgd", "run_id": run_id, "metrics": metrics, "plan": plan}
    if secret_noise is not None:  # None: a model trained before finetune.secret_noise existed
        info["finetune"] = {"secret_noise": secret_noise}
    io.write_json(root / f"models/{entry}/finetune.json", info)
    attack = dict(SAFE_ATTACK if attack is None else attack)
    if audit is not None:
        attack["audit_epsilon_lower_bound"] = audit
    io.write_json(root / f"metrics/attack-{entry}.json", attack)
    evaluation = {"method": "dpsgd", "medication_accuracy": 0.3, "evaluated_on": "test-split-1"}
    if perplexity is not None:
        evaluation["test_perplexity"] = perplexity
        # 20 records alike: the paired interval is the difference itself
        parts = RecordScores((math.log(perplexity) * 10,) * 20, (10.0,) * 20, exponentiate=True)
        scores = {"evaluated_on": "test-split-1", "scores": {"test_perplexity": parts.to_dict()}}
        io.write_json(root / f"metrics/record-scores-{entry}.json", scores)
    io.write_json(root / f"metrics/evaluate-{entry}.json", evaluation)
    return run_id


def test_registered_model_loads_and_generates_with_one_call(project, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    # absent while the model loads (it sets it), as it was after the test
    monkeypatch.setenv("MLFLOW_DISABLE_SCHEMA_DETAILS", "unset")
    monkeypatch.delenv("MLFLOW_DISABLE_SCHEMA_DETAILS")
    add_entry(project, "gen")
    version = register("gen", "clinical-gen", project)
    assert version.created and version.version == "1"
    loaded = mlflow.pyfunc.load_model(f"models:/clinical-gen@{CHALLENGER}")
    out = loaded.predict(["Patient"], params={"max_new_tokens": 5})
    assert len(out) == 1 and isinstance(out[0], str) and out[0]
    frame = loaded.predict(pd.DataFrame({"prompt": ["patient presents", "plan"]}))
    assert len(frame) == 2
    # a frame MLflow's schema check refuses (its first column is not text): the error does
    # not quote the input, which may be a patient's note
    with pytest.raises(MlflowException) as err:
        loaded.predict(pd.DataFrame({"patient_id": [101], "prompt": ["secret history"]}))
    assert "secret history" not in str(err.value) and "101" not in str(err.value)
    assert len(loaded.predict([""], params={"max_new_tokens": 3})) == 1  # starts a record
    with pytest.raises(ValueError, match="max_new_tokens"):
        loaded.predict(["Patient"], params={"max_new_tokens": 64})
    # Greedy decoding is deterministic (whatever the seed); seeded sampling is reproducible.
    greedy = {"max_new_tokens": 8}
    first = loaded.predict(["fever"], params=greedy)
    assert loaded.predict(["fever"], params=greedy) == first
    assert loaded.predict(["fever"], params=greedy | {"seed": 99}) == first
    sampled = {"do_sample": True, "seed": 3, "max_new_tokens": 8}
    assert loaded.predict(["fever"], params=sampled) == loaded.predict(["fever"], params=sampled)


def _card(project, name: str, version: str) -> tuple[dict, str]:
    """The version's model card: JSON at the root of its logged model, and its markdown."""
    mv = client(project).get_model_version(name, version)
    location = client(project).get_logged_model(mv.source.removeprefix("models:/"))
    root = Path(location.artifact_location.removeprefix("file://"))
    return json.loads((root / "model_card.json").read_text()), (root / "model_card.md").read_text()


def test_version_has_headline_tags_a_verdict_and_a_model_card(project):
    import mlflow

    run_id = add_entry(project, "tagged", perplexity=42.0, seed=1)
    lock = {
        "stages": {
            "finetune@tagged": {
                "deps": [
                    {"path": "data/prepared", "md5": "aa.dir"},
                    {"path": "models/base", "md5": "cc.dir"},
                ],
                "outs": [{"path": "models/tagged", "md5": "bb.dir"}],
            }
        }
    }
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    groups = {"column": "patient", "max_records_per_group": 2, "train_records_per_group_max": 2}
    data_card = project / "data/prepared/data_card.json"
    io.write_json(data_card, io.read_json(data_card) | {"groups": groups})
    mlflow_client = client(project)
    end_before = mlflow_client.get_run(run_id).info.end_time
    try:
        version = register("tagged", "clinical-tags", project, confidence=0.95)
    finally:
        (project / "dvc.lock").unlink()
    mv = mlflow_client.get_model_version("clinical-tags", version.version)
    tags = mv.tags
    # About a dozen headline tags: the gates' inputs, the contract, data and code.
    assert len(tags) <= 17, sorted(tags)
    assert float(tags["epsilon"]) == 4.0 and float(tags["delta"]) == 1e-5
    assert tags["accountant"] == "prv" and tags["method"] == "dpsgd"
    assert float(tags["attack.mia_auc_max"]) == 0.52
    assert float(tags["utility.test_perplexity"]) == 42.0
    assert tags["data_sha256"] == "c0ffee" and "git_commit" in tags
    assert tags["secret_noise"] == "true"
    assert tags[KEY_TAG].startswith(run_id) and mv.run_id == run_id
    assert not any(k.startswith("gate.") or k.startswith("dvc.") for k in tags)

    # The description opens with the one-line verdict, counts included.
    first, rest = mv.description.split("\n", 1)
    assert first.startswith("tagged (dpsgd) · ε 4.0000 / 4 (PRV) · δ 1e-05")
    assert "test perplexity 42" in first and "MIA AUC 0.52" in first
    assert "83 members vs 83 non-members" in first and "audit ε ≥ 0.500" in first
    assert "not yet judged" in first and "Privacy model card" in rest
    # one click from the version's page to the artifacts that hold model_card.md
    model_id = mv.source.removeprefix("models:/")
    experiment_id = mlflow_client.get_logged_model(model_id).experiment_id
    assert f"(#/experiments/{experiment_id}/models/{model_id}/artifacts)" in rest

    # The card: on the version's model, inside the pyfunc, and equal to the stages' files.
    card, text = _card(project, "clinical-tags", version.version)
    metrics = io.read_json(project / "metrics/attack-tagged.json")
    assert card["contract"]["epsilon"] == 4.0 and card["contract"]["accountant"] == "prv"
    assert card["contract"]["epsilon_rdp_looser_bound"] == pytest.approx(4.8)
    assert card["data"] == card["data"] | {"content_sha256": "c0ffee", "training_records": 500}
    assert card["ledger"]["steps"] == 3 and card["ledger"]["noise_segments"] == 2
    assert card["ledger"]["noise_multiplier"] == {"first": 1.1, "last": 0.9, "min": 0.9, "max": 1.1}
    membership = card["attacks"]["membership"]
    assert (membership["members"], membership["non_members"]) == (83, 83)
    assert membership["scores"]["loss"]["auc_ci_low"] == metrics["mia_loss_auc_ci_low"]
    assert card["audit"]["epsilon_lower_bound"] == metrics["audit_epsilon_lower_bound"]
    assert card["audit"]["whitebox"] == {"m": 64, "guesses": 20, "correct": 12}
    assert card["audit"]["confidence"] == 0.95
    assert card["utility"]["test_perplexity"] == 42.0
    assert card["model"]["dvc.outs_md5"] == "bb.dir" and len(card["model"]["dvc.deps_md5"]) == 32
    assert card["model"]["finetune_run_id"] == run_id
    # which base, by the md5 DVC locked for the stage: the one training read
    assert card["model"]["dvc.base_md5"] == "cc.dir" and "- dvc.base_md5: `cc.dir`" in text
    assert card["model"]["base_source"] == "unrecorded"  # this base has no privtune.json
    assert card["contract"]["secret_noise"] is True
    assert "Sampler and noise seeded from OS entropy, kept secret." in text
    # a corpus with a patient column: what its patient with the most training records gets
    per_group = card["contract"]["per_group"]
    assert per_group["max_training_records_of_one_group"] == 2 and per_group["epsilon"] == 8.0
    assert per_group["delta"] == pytest.approx(2 * math.exp(4.0) * 1e-5)
    assert "the most training records of one patient is 2; group privacy gives that" in text
    assert {g["gate"] for g in card["gates"]["at_registration"]} == {
        "epsilon",
        "delta",
        "noise",
        "mia_auc",
        "mia_tpr_at_fpr_0.01",
        "audit",
    }
    assert "## Membership inference" in text and "| loss | 0.52 | [0.44, 0.6] |" in text
    assert card["attacks"]["canaries"]["exposure_bits"]["r4"] == {
        "mean": 1.1,
        "calibrated_mean": 2.5,
    }
    assert "| r4 | 1.1 | – | 2.5 | – |" in text
    loaded = mlflow.pyfunc.load_model(f"models:/clinical-tags/{version.version}")
    assert loaded.unwrap_python_model().model_card == card

    # Results joined the run without reopening it, at its last step, and the logged model.
    run = mlflow_client.get_run(run_id)
    assert run.info.end_time == end_before
    history = mlflow_client.get_metric_history(run_id, "test_perplexity")
    assert [(m.step, m.value) for m in history] == [(29, 42.0)]
    assert run.data.metrics["attack.mia_auc_max"] == 0.52
    logged = mlflow_client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.name == "tagged"  # the version's "Source model" in MLflow's UI: the method
    on_model = {m.key: m.value for m in logged.metrics}
    assert on_model["test_perplexity"] == 42.0 and on_model["loss"] == 3.0
    assert len(mlflow_client.get_metric_history(run_id, "loss")) == 1  # copied, not duplicated
    # the logged model knows its version (MLflow's UI: "Registered", not a Register button)
    linked = json.loads(logged.tags["mlflow.modelVersions"])
    assert linked == [{"name": "clinical-tags", "version": str(version.version)}]


def test_the_logged_model_shows_each_metric_once_with_its_last_value(project):
    """A run may log a metric twice at its last step (a curve's last point, then the final
    figure): the model shows it once, the later value."""
    import time

    run_id = add_entry(project, "twice-logged", seed=16)
    time.sleep(0.01)
    client(project).log_metric(run_id, "loss", 2.5, step=29)
    version = register("twice-logged", "clinical-once", project)
    mv = client(project).get_model_version("clinical-once", version.version)
    logged = client(project).get_logged_model(mv.source.removeprefix("models:/"))
    losses = [m.value for m in logged.metrics if m.key == "loss"]
    assert losses == [2.5]


def test_the_card_says_when_training_never_saw_most_canaries(project):
    """Canaries past base.max_length were never trained on: exposure near the floor then says
    nothing about memorisation, and the card must say so, not only the attack stage's log."""
    short = {"canary_occurrences_planted": 42.0, "canary_occurrences_trained": 13.0}
    add_entry(project, "clipped", attack={**SAFE_ATTACK, **short}, seed=14)
    version = register("clipped", "clinical-clipped", project)
    card, text = _card(project, "clinical-clipped", version.version)
    canaries = card["attacks"]["canaries"]
    assert (canaries["occurrences_planted"], canaries["occurrences_trained"]) == (42.0, 13.0)
    assert "Training saw only 13 of the 42 planted canary occurrences" in text
    add_entry(project, "whole", attack={**SAFE_ATTACK, **short, "canary_occurrences_trained": 42.0},
              seed=15)  # fmt: skip
    _, whole = _card(
        project, "clinical-clipped", register("whole", "clinical-clipped", project).version
    )
    assert "Training saw only" not in whole


def test_registering_twice_reuses_the_version(project, tmp_path):
    add_entry(project, "twice", seed=2)
    first = register("twice", "clinical-twice", project)
    second = register("twice", "clinical-twice", project)
    assert (first.version, first.created) == ("1", True)
    assert (second.version, second.created) == ("1", False)
    # a version registered before its logged model was linked is linked by the next attempt
    mlflow_client = client(project)
    source = mlflow_client.get_model_version("clinical-twice", "1").source.removeprefix("models:/")
    mlflow_client.delete_logged_model_tag(source, "mlflow.modelVersions")
    register("twice", "clinical-twice", project)
    linked = mlflow_client.get_logged_model(source).tags["mlflow.modelVersions"]
    assert json.loads(linked) == [{"name": "clinical-twice", "version": "1"}]
    mlflow_client.delete_logged_model(source)  # gone since: a warning, not a failed nightly run
    with pytest.warns(UserWarning, match="is gone"):
        assert register("twice", "clinical-twice", project).version == "1"
    assert len(client(project).search_model_versions("name = 'clinical-twice'")) == 1
    # A retry after a crash between logging and registering reuses the logged pyfunc.
    add_entry(project, "retry", seed=10)
    key = version_tags(project, "retry")[KEY_TAG]
    card = tmp_path / "card"
    card.mkdir()
    (card / "model_card.json").write_text("{}")
    uri, _ = _logged_model(project, "retry", key.split(":")[0], key, card, 29)
    retried = register("retry", "clinical-twice", project)
    assert client(project).get_model_version("clinical-twice", retried.version).source == uri
    # New evidence for the same adapter (another attack result) is a new version: its card
    # ships inside the model and cannot change.
    attack = io.read_json(project / "metrics/attack-twice.json")
    io.write_json(project / "metrics/attack-twice.json", attack | {"mia_auc_max": 0.53})
    assert register("twice", "clinical-twice", project).version == "3"
    # A new adapter in the same run is a new model: a new version.
    add_entry(project, "twice", seed=3)
    assert register("twice", "clinical-twice", project).version == "4"


def _server_lost_once(monkeypatch, method: str) -> None:
    """The tracking server goes away during the next call of `MlflowClient.<method>`."""
    from mlflow.tracking import MlflowClient

    real = getattr(MlflowClient, method)
    failures = [ConnectionError("the tracking server went away")]

    def flaky(self, *args, **kwargs):
        if failures:
            raise failures.pop()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, flaky)


def test_a_registration_cut_short_is_finished_by_its_retry(project, monkeypatch):
    """The version was created, then the connection went before its description and the
    `challenger` alias: the retry finds the version by its key and finishes it, instead of
    leaving `challenger` on an older version for the promotion flow to judge again."""
    name = "clinical-cut"
    add_entry(project, "cut-old", seed=12)
    add_entry(project, "cut-new", seed=13)
    register("cut-old", name, project)
    _server_lost_once(monkeypatch, "update_model_version")
    with pytest.raises(ConnectionError):
        register("cut-new", name, project)
    mlflow_client = client(project)
    assert str(mlflow_client.get_model_version_by_alias(name, CHALLENGER).version) == "1"
    retried = register("cut-new", name, project)
    assert (retried.version, retried.created) == ("2", False)
    assert str(mlflow_client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    assert "not yet judged" in mlflow_client.get_model_version(name, "2").description
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == 2
    source = mlflow_client.get_model_version(name, "2").source.removeprefix("models:/")
    linked = mlflow_client.get_logged_model(source).tags["mlflow.modelVersions"]
    assert json.loads(linked) == [{"name": name, "version": "2"}]  # linked once, by either try


def test_model_from_another_store_is_a_clear_error(project):
    add_entry(project, "stray", seed=11)
    info = io.read_json(project / "models/stray/finetune.json")
    io.write_json(project / "models/stray/finetune.json", info | {"run_id": "0" * 32})
    with pytest.raises(ModelError, match="finetune.json.*not in the MLflow store"):
        register("stray", "clinical-stray", project)
    assert not client(project).search_registered_models("name = 'clinical-stray'")


def test_promotion_gates_history_and_rollback(project):
    name = "clinical-promote"
    mlflow_client = client(project)
    add_entry(project, "first", perplexity=50.0, seed=4)
    register("first", name, project)
    model = mlflow_client.get_registered_model(name)
    assert model.description.startswith("**No champion.** 1 version registered; 1 not yet")
    assert model.tags["champion"] == "none"
    decision = promote(name, root=project)
    assert decision.promoted and decision.champion_before is None
    utility = next(g for g in decision.gates if g.gate == "utility")
    assert utility.passed and "no champion yet" in utility.reason
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == "1"

    add_entry(project, "worse", perplexity=60.0, seed=5)
    register("worse", name, project)
    refused = promote(name, root=project)
    assert not refused.promoted
    assert [g.gate for g in refused.failed] == ["utility"]
    assert refused.failed[0].margin == pytest.approx(-10.0)
    assert "-10" in refused.summary() and "REFUSED" in refused.summary()
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    tags = mlflow_client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "refused" and tags["promotion.failed"] == "utility"
    assert "60 vs champion v1 50" in tags["promotion.reason"]
    # Judged again: the description is rebuilt, never appended to.
    assert not promote(name, root=project, version="2").promoted
    description = mlflow_client.get_model_version(name, "2").description
    first = description.splitlines()[0]
    assert first.startswith("worse (dpsgd)") and "REFUSED: utility: " in first
    assert description.count("**Promotion gates**, judged") == 1
    assert description.count("[Open the model's artifacts](#/experiments/") == 1
    assert description.count("REFUSED") == 1
    assert "| utility | **FAIL** | 60 | 50 | -10 |" in description
    assert (
        len(mlflow_client.get_model_version(name, "2").tags) <= 22
    )  # headline, verdict and the paired comparison
    model = mlflow_client.get_registered_model(name)
    assert model.description.startswith("**Champion: v1 (dpsgd)**")
    assert "all 7 gates hold" in model.description and model.tags["champion"] == "v1"

    add_entry(project, "better", perplexity=40.0, seed=6)
    register("better", name, project)
    assert promote(name, root=project).promoted
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert str(mlflow_client.get_model_version_by_alias(name, PREVIOUS).version) == "1"
    assert json.loads(mlflow_client.get_registered_model(name).tags[HISTORY_TAG]) == ["1", "3"]
    with pytest.raises(ModelError, match="no challenger"):
        promote(name, root=project)
    # every version judged, the challenger promoted: `privtune promote` reports it, no error
    idle = nothing_to_promote(name, root=project)
    assert idle.startswith("nothing new to judge: all 3 versions") and "champion v3" in idle
    assert nothing_to_promote("clinical-nobody", root=project) is None  # nothing registered

    back = rollback(name, root=project)
    assert (back.from_version, back.to_version) == ("3", "1") and back.warning is None
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert mlflow_client.get_registered_model(name).tags["champion"] == "v1"
    # v3's page no longer opens with its promotion: it says it was rolled back, once
    demoted = mlflow_client.get_model_version(name, "3").description
    assert demoted.startswith("**ROLLED BACK**") and "given back to v1" in demoted
    assert "PROMOTED to champion" in demoted  # the gates' record of the promotion stays
    with pytest.raises(ModelError, match=r"no previous champion.*no champion came before v1"):
        rollback(name, root=project)
    with pytest.raises(ModelError, match="no such registered model"):
        rollback("clinical-nobody", root=project)


def test_a_champion_set_by_hand_is_described_as_set_by_hand(project):
    """An alias set in MLflow's UI names no gate's reason: the registered model says it was set
    by hand (even over a version the gates refused) and how to have it judged."""
    name = "clinical-by-hand"
    mlflow_client = client(project)
    add_entry(project, "byhand", perplexity=50.0, seed=7)
    register("byhand", name, project)
    add_entry(project, "byhand-worse", perplexity=60.0, seed=8)
    register("byhand-worse", name, project)
    assert promote(name, root=project, version="1").promoted
    assert not promote(name, root=project, version="2").promoted
    mlflow_client.set_registered_model_alias(name, CHAMPION, "2")  # a reviewer overrides them
    add_entry(project, "byhand-third", perplexity=55.0, seed=9)
    register("byhand-third", name, project)  # any registry write describes the model again
    model = mlflow_client.get_registered_model(name)
    head = model.description.splitlines()[0]
    assert head.startswith("**Champion: v2 (dpsgd)**, set by hand, not judged by the gates")
    assert "`privtune promote --version 2` judges it" in head and "60 vs" not in head
    assert "1 is not yet judged" in head  # v3 (v2 is champion, however it got there)
    assert model.tags["champion.why"] == "v2: set by hand, not judged by the gates"


def test_a_promotion_cut_short_is_judged_again_and_enters_the_history_once(project, monkeypatch):
    """A lost connection between the registry writes of a promotion (Prefect then retries):
    the version must not be left "promoted" without being champion, nor enter the champion
    history twice (a later rollback would "restore" it to itself)."""
    name = "clinical-retried"
    add_entry(project, "retried", perplexity=50.0, seed=11)
    register("retried", name, project)
    _server_lost_once(monkeypatch, "set_registered_model_alias")
    with pytest.raises(ConnectionError):
        promote(name, root=project)
    mlflow_client = client(project)
    assert "promotion.decision" not in mlflow_client.get_model_version(name, "1").tags
    assert alias_version(mlflow_client, name, CHAMPION) is None

    assert promote(name, root=project).promoted  # the retry
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert json.loads(mlflow_client.get_registered_model(name).tags[HISTORY_TAG]) == ["1"]
    assert mlflow_client.get_model_version(name, "1").tags["promotion.decision"] == "promoted"


def test_a_promotion_cut_short_after_the_alias_moved_is_finished_by_the_rerun(project, monkeypatch):
    """Cut short after `champion` moved, before the version's page was rewritten: the page
    was left as registered (and, cut before its verdict tags, the model's page said "set by
    hand"), and `privtune promote` found nothing to judge or "already the champion". The
    rerun finishes it, on a real store."""
    from privtune.registry import promote_best
    from privtune.registry.promotion import PROMOTING_TAG, stopped_promotion

    name = "clinical-stopped"
    add_entry(project, "stopped", perplexity=50.0, seed=13)
    register("stopped", name, project)
    _server_lost_once(monkeypatch, "update_model_version")  # _record's, after the aliases
    with pytest.raises(ConnectionError):
        promote(name, root=project)
    mlflow_client = client(project)
    assert str(alias_version(mlflow_client, name, CHAMPION).version) == "1"
    described = mlflow_client.get_model_version(name, "1").description
    assert "PROMOTED to champion" not in described  # its page still as registered
    assert stopped_promotion(name, root=project) == "1"
    assert nothing_to_promote(name, root=project) is None  # there is something to finish

    selection = promote_best(name, root=project)  # what `privtune promote` runs
    assert selection.chosen == "1" and selection.decisions[0].finished_late
    assert "stopped before the registry showed it" in selection.why
    version = mlflow_client.get_model_version(name, "1")
    assert version.tags["promotion.decision"] == "promoted"
    assert "PROMOTED to champion" in version.description
    model = mlflow_client.get_registered_model(name)
    assert PROMOTING_TAG not in model.tags and json.loads(model.tags[HISTORY_TAG]) == ["1"]
    assert model.description.startswith("**Champion: v1") and "promoted 20" in model.description
    assert nothing_to_promote(name, root=project) is not None  # and nothing is left to do


def test_a_stopped_promotion_fits_a_tag_with_its_reasons_shortened() -> None:
    """PostgreSQL holds a registered model's tag in 5000 characters: a decision with long
    reasons is kept with them shortened, and reads back, with the history before it."""
    from privtune.registry.promotion import (
        MAX_MODEL_TAG,
        Decision,
        GateResult,
        _promoting,
        _read_promoting,
    )

    gates = tuple(GateResult(f"g{i}", True, 1.0, 2.0, 1.0, "why " * 400) for i in range(8))
    decision = Decision("m", "3", True, "2", gates)
    text = _promoting(decision, ["1", "2"])
    assert len(text) <= MAX_MODEL_TAG
    back, history = _read_promoting(text)
    assert back.version == "3" and back.champion_before == "2" and len(back.gates) == 8
    assert all(g.reason and "why" in g.reason for g in back.gates) and history == ["1", "2"]
    short = replace(decision, gates=(replace(gates[0], reason="short"),))
    assert _read_promoting(_promoting(short, [])) == (short, [])  # whole when it fits
    newer = json.loads(_promoting(short, []))
    newer["decision"]["added_later"] = 1  # a newer privtune's field: left out, not a crash
    assert _read_promoting(json.dumps(newer)) == (short, [])
    assert _read_promoting("{not json") is None


def test_promote_best_chooses_the_most_useful_eligible_new_version(project, capsys):
    """After a pipeline run every method is a new version: the champion goes to the best one
    that passes every gate (not to the last registered), the others are judged and refused,
    and the champion history gains one entry."""
    from privtune.cli import main
    from privtune.registry import promote_best

    name = "clinical-best"
    mlflow_client = client(project)
    leaky = {**SAFE_ATTACK, "mia_auc_max": 0.9, "mia_auc_ci_low_max": 0.8}
    add_entry(project, "leaky", perplexity=20.0, attack=leaky)
    add_entry(project, "good", perplexity=45.0, seed=7)
    add_entry(project, "best", perplexity=41.0, seed=8)
    add_entry(project, "last", perplexity=49.0, seed=9)  # the `challenger` alias ends here
    for entry in ("leaky", "good", "best", "last"):
        register(entry, name, project)
    assert str(mlflow_client.get_model_version_by_alias(name, CHALLENGER).version) == "4"

    selection = promote_best(name, root=project)
    assert selection.chosen == "3" and "lowest test_perplexity (41)" in selection.why
    assert "3 eligible candidate(s) out of 4" in selection.why  # leaky fails mia_auc
    assert str(mlflow_client.get_model_version_by_alias(name, CHAMPION).version) == "3"
    assert json.loads(mlflow_client.get_registered_model(name).tags[HISTORY_TAG]) == ["3"]
    decisions = {d.version: d for d in selection.decisions}
    assert [g.gate for g in decisions["1"].failed] == ["mia_auc"]
    for other in ("2", "4"):  # eligible but worse: refused against the new champion
        assert not decisions[other].promoted
        assert "vs champion v3 41" in decisions[other].reason()
        tags = mlflow_client.get_model_version(name, other).tags
        assert tags["promotion.decision"] == "refused"
    # nothing new left: `privtune promote` falls back to the challenger, judged vs v3: refused
    write_params(project / "params.yaml", registry={"name": name})
    code = main(["--root", str(project), "promote"])
    out = capsys.readouterr().out
    assert code == 1 and "v4" in out and "nothing promoted" in out
    assert code == main(["--root", str(project), "promote", "--json", "--version", "4"])
    decision = json.loads(capsys.readouterr().out)
    assert decision["promoted"] is False and "utility" in decision["failed"]


def test_promote_best_compares_utility_only_on_the_newest_test_data(project):
    """Versions of an older run never judged, beside those of a retrain on changed data: a
    lower perplexity on the old test split is no evidence against the new ones, so the choice
    is among the newest data's versions, and the old one is refused against the new champion."""
    from privtune.registry import promote_best

    name = "clinical-newest"
    for entry, perplexity, on, seed in (("old", 20.0, "a", 1), ("new", 30.0, "b", 2)):
        add_entry(project, entry, perplexity=perplexity, seed=seed)
        evaluation = project / f"metrics/evaluate-{entry}.json"
        io.write_json(evaluation, io.read_json(evaluation) | {"evaluated_on": on})
        register(entry, name, project)
    selection = promote_best(name, root=project, params=None)
    assert selection.chosen == "2" and "(30) of the 2 eligible candidate(s)" in selection.why
    assert "among the 1 measured on the newest test data (evaluated_on b;" in selection.why
    refused = next(d for d in selection.decisions if d.version == "1")
    assert not refused.promoted and [g.gate for g in refused.failed] == ["utility"]
    assert "not comparable" in refused.reason()


def test_gates_table_marks_each_failed_gate(project):
    from privtune.registry import Decision
    from privtune.registry.promotion import GateResult, gates_table

    decision = Decision(
        "m",
        "7",
        False,
        None,
        (GateResult("epsilon", False, 9.5, 8.0, -1.5, "9.5 > 8"),)
        + tuple(GateResult(g, True, 0.1, 1.0, 0.9, "ok") for g in ("delta", "audit"))
        + (GateResult("noise", False, None, None, None, "seeded", "seeded"),),
    )
    table = gates_table([decision], {"7": "dpsgd"})
    header, row = table.splitlines()
    assert header.split()[4] == "noise" and row.split()[4] == "seeded!"
    assert header.split()[:3] == ["version", "method", "epsilon"]
    assert row.split()[:3] == ["v7", "dpsgd", "9.500!"] and row.split()[-1] == "refused"
    # above the gate within sampling noise: passes, marked `~` and explained under the table
    noisy = GateResult("mia_auc", True, 0.62, 0.6, 0.05, "within noise", "inconclusive")
    table = gates_table([Decision("m", "8", True, None, (noisy,))], {"8": "lmo"})
    header, row, note = table.splitlines()
    assert row.index("0.6200~ ") == header.index("mia_auc ")  # in its gate's column
    assert note.startswith("(`~`: inconclusive")


def test_missing_metrics_and_broken_contracts_fail_their_gates(project):
    name = "clinical-refuse"
    add_entry(project, "noattack", attack={}, audit=None, perplexity=None, seed=7)
    register("noattack", name, project)
    decision = promote(name, root=project)
    assert not decision.promoted
    failed = {g.gate: g for g in decision.failed}
    assert set(failed) == {"mia_auc", "mia_tpr_at_fpr_0.01", "audit", "utility"}
    assert all("missing" in g.reason for g in failed.values())

    add_entry(
        project,
        "leaky",
        attack={"mia_auc_max": 0.9, "mia_auc_ci_low_max": 0.8, "mia_tpr_at_fpr_0.01_max": 0.3},
        audit=6.0,
        epsilon=4.0,
        seed=8,
    )
    register("leaky", name, project)
    failed = {g.gate: g for g in promote(name, root=project).failed}
    assert failed["mia_auc"].margin == pytest.approx(-0.2)  # on the lower bound, 0.8
    assert failed["mia_tpr_at_fpr_0.01"].evidence == "insufficient evidence"  # no bound
    assert failed["audit"].margin == pytest.approx(-2.0)  # audit bound above the claimed 4.0


def test_noise_seeded_from_the_published_seed_is_refused_unless_allowed(project):
    """A run with finetune.secret_noise: false (or from before it existed) can be replayed by
    anyone with the params: the card says so and the noise gate refuses it by default."""
    name = "clinical-seeded"
    add_entry(project, "seeded", seed=10, secret_noise=False)
    version = register("seeded", name, project)
    assert client(project).get_model_version(name, version.version).tags["secret_noise"] == "false"
    card, text = _card(project, name, version.version)
    assert card["contract"]["secret_noise"] is False
    assert "**Sampler and noise seeded from `finetune.seed`**" in text
    refused = promote(name, root=project)
    assert [g.gate for g in refused.failed] == ["noise"]
    assert "retrain with finetune.secret_noise: true" in refused.failed[0].reason
    allowed = promote(name, Gates(allow_reproducible_noise=True), root=project)
    assert allowed.promoted

    add_entry(project, "older", seed=11, secret_noise=None)  # no tag: seeded as all were
    older = register("older", name, project)
    assert "secret_noise" not in client(project).get_model_version(name, older.version).tags
    failed = promote(name, root=project, version=older.version).failed
    assert [g.gate for g in failed] == ["noise"] and "no secret_noise tag" in failed[0].reason

    assert promote(name, Gates(allow_reproducible_noise=True), root=project).promoted
    back = rollback(name, root=project)  # the way back judges no gate, but says what it gives
    assert back.to_version == version.version and "finetune.secret_noise: true" in back.warning


def test_non_private_model_has_infinite_epsilon_and_is_refused(project):
    add_entry(project, "open", epsilon=None, seed=9)
    tags = version_tags(project, "open")
    assert math.isinf(float(tags["epsilon"])) and "delta" not in tags
    assert "secret_noise" not in tags  # finetune.secret_noise was on, but no noise was drawn
    version = register("open", "clinical-open", project)
    card, _ = _card(project, "clinical-open", version.version)
    assert card["contract"]["private"] is False and card["contract"]["epsilon"] is None
    assert card["contract"]["secret_noise"] is None
    assert card["ledger"] is None
    decision = promote("clinical-open", root=project)
    assert {"epsilon", "delta"} <= {g.gate for g in decision.failed}
    delta = next(g for g in decision.failed if g.gate == "delta")
    assert delta.reason.startswith("not private") and "missing" not in delta.reason
    mv = client(project).get_model_version("clinical-open", version.version)
    assert "ε ∞ (not private)" in mv.description.splitlines()[0]
    model = client(project).get_registered_model("clinical-open")
    assert model.description.startswith("**No champion.** 1 version registered; 1 refused")
    assert "epsilon: inf > 8" in model.description


@given(
    epsilon=st.floats(0, 20),
    auc=st.floats(0, 1),
    auc_low=st.floats(0, 1),
    tpr=st.floats(0, 1),
    tpr_low=st.floats(0, 1),
    audit=st.floats(0, 20),
    challenger=st.floats(1, 1000),
    champion=st.floats(1, 1000),
)
def test_promoted_exactly_when_every_margin_is_non_negative(
    epsilon, auc, auc_low, tpr, tpr_low, audit, challenger, champion
):
    auc_low, tpr_low = min(auc_low, auc), min(tpr_low, tpr)  # lower confidence bounds

    class Champion:
        version = "1"
        tags = {"utility.test_perplexity": repr(champion)}

    tags = {
        "epsilon": repr(epsilon),
        "delta": "1e-05",
        "secret_noise": "true",
        "attack.mia_auc_max": repr(auc),
        "attack.mia_auc_ci_low_max": repr(auc_low),
        "attack.mia_tpr_at_fpr_0.01_max": repr(tpr),
        "attack.mia_tpr_at_fpr_0.01_ci_low_max": repr(tpr_low),
        "attack.audit_epsilon_lower_bound": repr(audit),
        "utility.test_perplexity": repr(challenger),
    }
    gates = Gates(utility_confidence=None)  # the two numbers: no per-record scores here
    results = evaluate_gates(gates, tags, Champion())
    for g in results:  # the noise gate has no margin: it reads whether the seeds were secret
        assert g.passed == (g.margin >= 0) if g.gate != "noise" else g.passed
    expected = (
        epsilon <= gates.max_epsilon
        and auc_low <= gates.max_mia_auc  # attack gates decide on the lower bound
        and tpr_low <= gates.max_mia_tpr_at_fpr_0_01
        and audit <= epsilon
        and challenger <= champion
    )
    assert all(g.passed for g in results) == expected


def test_a_registry_write_is_retried_after_a_concurrent_workers_unique_key_clash(monkeypatch):
    """Two workers registering at once on a PostgreSQL-backed server can both insert the same
    new tag or alias; the loser's UniqueViolation is retried (the row then exists, so the retry
    updates it). Any other error, or a clash that persists, is raised."""
    from mlflow.exceptions import MlflowException

    register_module = importlib.import_module("privtune.registry.register")  # not the function

    monkeypatch.setattr(register_module.time, "sleep", lambda _: None)
    calls = []

    def clashing_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException('duplicate key value violates unique constraint "tag_pk"')

    register_module.retry_unique(clashing_once)
    assert len(calls) == 2

    def failing(message: str) -> None:
        calls.append(1)
        raise MlflowException(message)

    for message, tries in [("violates unique constraint", 3), ("RESOURCE_DOES_NOT_EXIST", 1)]:
        calls.clear()
        with pytest.raises(MlflowException, match=message):
            register_module.retry_unique(lambda m=message: failing(m), attempts=3)
        assert len(calls) == tries
