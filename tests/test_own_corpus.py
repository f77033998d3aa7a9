"""A hospital's own notes end to end: an `id,text` CSV written here (not by our generator) with
a declared cloze task, from `prepare` to the report, one method, stages called in-process
through the CLI; then the same CSV as a DVC dependency, and promotion decisions that two attack
seeds on the same model agree on."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_params

ROOT = Path(__file__).resolve().parents[1]

# SOAP notes of a made-up clinic: the drug in the plan follows from the assessment.
CONDITIONS = [
    ("community-acquired pneumonia", "J18.9", "productive cough and fever", "amoxicillin"),
    ("type 2 diabetes", "E11.9", "thirst and tiredness", "metformin"),
    ("essential hypertension", "I10", "headaches, raised readings at home", "amlodipine"),
    ("asthma exacerbation", "J45.901", "wheeze at night", "prednisolone"),
    ("urinary tract infection", "N39.0", "dysuria and frequency", "nitrofurantoin"),
    ("atrial fibrillation", "I48.91", "palpitations", "apixaban"),
]
CLOZE = r"P: start (\w+)"


def write_notes(path: Path, n: int, seed: int = 7) -> Path:
    """n SOAP notes in the RLDP code's input format (`id,text`), as a user would bring them."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for i in range(n):
            name, code, complaint, drug = rng.choice(CONDITIONS)
            age, days = rng.randint(19, 90), rng.randint(2, 14)
            text = (
                f"S: {age}-year-old with {complaint} for {days} days.\n"
                f"O: T {rng.uniform(36.4, 38.9):.1f}, HR {rng.randint(58, 118)}, "
                f"BP {rng.randint(105, 170)}/{rng.randint(60, 100)}.\n"
                f"A: {name} (ICD-10 {code}).\n"
                f"P: start {drug}; review in {rng.choice([1, 2, 4])} weeks."
            )
            writer.writerow([f"N{i:05d}", text])
    return path


USER = {
    "prepare": {
        "source": "notes.csv",
        "id_column": "id",
        "canaries": {"repetitions": [1, 4], "per_repetition": 1, "held_out": 2, "audit": 16},
    },
    "evaluate": {"task": "cloze", "cloze": {"pattern": CLOZE, "candidates": 6}},
    "methods": {"nonprivate": {}},
}


def _main(project: Path, *argv: str) -> int:
    from privtune.cli import main

    params = str(project / "params.yaml")
    return main(["--params", params, "--root", str(project), "--no-progress", *argv])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = tmp_path_factory.mktemp("own-corpus")
    write_notes(project / "notes.csv", 90)
    write_params(project / "params.yaml", **USER)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the project's own store
    try:
        for stage in (
            ["prepare"],
            ["base"],
            ["finetune", "nonprivate"],
            ["evaluate", "nonprivate"],
            ["attack", "nonprivate"],
            ["report"],
        ):
            assert _main(project, *stage) == 0, stage
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return project


@pytest.mark.slow
def test_own_csv_from_prepare_to_report_with_downstream_accuracy(built):
    card = json.loads((built / "data/prepared/data_card.json").read_text())
    assert card["source"] == "notes.csv" and card["counts"]["attack"] == 10
    evaluated = json.loads((built / "metrics/evaluate-nonprivate.json").read_text())
    assert evaluated["downstream_task"] == "cloze"
    assert 0 <= evaluated["downstream_accuracy"] <= 1 and evaluated["cloze_candidates"] == 6
    assert evaluated["downstream_chance"] == pytest.approx(evaluated["cloze_coverage"] / 6)
    base = json.loads((built / "metrics/base.json").read_text())
    assert base["downstream_task"] == "cloze"  # the base model's figure, for comparison
    attacked = json.loads((built / "metrics/attack-nonprivate.json").read_text())
    assert attacked["mia_members"] == attacked["mia_non_members"] == 10
    # 10 non-members cannot resolve a 1 % (or 0.1 %) FPR: null, with the reason
    assert attacked["mia_tpr_at_fpr_0.01_max"] is None
    assert "at least 100 non-members" in attacked["mia_tpr_at_fpr_0.01_unresolved"]
    report = (built / "reports/report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| nonprivate |"))
    assert f"{evaluated['downstream_accuracy']:.3f} (" in row and "| 10 / 10 |" in row
    # no record of the corpus in any metric or report
    texts = [r["text"] for r in csv.DictReader((built / "notes.csv").open())]
    written = "".join(
        p.read_text()
        for p in [*built.glob("metrics/*.json"), *built.glob("reports/*")]
        if p.is_file() and p.suffix in {".json", ".md"}
    )
    assert not [t for t in texts if t.splitlines()[0] in written]


@pytest.mark.slow
def test_two_attack_seeds_on_the_same_model_give_the_same_promotion_decision(built, tmp_path):
    """Another seed draws other members: the AUC moves. A gate on the point estimate placed
    between the two values would split them; the gate on the lower bound does not."""
    from privtune.config import Gates
    from privtune.registry.promotion import evaluate_gates
    from privtune.registry.register import version_tags

    results = {}
    for seed in (0, 1):
        write_params(built / "params.yaml", **USER, attack={"seed": seed})
        assert _main(built, "attack", "nonprivate") == 0
        results[seed] = version_tags(built, "nonprivate")
    write_params(built / "params.yaml", **USER)
    aucs = [float(results[s]["attack.mia_auc_max"]) for s in (0, 1)]
    assert aucs[0] != aucs[1]
    threshold = sum(aucs) / 2
    # the threshold anywhere in [0, 1] (Gates itself asks >= 0.5 of a real policy)
    gates = Gates.model_construct(**{**Gates().model_dump(), "max_mia_auc": threshold})
    decided = {s: {g.gate: g for g in evaluate_gates(gates, results[s], None)} for s in (0, 1)}
    assert [aucs[s] <= threshold for s in (0, 1)] in ([True, False], [False, True])
    assert decided[0]["mia_auc"].passed == decided[1]["mia_auc"].passed
    assert [g.passed for g in decided[0].values()] == [g.passed for g in decided[1].values()]


def _sh(project: Path, *cmd: str) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_editing_one_byte_of_the_corpus_makes_dvc_rerun_prepare(tmp_path):
    """The corpus is a dependency of `prepare` (dvc.yaml: ${prepare.source}): cutting or
    editing it can no longer leave models trained on data that is gone."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_notes(project / "notes.csv", 60)
    write_params(project / "params.yaml", **USER)
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.check_update", "false"],
    ):
        _sh(project, *cmd)
    _sh(project, "dvc", "repro", "--single-item", "prepare")
    assert "prepare" not in json.loads(_sh(project, "dvc", "status", "--json", "prepare"))
    notes = project / "notes.csv"
    data = bytearray(notes.read_bytes())
    data[-3] = ord("X") if data[-3] != ord("X") else ord("Y")
    notes.write_bytes(bytes(data))
    status = json.loads(_sh(project, "dvc", "status", "--json", "prepare"))
    changed = [c for entry in status["prepare"] for c in entry.get("changed deps", {})]
    assert "notes.csv" in changed, status


def test_copied_forward_notes_are_kept_once_so_no_copy_crosses_the_splits(tmp_path, capsys):
    """A corpus where notes were copied forward (the same text under new ids): each text is
    kept once, so a trained note can never also be an attack non-member or a test note."""
    notes = write_notes(tmp_path / "original.csv", 90)
    rows = list(csv.reader(notes.open(newline="")))
    header, body = rows[0], rows[1:]
    copies = [[f"C{i:05d}", text] for i, (_, text) in enumerate(body[:30])]
    with (tmp_path / "notes.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *body, *copies])
    write_params(tmp_path / "params.yaml", **USER)
    from tasks.stages import check_before

    check_before(str(tmp_path), "prepare")  # a scheduler's check: the stage says it, once
    assert "repeat an earlier record" not in capsys.readouterr().err
    assert _main(tmp_path, "prepare") == 0
    assert "30 record(s) repeat an earlier record's text" in capsys.readouterr().err
    prepared = tmp_path / "data" / "prepared"
    card = json.loads((prepared / "data_card.json").read_text())
    assert card["duplicates_removed"] == 30
    texts: dict[str, set[str]] = {}
    for split in ("train", "valid", "test", "attack"):
        for line in (prepared / f"{split}.jsonl").read_text().splitlines():
            texts.setdefault(json.loads(line)["text"], set()).add(split)
    assert all(len(splits) == 1 for splits in texts.values())


def test_a_small_corpus_is_warned_that_the_audits_canaries_crowd_its_batches(tmp_path, capsys):
    """The black-box audit adds its own records to the train split (about half of
    prepare.canaries.audit): in a small corpus they would be much of every batch."""
    from privtune.config import load_params
    from privtune.stages.prepare import build

    write_notes(tmp_path / "notes.csv", 90)
    for audit, warned in ((16, False), (64, True)):
        canaries = USER["prepare"]["canaries"] | {"audit": audit}
        write_params(
            tmp_path / "params.yaml", **USER | {"prepare": USER["prepare"] | {"canaries": canaries}}
        )
        build(load_params(tmp_path / "params.yaml"), tmp_path)
        err = capsys.readouterr().err
        assert ("warning: prepare: the black-box audit's text canaries are" in err) is warned
        assert ("lower prepare.canaries.audit" in err) is warned
