"""A user's own corpus, unit by unit: columns, the corpus as a DVC dependency, the attack
split, the cloze task, honest attack statistics, delta against its gate, canary identifiers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from privtune.attacks.roc import resolvable, roc_summary, tpr_lower_bound
from privtune.attacks.run import summarize
from privtune.config import GENERATOR_SOURCE, ClozeParams, Gates, Params, parse_params
from privtune.data.canaries import make_canaries
from privtune.data.loaders import load_records
from privtune.downstream import check_task, cloze_accuracy, cloze_candidates, cloze_items
from privtune.errors import ConfigError, DataError
from privtune.privacy.plan import default_delta, make_plan
from privtune.registry.promotion import INSUFFICIENT, evaluate_gates, gates_table

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Jane Roe of 12 Elm Street"


# --- columns -------------------------------------------------------------------------------


def test_text_and_id_columns_are_configurable_in_every_format(tmp_path):
    csv = tmp_path / "notes.csv"
    csv.write_text("note_id,body,extra\nn1,first note,x\nn2,second note,y\n")
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text(
        '{"note_id": "n1", "body": "first note"}\n{"note_id": "n2", "body": "second note"}\n'
    )
    for source in (csv, jsonl):
        rows = load_records(source, text_column="body", id_column="note_id")
        assert rows == [{"text": "first note", "id": "n1"}, {"text": "second note", "id": "n2"}]


def test_a_missing_column_names_it_and_the_columns_present_without_any_record(tmp_path):
    csv = tmp_path / "notes.csv"
    csv.write_text(f"id,body\n1,{SECRET}\n")
    with pytest.raises(DataError) as err:
        load_records(csv, text_column="note")
    message = str(err.value)
    # a CSV's header cells are counted, not shown: without a header row they are a record
    assert "no `note` column in the header row (2 columns" in message
    assert "prepare.text_column" in message and SECRET not in message
    with pytest.raises(DataError, match=r"no `mrn` column.*prepare\.id_column"):
        load_records(csv, text_column="body", id_column="mrn")
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text(json.dumps({"id": "1", "body": SECRET}) + "\n")
    with pytest.raises(DataError, match="record 1 has no `text` column") as err:
        load_records(jsonl)
    assert "['body', 'id']" in str(err.value)  # JSON keys are names, never a record's text
    assert SECRET not in str(err.value)


def test_json_keyed_by_patient_id_is_refused_without_showing_the_ids(tmp_path):
    """A .json object keyed by MRN (pandas' `to_json(orient="index")`, one line: read as one
    JSONL record) has ids for keys: the error counts them and says what layout is wanted."""
    keyed = tmp_path / "notes.json"
    keyed.write_text(json.dumps({"MRN-40417": {"text": SECRET}, "MRN-40418": {"text": "b"}}))
    with pytest.raises(DataError, match=r"no `text` column \(2 keys; not shown") as err:
        load_records(keyed)
    message = str(err.value)
    assert "40417" not in message and SECRET not in message
    assert "not an object keyed by patient or note id" in message
    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps({f"c{i}": "x" for i in range(21)}) + "\n")
    with pytest.raises(DataError, match=r"21 keys; not shown"):
        load_records(wide)


def test_repeated_ids_are_refused_without_showing_the_id(tmp_path):
    csv = tmp_path / "notes.csv"
    csv.write_text("id,text\nMRN-77,a\nMRN-77,b\n")
    with pytest.raises(DataError, match="record 2 repeats an id") as err:
        load_records(csv, id_column="id")
    assert "MRN-77" not in str(err.value)


# --- the corpus as a DVC dependency ----------------------------------------------------------


def test_the_default_source_is_the_generator_module_a_real_file():
    assert Params().prepare.source == GENERATOR_SOURCE
    assert (ROOT / GENERATOR_SOURCE).is_file()


def test_the_bare_word_generator_is_refused_naming_its_new_spelling():
    with pytest.raises(ConfigError, match=r"prepare\.source.*src/privtune/data/generator\.py"):
        parse_params({"prepare": {"source": "generator"}})


def test_dvc_yaml_makes_the_source_a_dependency_of_prepare():
    import yaml

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    assert "${prepare.source}" in stage["deps"] and "attack.members" in stage["params"]


# --- the attack split ------------------------------------------------------------------------


def _csv(path: Path, n: int) -> Path:
    path.write_text("id,text\n" + "".join(f"{i},note {i} says something\n" for i in range(n)))
    return path


def _prepare_params(source: Path, members: int) -> Params:
    return parse_params(
        {
            "prepare": {
                "source": str(source),
                "id_column": "id",
                "canaries": {"repetitions": [1], "per_repetition": 1, "held_out": 1, "audit": 0},
            },
            "attack": {"members": members},
        }
    )


def test_prepare_holds_out_an_attack_split_of_attack_members(tmp_path):
    from privtune.stages.prepare import prepare

    card = prepare(_prepare_params(_csv(tmp_path / "notes.csv", 60), 12), tmp_path)
    assert card["counts"]["attack"] == 12
    assert card["counts"]["valid"] == card["counts"]["test"] == 5  # 10 % of the other 48
    prepared = tmp_path / "data/prepared"
    ids = {
        split: {json.loads(r)["id"] for r in (prepared / f"{split}.jsonl").read_text().splitlines()}
        for split in ("train", "valid", "test", "attack")
    }
    assert not ids["attack"] & (ids["train"] | ids["valid"] | ids["test"])


def test_too_few_records_for_the_members_is_an_error_before_training(tmp_path):
    """The fix names the most members the records afford, and that many then prepare: the
    attack split comes out of the records before train, so fewer members leave more train."""
    from privtune.stages.prepare import prepare

    with pytest.raises(ConfigError, match=r"attack\.members.*lower attack\.members to at most"):
        prepare(_prepare_params(_csv(tmp_path / "notes.csv", 40), 18), tmp_path)
    assert not (tmp_path / "data/prepared").exists()
    with pytest.raises(ConfigError, match=r"at most (\d+)") as err:
        prepare(_prepare_params(_csv(tmp_path / "notes.csv", 80), 39), tmp_path)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    card = prepare(_prepare_params(_csv(tmp_path / "notes.csv", 80), most), tmp_path)
    assert card["counts"]["attack"] == most
    with pytest.raises(ConfigError, match="at most"):
        prepare(_prepare_params(_csv(tmp_path / "notes.csv", 80), most + 1), tmp_path)


@pytest.mark.parametrize("repetitions, per", [((1, 4, 16), 2), ((1,), 1), ((2, 8), 3)])
def test_the_members_fix_counts_the_canaries_prepare_plants(repetitions, per):
    from privtune.stages.prepare import _planted

    params = parse_params({"prepare": {"canaries": {"repetitions": list(repetitions),
                                                    "per_repetition": per}}})  # fmt: skip
    canaries = make_canaries(repetitions, per, 3, seed=0)
    assert _planted(params) == sum(c.repetitions for c in canaries)


def test_records_too_few_for_the_least_members_say_to_add_records(tmp_path):
    from privtune.stages.prepare import prepare

    with pytest.raises(
        (ConfigError, DataError), match=r"provide more records: 20 afford 8 members"
    ):
        prepare(_prepare_params(_csv(tmp_path / "notes.csv", 20), 10), tmp_path)
    assert not (tmp_path / "data/prepared").exists()


# --- the cloze task --------------------------------------------------------------------------

CLOZE = ClozeParams(pattern=r"Plan: start (\w+)", candidates=3, min_prompt_chars=5)
NOTES = [
    {"text": "Cough and fever. Plan: start amoxicillin today."},
    {"text": "High glucose. Plan: start metformin today."},
    {"text": "Wheeze. Plan: start salbutamol today."},
    {"text": "Cough again. Plan: start amoxicillin today."},
    {"text": "No plan in this note."},
]


def test_cloze_items_mark_the_answer_span_and_candidates_come_from_train():
    items = cloze_items(NOTES, CLOZE)
    assert [i.answer for i in items] == ["amoxicillin", "metformin", "salbutamol", "amoxicillin"]
    assert items[0].prompt == "Cough and fever. Plan: start "
    assert cloze_candidates(NOTES, CLOZE)[0] == "amoxicillin"  # the most frequent first
    short = ClozeParams(pattern=CLOZE.pattern, min_prompt_chars=100)
    assert cloze_items(NOTES, short) == []


def test_cloze_accuracy_and_its_baselines(monkeypatch):
    import torch

    import privtune.evaluate as evaluate

    def scores(model, tokenizer, prompt, candidates, tails=None):
        wanted = "metformin" if "glucose" in prompt else "amoxicillin"
        return torch.tensor([1.0 if c == wanted else 0.0 for c in candidates])

    monkeypatch.setattr(evaluate, "continuation_logprobs", scores)
    monkeypatch.setattr(evaluate, "encode_continuations", lambda tokenizer, gap, c: [[1]] * len(c))
    items = cloze_items(NOTES, CLOZE)
    result = cloze_accuracy(None, None, items, ["amoxicillin", "metformin", "warfarin"])
    assert result["cloze_accuracy"] == 0.75  # salbutamol is not among the candidates
    assert result["cloze_coverage"] == 0.75
    assert result["cloze_chance"] == pytest.approx(0.75 / 3)
    assert result["cloze_majority"] == 0.5


def test_a_declared_task_that_cannot_run_is_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"evaluate.*cloze\.pattern"):
        parse_params({"evaluate": {"task": "cloze"}})
    with pytest.raises(ConfigError, match=r"evaluate\.cloze\.pattern.*regular expression"):
        parse_params({"evaluate": {"task": "cloze", "cloze": {"pattern": "(unclosed"}}})
    with pytest.raises(ConfigError, match=r"evaluate\.task.*generated notes.*cloze"):
        check_task(NOTES, NOTES, Params().evaluate)  # medication on notes without its fields
    no_match = parse_params({"evaluate": {"task": "cloze", "cloze": {"pattern": "ICD: (\\w+)"}}})
    with pytest.raises(DataError, match=r"evaluate\.cloze\.pattern.*0 test note"):
        check_task(NOTES, NOTES, no_match.evaluate)
    check_task(NOTES, NOTES, parse_params({"evaluate": {"task": None}}).evaluate)


# --- attack statistics -----------------------------------------------------------------------


def test_tpr_is_reported_only_where_the_non_members_resolve_it():
    members, non_members = [float(i) for i in range(150)], [float(i) - 60 for i in range(150)]
    summary = roc_summary(members, non_members, resamples=100)
    assert summary.tpr_at_fpr[0.001] is None and summary.tpr_at_fpr[0.01] is not None
    assert resolvable(0.01, 100) and not resolvable(0.01, 99)
    metrics = summarize({"loss": summary}, [], [], {})
    assert metrics["mia_members"] == metrics["mia_non_members"] == 150
    assert metrics["mia_tpr_at_fpr_0.001_max"] is None
    assert "at least 1000 non-members" in metrics["mia_tpr_at_fpr_0.001_unresolved"]
    tpr = metrics["mia_tpr_at_fpr_0.01_max"]
    assert metrics["mia_tpr_at_fpr_0.01_ci_low_max"] == tpr_lower_bound(tpr, 150, 0.95) < tpr
    assert metrics["mia_auc_ci_low_max"] == summary.auc_ci_low


def _tags(auc: float, auc_low: float, tpr: float | None, tpr_low: float | None) -> dict:
    tags = {"epsilon": "4.0", "delta": "1e-05", "attack.audit_epsilon_lower_bound": "0.1"}
    tags["secret_noise"] = "true"
    tags |= {"utility.test_perplexity": "10.0", "attack.mia_auc_max": str(auc)}
    tags["attack.mia_auc_ci_low_max"] = str(auc_low)
    if tpr is not None:
        tags["attack.mia_tpr_at_fpr_0.01_max"] = str(tpr)
        tags["attack.mia_tpr_at_fpr_0.01_ci_low_max"] = str(tpr_low)
    return tags


def test_attack_gates_refuse_on_the_lower_bound_and_mark_insufficient_evidence():
    gates = {g.gate: g for g in evaluate_gates(Gates(), _tags(0.58, 0.5, 0.058, 0.03), None)}
    # the refusal: TPR 0.058 > 0.05 measured on 150 non-members, lower bound 0.03
    assert gates["mia_tpr_at_fpr_0.01"].passed
    assert gates["mia_tpr_at_fpr_0.01"].evidence == "inconclusive"
    assert gates["mia_auc"].passed and gates["mia_auc"].evidence == "within"
    refused = {g.gate: g for g in evaluate_gates(Gates(), _tags(0.8, 0.7, 0.2, 0.1), None)}
    assert not refused["mia_auc"].passed and refused["mia_auc"].evidence == "exceeds"
    assert refused["mia_auc"].margin == pytest.approx(0.6 - 0.7)
    unresolved = evaluate_gates(Gates(), _tags(0.55, 0.4, None, None), None)
    tpr = next(g for g in unresolved if g.gate == "mia_tpr_at_fpr_0.01")
    assert not tpr.passed and tpr.evidence == INSUFFICIENT and "attack.members" in tpr.reason


# --- delta and its gate ----------------------------------------------------------------------


def test_the_default_delta_never_exceeds_the_registry_gate():
    finetune = Params().finetune
    assert default_delta(522) == pytest.approx(1 / 5220)  # the small corpus
    assert default_delta(522, max_delta=1e-4) == 1e-4
    assert make_plan(522, finetune, private=False, max_delta=1e-4).delta == 1e-4
    assert make_plan(20_000, finetune, private=False, max_delta=1e-4).delta == 5e-6


@pytest.mark.parametrize("n", [258, 522, 3_001, 20_000])
@pytest.mark.parametrize("gate", [1e-4, 1.6e-4, 1.23456e-4, 3.9e-4])
def test_the_delta_an_error_suggests_is_accepted(n, gate):
    """Following the below-1/N error's example must not walk into the gate's refusal (it
    suggested 1/(10 N) = 4e-4 for N = 258, above the gate's 1e-4; printed rounded it could
    also land just above a gate like 1.6e-4)."""
    finetune = parse_params({"finetune": {"delta": 0.5 / n * 3}}).finetune
    with pytest.raises(ConfigError, match=r"below 1/N") as err:
        make_plan(n, finetune, private=True, max_delta=gate)
    suggested = float(re.search(r"\(e\.g\. ([0-9.e-]+),", str(err.value)).group(1))
    followed = finetune.model_copy(update={"delta": suggested})
    assert make_plan(n, followed, private=True, max_delta=gate).delta == suggested


def test_a_delta_the_gate_would_refuse_is_refused_before_training():
    finetune = parse_params({"finetune": {"delta": 2e-4}}).finetune
    with pytest.raises(ConfigError, match=r"finetune\.delta.*registry\.gates\.max_delta") as err:
        make_plan(522, finetune, private=True, max_delta=1e-4)
    assert "at most 0.0001" in str(err.value)


@pytest.mark.parametrize("delta", [2e-4, 0.5])
def test_a_bad_delta_is_a_private_methods_error_not_the_non_private_ones(delta):
    """A run without noise claims no (ε, δ): the refusal names a private method's plan (the
    check named finetune@nonprivate, the first in the list, for δ = 0.5)."""
    finetune = parse_params({"finetune": {"delta": delta}}).finetune
    assert make_plan(522, finetune, private=False, max_delta=1e-4).steps > 0
    with pytest.raises(ConfigError, match=r"finetune\.delta"):
        make_plan(522, finetune, private=True, max_delta=1e-4)


# --- canaries --------------------------------------------------------------------------------


def test_canary_identifiers_follow_the_configured_template():
    canaries = make_canaries((1, 4), per_repetition=3, held_out=2, identifier="PT-@@######")
    assert all(re.search(r"PT-[A-Z]{2}\d{6}", c.prefix) for c in canaries)
    assert len({c.prefix for c in canaries}) == len(canaries)
    with pytest.raises(ConfigError, match=r"prepare\.canaries\.identifier.*random characters"):
        parse_params({"prepare": {"canaries": {"identifier": "MRN 12"}}})


def test_the_gates_table_marks_insufficient_evidence_apart_from_failures():
    from privtune.registry.promotion import Decision

    results = evaluate_gates(Gates(), _tags(0.55, 0.4, None, None), None)
    table = gates_table([Decision("m", "1", False, None, tuple(results))])
    assert "–?" in table and INSUFFICIENT in table


def test_the_report_says_when_no_downstream_task_was_declared():
    from privtune.stages.report import NO_TASK, markdown_table

    evaluated = {"test_perplexity": 3.0, "downstream_task": None}
    rows = {
        "none": {"finetune": {}, "evaluate": evaluated, "attack": {}, "task": None},
        "cloze": {
            "finetune": {},
            "evaluate": {"downstream_accuracy": 0.42, "downstream_chance": 0.1},
            "attack": {"mia_members": 100, "mia_non_members": 100, "mia_auc_max": 0.5}
            | {"mia_tpr_at_fpr_0.01_max": None},
            "task": "cloze",
        },
    }
    lines = markdown_table(rows).splitlines()
    assert f"| {NO_TASK} |" in lines[2]
    assert "| 0.420 (0.10) |" in lines[3] and "| 100 / 100 |" in lines[3]
    assert "| n/r |" in lines[3]  # recorded as not measurable, not a dash


def test_a_small_corpus_hears_that_audit_canaries_crowd_its_batches(tmp_path, capsys):
    """60 notes against the default 128 text audit canaries (about 64 IN): most of the train
    split would be canaries, silently. prepare says so, naming the option; not with 0."""
    from privtune.stages.prepare import prepare

    params = _prepare_params(_csv(tmp_path / "notes.csv", 60), 12)
    crowded = params.model_copy(
        update={
            "prepare": params.prepare.model_copy(
                update={"canaries": params.prepare.canaries.model_copy(update={"audit": 128})}
            )
        }
    )
    prepare(crowded, tmp_path)
    assert "lower prepare.canaries.audit" in capsys.readouterr().err
    prepare(params, tmp_path)  # audit 0
    assert "prepare.canaries.audit" not in capsys.readouterr().err
