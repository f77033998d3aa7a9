"""A retrain on changed data, promoted: the champion and the challenger are measured side by
side on the challenger's test records the champion was not trained on (registry/paired.py),
through a real sqlite registry and a real DVC cache."""

from __future__ import annotations

import math
import shutil

import pytest

from privtune.cli import main
from privtune.config import Gates, load_params
from privtune.registry import CHAMPION, promote
from privtune.registry.paired import PAIRED_TAG, TrainingSet, read_paired
from privtune.registry.register import TRAIN_TAG, client
from privtune.stages.common import read_split
from tests.conftest import edit_params

NAME = "paired-notes"


def _run(root, *stage: str) -> None:
    assert main(["--root", str(root), "--no-progress", *stage]) == 0, stage


def _train_and_register(root) -> None:
    for stage in ("finetune", "evaluate", "register"):
        _run(root, stage, "nonprivate")


@pytest.fixture
def retrained(tiny_project, tmp_path, monkeypatch):
    """v1 trained and made champion; then 20 new notes arrive, the prepare stage reshuffles
    (part of the new test split was v1's training data), and v2 is trained and registered on
    it. The first split is in the DVC cache, where `dvc repro prepare` leaves it (`dvc add`
    caches alike)."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    edit_params(root, evaluate={"max_records": 24}, registry={"name": NAME})
    Repo.init(str(root), no_scm=True)
    with Repo(str(root)) as repo:
        repo.add("data/prepared")
    _train_and_register(root)
    client(root).set_registered_model_alias(NAME, CHAMPION, "1")
    shutil.copytree(root / "models/nonprivate/adapter", tmp_path / "v1-adapter")
    old_train = TrainingSet([r["text"] for r in read_split(root, "train")])
    edit_params(root, prepare={"n_private": 140})  # new notes arrived
    _run(root, "prepare")
    _train_and_register(root)
    return root, old_train, tmp_path / "v1-adapter"


def _utility(decision):
    return next(g for g in decision.gates if g.gate == "utility")


def test_a_retrained_challenger_is_compared_with_the_champion_on_records_neither_trained_on(
    retrained, monkeypatch
):
    from peft import PeftModel

    from privtune.evaluate import evaluate_model
    from privtune.modeling import load_pretrained
    from privtune.registry import paired

    root, old_train, v1_adapter = retrained
    params = load_params(root / "params.yaml")
    registry = client(root)
    v1, v2 = (dict(registry.get_model_version(NAME, v).tags) for v in ("1", "2"))
    assert v1["evaluated_on"] != v2["evaluated_on"] and v1[TRAIN_TAG] != v2[TRAIN_TAG]

    decision = promote(NAME, params.registry.gates, root=root, version="2")
    measured = read_paired(dict(registry.get_model_version(NAME, "2").tags))
    assert measured is not None and measured.error is None, measured
    test = read_split(root, "test")[: params.evaluate.max_records]
    seen = [r for r in test if r["text"] in old_train]
    unseen = [r for r in test if r["text"] not in old_train]
    # v1 is scored only where it never trained: the reshuffle put some of its notes in test
    assert (measured.excluded, measured.records) == (len(seen), len(unseen))
    assert seen and unseen
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

    # a retried promotion reuses the measurement
    def measured_twice(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(paired, "_measure", measured_twice)
    assert _utility(promote(NAME, params.registry.gates, root=root, version="2")) == gate


def test_a_champion_whose_train_split_is_gone_is_not_compared(retrained):
    """Without the champion's train split its training records cannot be kept out: the gate
    stays not comparable and says how to get the split back."""
    root, _, _ = retrained
    shutil.rmtree(root / ".dvc/cache")
    decision = promote(NAME, Gates(allow_reproducible_noise=True), root=root, version="2")
    measured = read_paired(dict(client(root).get_model_version(NAME, "2").tags))
    assert measured is not None and measured.value is None
    assert "dvc fetch --all-commits" in measured.error
    gate = _utility(decision)
    assert not gate.passed and gate.reason.startswith("not comparable")
    assert "measuring both side by side failed" in gate.reason
    assert PAIRED_TAG and not decision.promoted


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
    assert "Patient 9 admitted.\nPlan: rest." not in seen  # one line in common is not enough
    assert "Patient 1 admitted." in seen and "" not in seen and None not in seen  # type: ignore
