"""A retrain on changed data, promoted: the champion and the challenger are measured side by
side on the challenger's test records the champion neither trained nor validated on
(registry/paired.py), through a real sqlite registry and a real DVC cache."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from privtune import io
from privtune.cli import main
from privtune.config import Gates, load_params
from privtune.registry import CHAMPION, promote
from privtune.registry.paired import PAIRED_TAG, TrainingSet, read_paired
from privtune.registry.register import client
from privtune.stages.common import read_split
from tests.conftest import copy_project, edit_params, inside_project, left_unchanged

NAME = "paired-notes"
METHOD = "dpsgd"
# Attack results that pass their gates: this test is about the utility gate (tests of the
# attack stage are elsewhere), and only a version passing every other gate is measured.
SAFE_ATTACK = {
    "mia_auc_max": 0.52,
    "mia_auc_ci_low_max": 0.44,
    "mia_tpr_at_fpr_0.01_max": 0.01,
    "mia_tpr_at_fpr_0.01_ci_low_max": 0.0,
    "audit_epsilon_lower_bound": 0.0,
}


def _run(root, *stage: str) -> None:
    assert main(["--root", str(root), "--no-progress", *stage]) == 0, stage


def _train_and_register(root) -> str:
    _run(root, "finetune", METHOD)
    _run(root, "evaluate", METHOD)
    io.write_json(root / f"metrics/attack-{METHOD}.json", SAFE_ATTACK)
    _run(root, "register", METHOD)
    found = client(root).search_model_versions(f"name = '{NAME}'")
    return str(max(int(v.version) for v in found))


def _notes(root, *splits: str) -> set[str]:
    """The notes of these splits as generated, the canary lines the prepare stage planted in
    some of them (canaries.json names them) taken out again."""
    planted = [c["prefix"] for c in io.read_json(root / "data/prepared/canaries.json")["canaries"]]
    return {
        "\n".join(line for line in r["text"].splitlines() if not any(p in line for p in planted))
        for split in splits
        for r in read_split(root, split)
    }


@pytest.fixture(scope="module")
def _retrained_template(tiny_project, tmp_path_factory) -> Iterator[tuple[Path, frozenset[str]]]:
    """The `retrained` scenario built once per module (two trainings and registrations): a
    directory with the project and v1's adapter, and the notes v1 trained and validated on.
    Tests get a copy (`retrained`), never this."""
    from dvc.repo import Repo

    template = tmp_path_factory.mktemp("paired-retrained")
    root = template / "project"
    shutil.copytree(tiny_project, root)
    with inside_project(root):
        edit_params(root, evaluate={"max_records": 24}, registry={"name": NAME})
        Repo.init(str(root), no_scm=True)
        with Repo(str(root)) as repo:
            repo.add("data/prepared")
        assert _train_and_register(root) == "1"
        client(root).set_registered_model_alias(NAME, CHAMPION, "1")
        shutil.copytree(root / f"models/{METHOD}/adapter", template / "v1-adapter")
        seen = _notes(root, "train", "valid")
        edit_params(root, prepare={"n_private": 140})  # new notes arrived
        _run(root, "prepare")
        assert _train_and_register(root) == "2"
    with left_unchanged(template):
        yield template, frozenset(seen)


@pytest.fixture
def retrained(_retrained_template, tmp_path, monkeypatch) -> tuple[Path, set[str], Path]:
    """v1 trained and made champion; then 20 new notes arrive, the prepare stage reshuffles
    (part of the new test split was v1's training or validation data), and v2 is trained and
    registered on it. The first splits are in the DVC cache, where `dvc repro prepare` leaves
    them (`dvc add` caches alike). Each test gets its own copy of a project built once per
    module (`copy_project`: its store and artifacts point into the copy only)."""
    template, seen = _retrained_template
    copy_project(template, tmp_path)
    root = tmp_path / "project"
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    return root, set(seen), tmp_path / "v1-adapter"


def _utility(decision):
    return next(g for g in decision.gates if g.gate == "utility")


def _paired(root, version: str):
    return read_paired(dict(client(root).get_model_version(NAME, version).tags))


def test_a_retrained_challenger_is_compared_with_the_champion_on_records_it_never_saw(
    retrained, monkeypatch
):
    from peft import PeftModel

    from privtune.evaluate import evaluate_model
    from privtune.modeling import load_pretrained
    from privtune.registry import paired

    root, seen, v1_adapter = retrained
    params = load_params(root / "params.yaml")
    registry = client(root)
    v1, v2 = (dict(registry.get_model_version(NAME, v).tags) for v in ("1", "2"))
    assert v1["evaluated_on"] != v2["evaluated_on"]

    decision = promote(NAME, params.registry.gates, root=root, version="2")
    measured = _paired(root, "2")
    assert measured is not None and measured.error is None, measured
    test = read_split(root, "test")[: params.evaluate.max_records]
    unseen = [r for r in test if r["text"] not in seen]
    # v1 is scored only on notes it never trained or validated on: the reshuffle put some of
    # its notes in the new test split
    assert (measured.excluded, measured.records) == (len(test) - len(unseen), len(unseen))
    assert measured.excluded > 0 and unseen
    gate = _utility(decision)
    assert (gate.value, gate.threshold) == (measured.value, measured.champion_value)
    assert f"side by side on the {len(unseen)} test records" in gate.reason
    assert gate.passed is (measured.value <= measured.champion_value)

    # the champion's number is its own model on those records, not its registered one
    base, tokenizer = load_pretrained(root / "models/base")
    champion = PeftModel.from_pretrained(base, v1_adapter)
    metric = params.registry.gates.utility_metric
    again = evaluate_model(
        champion, tokenizer, unseen, 64, params.evaluate.batch_size, task=params.evaluate
    )[metric]
    assert math.isclose(measured.champion_value, again, rel_tol=1e-6)
    assert not math.isclose(measured.champion_value, float(v1[f"utility.{metric}"]))

    # a promotion judged again against the same champion reuses the measurement
    registry.set_registered_model_alias(NAME, CHAMPION, "1")

    def measured_twice(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(paired, "_measure", measured_twice)
    assert _utility(promote(NAME, params.registry.gates, root=root, version="2")) == gate
    assert _paired(root, "2") == measured


def test_the_champion_is_scored_once_for_a_runs_candidates(retrained, capsys):
    """`privtune promote` after a run: every new version is measured beside the champion on
    the same records, and the champion's score is computed once for all of them."""
    from privtune.registry import promote_best

    root, _, _ = retrained
    edit_params(root, finetune={"seed": 1})  # another fine-tuning on the same data
    assert _train_and_register(root) == "3"
    capsys.readouterr()
    selection = promote_best(NAME, load_params(root / "params.yaml").registry.gates, root=root)
    err = capsys.readouterr().err
    assert err.count("measuring champion v1 on") == 1
    assert err.count("measuring v2 on") == 1 and err.count("measuring v3 on") == 1
    assert selection.chosen in ("2", "3")
    # the one not chosen is then judged against the new champion, by the per-record scores
    # both were registered with (the same test data: nothing is measured under the lock)
    chosen, other = (
        _paired(root, selection.chosen),
        _paired(root, "3" if selection.chosen == "2" else "2"),
    )
    assert chosen.champion == "1" and chosen.measured and chosen.excluded > 0
    assert other.champion == selection.chosen and not other.measured
    assert (other.records, other.excluded) == (chosen.records + chosen.excluded, 0)
    registered = client(root).get_model_version(NAME, selection.chosen).tags
    assert other.champion_value == pytest.approx(float(registered["utility.test_perplexity"]))


def test_a_champion_whose_splits_are_gone_is_not_compared(retrained):
    """Without the champion's splits what it saw cannot be kept out: the gate stays not
    comparable and says how to get them back."""
    root, _, _ = retrained
    shutil.rmtree(root / ".dvc/cache")
    decision = promote(NAME, Gates(allow_reproducible_noise=True), root=root, version="2")
    measured = _paired(root, "2")
    assert measured is not None and measured.value is None
    assert "v1's train split" in measured.error and "dvc fetch --all-commits" in measured.error
    gate = _utility(decision)
    assert not gate.passed and gate.reason.startswith("not comparable")
    assert "comparing both on the same records failed" in gate.reason
    assert not decision.promoted


def test_a_library_error_while_measuring_refuses_without_its_message(retrained, monkeypatch):
    """A library's message may quote a record: the tag names the error's class only."""
    import privtune.evaluate

    root, _, _ = retrained

    def choke(*args, **kwargs):
        raise RuntimeError("tokenizer choked on 'Patient: Jane Roe | MRN 1234-5678'")

    monkeypatch.setattr(privtune.evaluate, "evaluate_scored", choke)
    decision = promote(NAME, Gates(allow_reproducible_noise=True), root=root, version="2")
    tag = dict(client(root).get_model_version(NAME, "2").tags)[PAIRED_TAG]
    assert "measuring failed: RuntimeError (message withheld" in tag and "Jane" not in tag
    assert not _utility(decision).passed and "Jane" not in _utility(decision).reason
    description = client(root).get_model_version(NAME, "2").description
    assert "Jane" not in description


def test_a_measurement_that_failed_is_judged_again_by_the_next_promotion(retrained, monkeypatch):
    """Measuring raised (out of memory, a store that did not answer): the version stays
    waiting, so the nightly `privtune promote` judges it again with the new versions; after
    three failures in a row it is refused for good, and `--version N` still tries."""
    import privtune.evaluate
    from privtune.registry import pending_versions, promote_best

    root, _, _ = retrained
    gates = Gates(allow_reproducible_noise=True)
    scored = privtune.evaluate.evaluate_scored

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    def tags() -> dict[str, str]:
        return dict(client(root).get_model_version(NAME, "2").tags)

    monkeypatch.setattr(privtune.evaluate, "evaluate_scored", out_of_memory)
    (decision,) = promote_best(NAME, gates, root=root).decisions
    assert decision.unmeasured and not decision.promoted
    assert "NOT MEASURED" in decision.summary() and "judges it again" in decision.summary()
    assert (tags()["promotion.decision"], tags()["promotion.attempts"]) == ("unjudged", "1")
    assert "2" in pending_versions(NAME, root=root)
    assert "NOT JUDGED YET (attempt 1 of 3" in client(root).get_model_version(NAME, "2").description
    assert "1 is not yet judged" in client(root).get_registered_model(NAME).description

    # the next run measures again, and the gate judges v2 on its merits
    monkeypatch.setattr(privtune.evaluate, "evaluate_scored", scored)
    (decision,) = promote_best(NAME, gates, root=root).decisions
    assert not decision.unmeasured and _paired(root, "2").error is None
    assert tags()["promotion.decision"] in ("promoted", "refused")
    assert "promotion.attempts" not in tags() and "2" not in pending_versions(NAME, root=root)

    # three failures in a row: refused, no longer waiting
    client(root).set_registered_model_alias(NAME, CHAMPION, "1")
    client(root).set_model_version_tag(NAME, "2", PAIRED_TAG, "{}")  # measure again
    monkeypatch.setattr(privtune.evaluate, "evaluate_scored", out_of_memory)
    for attempt in (1, 2, 3):
        decision = promote(NAME, gates, root=root, version="2")
        assert decision.unmeasured and tags()["promotion.attempts"] == str(attempt)
    assert tags()["promotion.decision"] == "refused"
    assert "2" not in pending_versions(NAME, root=root)
    assert "measuring failed 3 times" in client(root).get_model_version(NAME, "2").description


def test_a_champion_with_fewer_positions_than_the_new_records_is_not_compared(retrained):
    """A new base with a longer max_length: the old champion cannot read the new test records
    whole, so scoring it on them would be unfair (or fail)."""
    root, _, _ = retrained
    edit_params(root, base={"max_length": 96})
    _run(root, "base")
    version = _train_and_register(root)
    decision = promote(NAME, Gates(allow_reproducible_noise=True), root=root, version=version)
    measured = _paired(root, version)
    assert measured is not None and measured.value is None
    assert "champion v1 attends to 64 positions, fewer than the 96 tokens" in measured.error
    assert not _utility(decision).passed


def test_a_note_the_champion_trained_on_with_a_canary_planted_in_it_counts_as_seen():
    """The prepare stage plants canaries as an extra line of train records: the note in the
    new test split is then not the text the champion trained on, but it saw every line."""
    from privtune.data.canaries import insert_canaries, make_canaries

    notes = [
        {"text": f"Patient {i} admitted.\nPlan: rest.\nFollow-up in {i} weeks."} for i in range(6)
    ]
    canaries = make_canaries((1,), per_repetition=2, held_out=0, seed=0)
    planted = insert_canaries(notes, canaries, seed=0)
    changed = [p for p, n in zip(planted, notes, strict=True) if p["text"] != n["text"]]
    assert changed  # the planted copies differ from the notes
    seen = TrainingSet([r["text"] for r in planted])
    assert all(n["text"] in seen for n in notes)
    assert "Patient 1 admitted.\nPlan: tea." not in seen  # its first line alone is not enough
    assert "Patient 1 admitted." in seen and "" not in seen and None not in seen


@pytest.fixture(scope="module")
def _rerun_template(tiny_project, tmp_path_factory) -> Iterator[Path]:
    """The `rerun` scenario built once per module (two trainings and registrations): tests get
    a copy (`rerun`), never this."""
    template = tmp_path_factory.mktemp("paired-rerun")
    root = template / "project"
    shutil.copytree(tiny_project, root)
    with inside_project(root):
        edit_params(root, evaluate={"max_records": 24}, registry={"name": NAME})
        assert _train_and_register(root) == "1"
        client(root).set_registered_model_alias(NAME, CHAMPION, "1")
        edit_params(root, finetune={"seed": 3})
        assert _train_and_register(root) == "2"
    with left_unchanged(template):
        yield template


@pytest.fixture
def rerun(_rerun_template, tmp_path, monkeypatch) -> Path:
    """v1 trained and made champion, then v2 fine-tuned again on the same data (another
    seed): the two versions' registered evaluations are of the same test records. Each test
    gets its own copy of a project built once per module (`copy_project`)."""
    copy_project(_rerun_template, tmp_path)
    root = tmp_path / "project"
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


def _registered_scores(root, version: str) -> dict:
    from privtune.registry.paired import registered_scores
    from privtune.registry.register import tracking_uri

    mlflow_client = client(root)
    found = mlflow_client.get_model_version(NAME, version)
    return registered_scores(mlflow_client, found, tracking_uri(root))


def test_on_the_same_data_the_gate_reads_the_interval_of_the_registered_scores(rerun, capsys):
    """Unchanged data: nothing is measured again; the per-record scores each version was
    registered with are resampled in pairs and the gate decides on the interval's end."""
    from privtune.record_scores import from_json

    root = rerun
    gates = load_params(root / "params.yaml").registry.gates
    decision = promote(NAME, gates, root=root, version="2")
    assert "measuring" not in capsys.readouterr().err  # no model was loaded
    compared = _paired(root, "2")
    assert compared.error is None and not compared.measured
    test = len(read_split(root, "test"))
    assert (compared.records, compared.excluded, compared.confidence) == (test, 0, 0.95)
    assert compared.low <= compared.value - compared.champion_value <= compared.high
    for version, value in (("2", compared.value), ("1", compared.champion_value)):
        tags = client(root).get_model_version(NAME, version).tags
        scores = _registered_scores(root, version)
        assert scores["evaluated_on"] == tags["evaluated_on"]
        parts = from_json(scores["scores"])
        # the parts are those of the evaluation the version was registered with
        assert parts["test_perplexity"].value() == pytest.approx(
            float(tags["utility.test_perplexity"]), rel=1e-9
        )
        assert value == pytest.approx(float(tags["utility.test_perplexity"]), rel=1e-9)
        texts = [r["text"] for r in read_split(root, "test")]
        logged = json.dumps(scores)
        assert not any(line in logged for t in texts for line in t.splitlines() if len(line) > 8)
        accuracy = parts["medication_accuracy"]  # one 0/1 per note of the task
        assert accuracy.value() == pytest.approx(float(tags["utility.medication_accuracy"]))
    assert decision.promoted is (compared.high < 0)  # lower perplexity beyond the noise
    # the comparison as a figure in v2's logged model, for the reviewer
    v2 = client(root).get_model_version(NAME, "2")
    location = client(root).get_logged_model(str(v2.source).removeprefix("models:/"))
    figure = Path(location.artifact_location.removeprefix("file://"))
    figure = figure / "promotion/test_perplexity-vs-champion-v1.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    gate = _utility(decision)
    assert gate.margin == pytest.approx(-compared.high)
    assert (
        "95% interval" in gate.reason and f"over {test} records resampled in pairs" in gate.reason
    )


def _without_scores(root, version: str):
    """The version as registered before versions carried per-record scores (they are
    removed from its logged model's artifacts)."""
    mlflow_client = client(root)
    found = mlflow_client.get_model_version(NAME, version)
    model_id = str(found.source).removeprefix("models:/")
    location = mlflow_client.get_logged_model(model_id).artifact_location
    shutil.rmtree(location.removeprefix("file://") + "/evaluation")
    return found


def test_a_champion_registered_without_scores_is_measured_again(rerun, capsys):
    """A champion from before versions carried per-record scores: both are measured side by
    side on the test split (all of it: the champion's own test records) instead."""
    root = rerun
    champion = _without_scores(root, "1")
    assert _registered_scores(root, "1") == {}
    promote(NAME, load_params(root / "params.yaml").registry.gates, root=root, version="2")
    err = capsys.readouterr().err
    test = len(read_split(root, "test"))
    assert f"measuring champion v1 on {test} test records" in err
    compared = _paired(root, "2")
    assert compared.measured and (compared.records, compared.excluded) == (test, 0)
    assert compared.champion_value == pytest.approx(
        float(champion.tags["utility.test_perplexity"]), rel=1e-6
    )
    assert compared.low is not None and compared.low <= compared.high


def test_a_champion_that_moves_before_the_lock_is_compared_again_under_it(rerun):
    """Another promotion moved `champion` between the comparison (before the lock) and the
    decision: the candidate is compared again, against the champion of now, from the
    registered scores (nothing measured while the registry is held)."""
    from privtune.registry.promotion import _promote, pair_candidates

    root = rerun
    gates = load_params(root / "params.yaml").registry.gates
    pair_candidates(NAME, gates, root=root, version="2")
    assert _paired(root, "2").champion == "1"
    edit_params(root, finetune={"seed": 5})
    newer = _train_and_register(root)
    client(root).set_registered_model_alias(NAME, CHAMPION, newer)  # the other promotion
    decision = _promote(NAME, gates, root=root, version="2")
    assert decision.champion_before == newer
    compared = _paired(root, "2")
    assert compared.champion == newer and not compared.measured and compared.error is None
    assert f"vs champion v{newer}" in _utility(decision).reason
    assert "interval" in _utility(decision).reason


def test_scores_of_another_evaluation_are_not_registered(rerun):
    """Per-record scores are DVC-cached and git-ignored: left over from another evaluation
    they must not stand for this one (the gate would judge another model's numbers)."""
    root = rerun
    edit_params(root, finetune={"seed": 7})
    _run(root, "finetune", METHOD)
    _run(root, "evaluate", METHOD)
    path = root / f"metrics/record-scores-{METHOD}.json"
    left = io.read_json(path)
    parts = left["scores"]["test_perplexity"]
    parts["numerators"] = [n * 1.1 for n in parts["numerators"]]  # another model's losses
    io.write_json(path, left)
    io.write_json(root / f"metrics/attack-{METHOD}.json", SAFE_ATTACK)
    with pytest.warns(UserWarning, match="is not the per-record scores of"):
        _run(root, "register", METHOD)
    assert _registered_scores(root, "3") == {}
    assert _registered_scores(root, "2") != {}


def test_without_registered_scores_and_reevaluation_off_nothing_is_measured(rerun, capsys):
    root = rerun
    _without_scores(root, "1")
    gates = load_params(root / "params.yaml").registry.gates.model_copy(
        update={"reevaluate_champion": False}
    )
    decision = promote(NAME, gates, root=root, version="2")
    assert "measuring" not in capsys.readouterr().err
    assert "reevaluate_champion is off" in _paired(root, "2").error
    assert not decision.promoted and "reevaluate_champion is off" in _utility(decision).reason
