"""A corpus with several notes per patient (`prepare.group_column`): every split takes whole
patients, `prepare.max_records_per_group` bounds a patient's training records, the data card
counts patients (never an id), and `privtune check` and the model card say what the
per-record guarantee gives a patient (group privacy)."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privtune.config import Params, parse_params
from privtune.data.loaders import load_records
from privtune.errors import ConfigError, DataError
from privtune.privacy.group import group_guarantee, per_group


def _notes(path: Path, sizes: list[int], seed: int = 3) -> tuple[Path, dict[str, str]]:
    """A CSV of patients with ``sizes[i]`` notes each; and each note's patient, by text."""
    rng = random.Random(seed)
    patient_of: dict[str, str] = {}
    lines = ["note_id,patient,text"]
    for p, size in enumerate(sizes):
        for j in range(size):
            text = f"visit {j} of a patient: note {len(patient_of)} {rng.random():.6f}"
            patient_of[text] = f"P-{p:04d}"
            lines.append(f"N{len(patient_of)},P-{p:04d},{text}")
    path.write_text("\n".join(lines) + "\n")
    return path, patient_of


def _params(source: Path, members: int = 10, cap: int | None = None) -> Params:
    return parse_params(
        {
            "prepare": {
                "source": str(source),
                "id_column": "note_id",
                "group_column": "patient",
                "max_records_per_group": cap,
                "canaries": {"repetitions": [1], "per_repetition": 1, "held_out": 1, "audit": 0},
            },
            "attack": {"members": members},
            "evaluate": {"task": None},
        }
    )


def _splits(root: Path) -> dict[str, list[dict]]:
    prepared = root / "data/prepared"
    return {
        name: [json.loads(line) for line in (prepared / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "valid", "test", "attack")
    }


# --- reading the column ----------------------------------------------------------------------


def test_the_group_column_is_read_in_every_format_and_refused_when_missing_or_empty(tmp_path):
    """Ids are compared without surrounding spaces ("P1 " is P1); a misspelled column is named
    with the header's columns (the text column was found there: it is a header)."""
    csv = tmp_path / "notes.csv"
    csv.write_text("patient,text\nP1,first note\nP1,second note\nP2,third note\n")
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"patient": p, "text": t}) + "\n"
            for p, t in [("P1", "first note"), ("P1", "second note"), ("P2", "third note")]
        )
    )
    for source in (csv, jsonl):
        rows = load_records(source, group_column="patient")
        assert [r["group"] for r in rows] == ["P1", "P1", "P2"]
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("patient,text\nP1,first note\nP1 ,second note\n")
    assert [r["group"] for r in load_records(spaced, group_column="patient")] == ["P1", "P1"]
    with pytest.raises(DataError, match=r"no `mrn` column.*prepare\.group_column") as err:
        load_records(csv, group_column="mrn")
    assert "['patient', 'text']" in str(err.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("patient,text\nP-SECRET-1,first note\n,second note\n")
    with pytest.raises(DataError, match=r"record 2 has an empty `patient`") as err:
        load_records(empty, group_column="patient")
    assert "P-SECRET-1" not in str(err.value) and "second note" not in str(err.value)


def test_a_cap_without_groups_and_groups_of_the_generated_notes_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="a cap per group needs prepare.group_column") as err:
        parse_params({"prepare": {"max_records_per_group": 2}})
    assert err.value.field == "prepare.max_records_per_group"
    from privtune.stages.prepare import build

    params = parse_params({"prepare": {"group_column": "patient"}})
    with pytest.raises(ConfigError, match="generated notes have no patient column") as err:
        build(params, tmp_path)
    assert err.value.field == "prepare.group_column"


# --- the splits -------------------------------------------------------------------------------


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=40, max_size=90),
    cap=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 10**6),
)
def test_no_patient_is_in_two_splits_and_none_trains_on_more_than_the_cap(
    tmp_path_factory, sizes, cap, seed
):
    from privtune.stages.prepare import _capped, _split

    root = tmp_path_factory.mktemp("groups")
    source, patient_of = _notes(root / "notes.csv", sizes, seed)
    params = _params(source, members=10, cap=cap).model_copy(deep=True)
    records = load_records(source, "text", "note_id", group_column="patient")
    kept, left_by_cap = _capped(records, cap, params.prepare.seed)
    splits, left_at_split = _split(kept, params)
    patients = {name: {r["group"] for r in rows} for name, rows in splits.items()}
    names = list(patients)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not patients[a] & patients[b], (a, b)
    assert len(splits["attack"]) == 10  # exactly attack.members non-members
    assert sum(map(len, splits.values())) + left_at_split + left_by_cap == len(records)
    for name, rows in splits.items():  # every split: members and non-members alike
        counts = {p: sum(r["group"] == p for r in rows) for p in patients[name]}
        assert max(counts.values()) <= (cap or max(sizes)), name
        if cap is not None and name != "attack":  # more notes than the cap: exactly the cap
            assert all(counts[p] == cap for p in counts if sizes[int(p[2:])] >= cap), name


def test_prepare_writes_whole_patients_and_counts_them_without_an_id(tmp_path):
    from privtune.stages.prepare import prepare

    sizes = [1 + (i % 5) for i in range(80)]  # 1 to 5 notes each, 240 notes
    source, patient_of = _notes(tmp_path / "notes.csv", sizes)
    card = prepare(_params(source, members=12, cap=3), tmp_path)
    splits = _splits(tmp_path)
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            if row.get("kind") or row["text"] not in patient_of:
                continue  # a canary
            assert seen.setdefault(patient_of[row["text"]], name) == name
    groups = card["groups"]
    train_patients = [patient_of[r["text"]] for r in splits["train"] if r["text"] in patient_of]
    assert groups["groups"]["train"] == len(set(train_patients))
    assert groups["train_records_per_group_max"] == 3 and groups["max_records_per_group"] == 3
    assert groups["records_left_out"]["cap"] == sum(max(0, n - 3) for n in sizes)
    # the notes of one patient are not in a run: the first notes of a split are many patients'
    runs = sum(a != b for a, b in zip(train_patients, train_patients[1:], strict=False)) + 1
    assert runs > 1.5 * len(set(train_patients))
    assert card["counts"]["attack"] == 12
    written = "".join(p.read_text() for p in (tmp_path / "data/prepared").iterdir())
    assert "P-00" not in written  # no patient id in the splits or the data card
    assert not any("group" in row for rows in splits.values() for row in rows)


def test_without_a_group_column_the_splits_and_the_card_are_as_before(tmp_path):
    """The same records split the same way as before groups existed (the committed results'
    prepare stage reproduces), and the data card has no groups entry."""
    from privtune.stages.prepare import _split

    source, _ = _notes(tmp_path / "notes.csv", [1] * 100)
    params = parse_params({"prepare": {"source": str(source)}, "attack": {"members": 10}})
    records = load_records(source)
    rows = list(records)
    random.Random(params.prepare.seed).shuffle(rows)
    splits, left = _split(records, params)
    assert left == 0
    assert splits["attack"] == rows[:10]
    assert splits["valid"] == rows[10:19] and splits["test"] == rows[19:28]
    assert splits["train"] == rows[28:]


# --- what the guarantee says for a patient ---------------------------------------------------


@given(
    k=st.integers(1, 64),
    epsilon=st.floats(0.01, 10),
    delta=st.floats(1e-12, 1e-3),
)
def test_group_privacy_grows_with_the_group_and_is_the_record_guarantee_for_one(k, epsilon, delta):
    group_epsilon, group_delta = group_guarantee(k, epsilon, delta)
    assert group_epsilon == pytest.approx(k * epsilon)
    expected = k * math.exp((k - 1) * epsilon) * delta
    assert group_delta == (pytest.approx(expected) if expected < 1 else None)
    if k == 1:
        assert (group_epsilon, group_delta) == (pytest.approx(epsilon), pytest.approx(delta))
    if group_delta is not None and k > 1:
        assert group_delta >= group_guarantee(k - 1, epsilon, delta)[1]


def test_the_card_and_check_say_what_a_patient_with_the_most_records_gets(tmp_path):
    groups = {"column": "patient", "max_records_per_group": 2, "train_records_per_group_max": 2}
    line = per_group(groups, 1.0, 1e-6)
    assert line["max_training_records_of_one_group"] == 2
    assert line["epsilon"] == 2.0 and line["delta"] == pytest.approx(2 * math.e * 1e-6)
    # at epsilon 8 two records already get delta 0.06; four get no bound at all
    assert per_group(groups, 8.0, 1e-5)["delta"] == pytest.approx(2 * math.exp(8) * 1e-5)
    assert per_group(groups | {"train_records_per_group_max": 4}, 8.0, 1e-5)["delta"] is None
    assert per_group(None, 1.0, 1e-6) is None

    from privtune.stages.preflight import check_all

    sizes = [1 + (i % 4) for i in range(100)]
    source, _ = _notes(tmp_path / "notes.csv", sizes)
    params = _params(source, members=12, cap=2)
    params = params.model_copy(
        update={"finetune": params.finetune.model_copy(update={"epsilon": 1.0})}
    )
    lines = check_all(params, tmp_path, ["dpsgd"])
    assert "patients (patient) in train, up to 2 records each" in lines[1]
    assert "a patient with 2 training records: epsilon 2, delta" in lines[-1]


def test_the_members_fix_is_the_most_these_patients_afford(tmp_path):
    """Whole-patient splits and the cap leave fewer training notes than a note-by-note split:
    the most attack.members an error suggests is found by splitting, and it prepares."""
    from privtune.stages.prepare import prepare

    sizes = [1 + (i % 8) for i in range(150)]  # 675 notes, 1 to 8 per patient
    source, _ = _notes(tmp_path / "notes.csv", sizes)
    with pytest.raises(ConfigError, match=r"at most (\d+)") as err:
        prepare(_params(source, members=250, cap=3), tmp_path)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert prepare(_params(source, members=most, cap=3), tmp_path)["counts"]["attack"] == most
    with pytest.raises(ConfigError, match="at most"):
        prepare(_params(source, members=most + 1, cap=3), tmp_path)
