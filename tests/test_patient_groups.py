"""A corpus with several notes per patient (`prepare.group_column`): every split takes whole
patients, `prepare.max_records_per_group` bounds a patient's training records, the data card
counts patients (never an id), and `privtune check` and the model card say what the
per-record guarantee gives a patient (group privacy)."""

from __future__ import annotations

import json
import math
import random
import re
from decimal import MAX_EMAX, Context, Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from privtune.config import Params, parse_params
from privtune.data.loaders import load_records
from privtune.errors import ConfigError, DataError
from privtune.privacy.group import describe, group_guarantee, per_group


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
    k=st.integers(1, 10_000),  # an inpatient's daily notes over years
    epsilon=st.floats(0.01, 1000),
    delta=st.floats(1e-12, 1e-3),
)
def test_group_privacy_grows_with_the_group_and_is_the_record_guarantee_for_one(k, epsilon, delta):
    group_epsilon, group_delta = group_guarantee(k, epsilon, delta)  # never an OverflowError
    assert group_epsilon == pytest.approx(k * epsilon)
    # k·e^((k-1)ε)·δ in decimal arithmetic, whose exponent range holds e^(10^7)
    with localcontext(Context(prec=30, Emax=MAX_EMAX)):
        exact = Decimal(k) * (Decimal(k - 1) * Decimal(epsilon)).exp() * Decimal(delta)
    assert group_delta == (pytest.approx(float(exact), rel=1e-9) if exact < 1 else None)
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
    # 90 notes of one patient at epsilon 8: e^(89 * 8) overflows a float (check and register
    # exited 5); the answer is no bound, in words for check
    assert per_group(groups | {"train_records_per_group_max": 90}, 8.0, 1e-5)["delta"] is None
    assert describe(90, 8.0, 1e-5).endswith("no bound (group privacy's delta >= 1)")
    assert group_guarantee(3, 1.0, 0.0) == (3.0, 0.0)

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
    # 12 members cannot measure the TPR at 1 % FPR: the fix names the cap as a way to records
    left = sum(max(0, n - 2) for n in sizes)
    (warning,) = [line for line in lines if line.startswith("warning: attack.members 12")]
    assert f"(prepare.max_records_per_group left out {left} records;" in warning


def test_the_members_fix_is_the_most_these_patients_afford(tmp_path):
    """Whole-patient splits and the cap leave fewer training notes than a note-by-note split:
    the most attack.members an error suggests is found by splitting, and it prepares."""
    from privtune.stages.prepare import prepare

    sizes = [1 + (i % 8) for i in range(150)]  # 675 notes, 1 to 8 per patient
    source, _ = _notes(tmp_path / "notes.csv", sizes)
    with pytest.raises(ConfigError, match=r"at most (\d+)") as err:
        prepare(_params(source, members=250, cap=3), tmp_path)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    left = sum(max(0, n - 3) for n in sizes)  # the cap is the other way to more records
    assert f"prepare.max_records_per_group left out {left} records" in str(err.value)
    assert prepare(_params(source, members=most, cap=3), tmp_path)["counts"]["attack"] == most
    with pytest.raises(ConfigError, match="at most"):
        prepare(_params(source, members=most + 1, cap=3), tmp_path)
    with pytest.raises(ConfigError, match="at most") as uncapped:
        prepare(_params(source, members=500), tmp_path)
    assert "max_records_per_group" not in str(uncapped.value)  # nothing was left out by it


# --- the membership attack's intervals, by patient --------------------------------------------


def test_the_prepared_notes_carry_a_patient_number_that_is_not_the_id(tmp_path):
    """Every note of the splits has its patient's number (one per patient, the same in every
    split, different patients apart), numbered in the shuffled order: what the attack's
    intervals resample by, without the id."""
    from privtune.data.loaders import GROUP_NUMBER
    from privtune.stages.prepare import prepare

    source, patient_of = _notes(tmp_path / "notes.csv", [1 + (i % 4) for i in range(90)])
    prepare(_params(source, members=12, cap=3), tmp_path)
    number_of: dict[str, int] = {}
    for rows in _splits(tmp_path).values():
        for row in rows:
            if row["text"] not in patient_of:  # a canary or a note with one planted
                continue
            assert isinstance(row[GROUP_NUMBER], int)
            assert (
                number_of.setdefault(patient_of[row["text"]], row[GROUP_NUMBER])
                == row[GROUP_NUMBER]
            )
    assert len(set(number_of.values())) == len(number_of)  # one number per patient
    by_id = [number_of[p] for p in sorted(number_of)]
    assert by_id != sorted(by_id)  # not the ids' order


def _clustered(patients: int, notes: int, seed: int, shift: float = 0.3):
    """Scores where a patient's notes are alike (their patient's level plus a little noise)."""
    rng = np.random.default_rng(seed)
    members = np.repeat(rng.normal(shift, 1, patients), notes) + rng.normal(
        0, 0.1, patients * notes
    )
    non = np.repeat(rng.normal(0, 1, patients), notes) + rng.normal(0, 0.1, patients * notes)
    groups = np.repeat(np.arange(patients), notes)
    return members, non, (groups, groups + patients)


def test_the_auc_interval_resamples_patients_when_their_notes_are_alike():
    from privtune.attacks.roc import auc_confidence_interval

    members, non, patients = _clustered(40, 4, seed=0)
    notes_low, notes_high = auc_confidence_interval(members, non, 2000, seed=1)
    low, high = auc_confidence_interval(members, non, 2000, seed=1, patients=patients)
    # 160 notes of 40 patients carry about 40 notes' evidence: twice the width (sqrt 4)
    assert 1.6 < (high - low) / (notes_high - notes_low) < 2.5
    # one note per patient: the same interval as resampling notes
    single = (np.arange(160), np.arange(160, 320))
    s_low, s_high = auc_confidence_interval(members, non, 4000, seed=2, patients=single)
    n_low, n_high = auc_confidence_interval(members, non, 4000, seed=2)
    assert s_low == pytest.approx(n_low, abs=0.01) and s_high == pytest.approx(n_high, abs=0.01)
    with pytest.raises(ValueError, match="needs its patient"):
        auc_confidence_interval(members, non, 100, patients=(patients[0][:-1], patients[1]))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=30),
    seed=st.integers(0, 2**16),
    rate=st.floats(0, 1),
)
def test_effective_members_lie_between_the_patients_and_the_notes(sizes, seed, rate):
    """Between n / (a patient's most notes) (each patient one draw) and n (every note one)."""
    from privtune.attacks.roc import effective_members

    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    hits = rng.random(groups.size) < rate
    n = groups.size
    effective = effective_members(hits, groups)
    assert n / max(sizes) - 1e-9 <= effective <= n + 1e-9
    if max(sizes) == 1:
        assert effective == n


def test_a_tpr_bound_counts_patients_whose_notes_all_hit_or_all_miss_once():
    from privtune.attacks.roc import effective_members, roc_summary, tpr_lower_bound

    groups = np.repeat(np.arange(50), 3)
    hits = np.repeat(np.arange(50) < 10, 3)  # 10 patients' 30 notes hit, all of them
    assert effective_members(hits, groups) == pytest.approx(50)
    assert effective_members(hits, np.arange(150)) == 150
    # an integer number of members is Clopper-Pearson as before; a fraction continues it
    assert tpr_lower_bound(0.2, 150, 0.95) == pytest.approx(
        stats.binomtest(30, 150).proportion_ci(0.95, "exact").low
    )
    for tpr in (0.0, 0.2, 1.0):  # a float count gives the binomial bound where it is whole
        assert tpr_lower_bound(tpr, 150.0, 0.95) == pytest.approx(tpr_lower_bound(tpr, 150, 0.95))
    assert tpr_lower_bound(0.2, 150.0001, 0.95) == pytest.approx(
        tpr_lower_bound(0.2, 150, 0.95), rel=1e-3
    )
    assert tpr_lower_bound(0.2, 50, 0.95) < tpr_lower_bound(0.2, 150, 0.95)
    # through roc_summary: alike notes give the bound of their patients' number
    members, non, patients = _clustered(50, 3, seed=4, shift=3.0)
    by_note = roc_summary(members, non, 200, 0.95, 0, fprs=(0.01,))
    by_patient = roc_summary(members, non, 200, 0.95, 0, fprs=(0.01,), patients=patients)
    assert by_patient.tpr_at_fpr == by_note.tpr_at_fpr and by_patient.auc == by_note.auc
    assert by_patient.tpr_ci_low[0.01] < by_note.tpr_ci_low[0.01]
    assert by_patient.patients == (50, 50) and by_note.patients is None


def test_the_attack_metrics_the_card_and_the_report_count_the_patients():
    from privtune.attacks.membership import record_patients
    from privtune.attacks.roc import roc_summary
    from privtune.attacks.run import _membership
    from privtune.registry import card
    from privtune.stages.report import MIA_COUNTS, _cell

    members = [{"text": f"m{i}", "group_number": i // 2} for i in range(20)]
    non = [{"text": f"n{i}", "group_number": 10 + i // 4} for i in range(20)]
    patients = record_patients(members, non)
    assert patients == ([i // 2 for i in range(20)], [10 + i // 4 for i in range(20)])
    assert record_patients(members, non[:-1] + [{"text": "no number"}]) is None
    scores = np.linspace(0, 1, 40)
    summary = roc_summary(scores[::2], scores[1::2], 100, patients=patients)
    metrics = _membership({"loss": summary})
    assert (metrics["mia_member_patients"], metrics["mia_non_member_patients"]) == (10, 5)
    assert "mia_member_patients" not in _membership(
        {"loss": roc_summary(scores[::2], scores[1::2])}
    )

    membership = card._membership(metrics, None)
    assert membership["patients"] == [10, 5]
    text = card._membership_text({"attacks": {"membership": membership}})
    assert "20 members vs 20 non-members (of 10 and 5 patients, resampled by patient)" in text
    cell = _cell({"attack": metrics}, "attack", MIA_COUNTS, "{}")
    assert cell == "20 / 20 (10 / 5 patients)"
