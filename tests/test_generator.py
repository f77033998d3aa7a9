"""Behaviour of the pseudo-clinical note generator and the public reference corpus."""

from __future__ import annotations

import datetime as dt
import re
import statistics
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.data.generator import (
    ALL_MEDICATION_NAMES,
    CONDITIONS,
    FIRST_NAMES_FEMALE,
    FIRST_NAMES_MALE,
    LAST_NAMES,
    MEDICATIONS,
    NOTE_TYPES,
    generate_private_notes,
    generate_public_corpus,
)

BY_CODE = {c.icd10: c for c in CONDITIONS}
KEYS = {"text", "note_type", "icd10", "diagnosis", "medication", "med_prompt"}
DATE = r"(\d{4}-\d{2}-\d{2}|\d{2}/\d{2}/\d{4}|\d{1,2} [A-Z][a-z]{2} \d{4})"
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@pytest.fixture(scope="module")
def notes() -> list[dict[str, str]]:
    return generate_private_notes(3000, seed=7)


@pytest.fixture(scope="module")
def passages() -> list[str]:
    return generate_public_corpus(2000, seed=11)


def parse_date(text: str) -> dt.date:
    if "-" in text:
        return dt.date.fromisoformat(text)
    if "/" in text:
        day, month, year = (int(x) for x in text.split("/"))
        return dt.date(year, month, day)
    day, month, year = text.split()
    return dt.date(int(year), MONTHS.index(month) + 1, int(day))


def values(notes: list[dict[str, str]], pattern: str, codes: set[str], inside: bool) -> list[float]:
    """Numbers matched by ``pattern`` in notes whose code is (or is not) in ``codes``."""
    out = []
    for note in notes:
        if (note["icd10"] in codes) == inside:
            out += [float(x) for x in re.findall(pattern, note["text"])]
    return out


def check_note(note: dict[str, str]) -> None:
    """Every invariant a single private note must satisfy."""
    assert set(note) == KEYS
    assert all(isinstance(v, str) for v in note.values())
    assert note["note_type"] in NOTE_TYPES
    cond = BY_CODE[note["icd10"]]
    text, prompt, med = note["text"], note["med_prompt"], note["medication"]
    assert note["diagnosis"] == cond.name
    assert med in cond.medications
    assert text.startswith(prompt + med)
    assert med not in prompt, "the medication must first appear right after med_prompt"
    assert cond.name in prompt and cond.icd10 in prompt, "diagnosis must precede the drug"
    after = text[len(prompt) + len(med) :]
    assert any(after.startswith(" " + dose) for dose in MEDICATIONS[med])


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_identical_notes() -> None:
    assert generate_private_notes(50, 3) == generate_private_notes(50, 3)


def test_different_seeds_give_different_notes() -> None:
    a, b = generate_private_notes(20, 1), generate_private_notes(20, 2)
    assert all(x["text"] != y["text"] for x, y in zip(a, b, strict=True))


def test_shorter_run_is_prefix_of_longer_run() -> None:
    assert generate_private_notes(30, 5) == generate_private_notes(60, 5)[:30]


@pytest.mark.parametrize("n", [0, 1, 17])
def test_returns_n_notes_with_all_keys(n: int) -> None:
    notes = generate_private_notes(n, 0)
    assert len(notes) == n
    assert all(set(note) == KEYS for note in notes)


def test_negative_n_is_rejected() -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_private_notes(-1, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_public_corpus(-1, 0)


# --- per-note invariants -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**63), n=st.integers(min_value=1, max_value=6))
def test_every_note_satisfies_invariants(seed: int, n: int) -> None:
    for note in generate_private_notes(n, seed):
        check_note(note)


def test_invariants_over_a_large_sample(notes: list[dict[str, str]]) -> None:
    for note in notes:
        check_note(note)


def test_dose_matches_the_condition(notes: list[dict[str, str]]) -> None:
    """A shared drug (e.g. apixaban for AF and DVT) gets the dose used for that condition."""
    for note in notes:
        cond = BY_CODE[note["icd10"]]
        after = note["text"][len(note["med_prompt"]) + len(note["medication"]) :]
        assert any(after.startswith(" " + d) for d in cond.doses(note["medication"]))


def test_no_other_formulary_drug_precedes_the_prescription(notes: list[dict[str, str]]) -> None:
    """The prompt must not leak any candidate name, or the downstream task becomes trivial."""
    for note in notes:
        assert not [m for m in ALL_MEDICATION_NAMES if m in note["med_prompt"]]


def test_all_note_types_occur_with_distinct_headings() -> None:
    notes = generate_private_notes(300, 21)
    counts = Counter(n["note_type"] for n in notes)
    assert set(counts) == set(NOTE_TYPES)
    assert min(counts.values()) >= 20
    headings = {
        t: {n["text"].split("\n", 1)[0] for n in notes if n["note_type"] == t} for t in NOTE_TYPES
    }
    for a in NOTE_TYPES:
        assert len(headings[a]) >= 2, "several heading variants per note type"
        for b in NOTE_TYPES:
            if a != b:
                assert not headings[a] & headings[b]


def test_text_is_not_a_fixed_template(notes: list[dict[str, str]]) -> None:
    """Notes of one condition and type still differ in wording, not only in numbers."""
    skeletons = {re.sub(r"[\d]+", "#", n["text"]) for n in notes[:500]}
    assert len(skeletons) == 500
    plan_openers = {n["med_prompt"].rsplit("\n", 1)[-1][:12] for n in notes}
    assert len(plan_openers) >= 10


def test_lengths_are_in_band(notes: list[dict[str, str]]) -> None:
    lengths = [len(n["text"]) for n in notes]
    assert min(lengths) >= 450 and max(lengths) <= 1100
    assert 600 <= statistics.mean(lengths) <= 850
    assert sum(500 <= x <= 900 for x in lengths) / len(lengths) >= 0.9


def test_age_is_consistent_with_dob_and_encounter_date(notes: list[dict[str, str]]) -> None:
    for note in notes:
        text = note["text"]
        dob = parse_date(re.search(rf"DOB:? {DATE}", text).group(1))
        seen = parse_date(re.search(rf"(?:Admitted|Date of visit|Date): {DATE}", text).group(1))
        ages = re.findall(r"\((\d+) y\)|Age (\d+)|(\d+)-year-old", text)
        stated = {int(next(x for x in groups if x)) for groups in ages}
        expected = seen.year - dob.year - ((seen.month, seen.day) < (dob.month, dob.day))
        assert stated == {expected}, text
        cond = BY_CODE[note["icd10"]]
        assert cond.age_range[0] <= expected <= cond.age_range[1] + 1


def test_discharge_follows_admission(notes: list[dict[str, str]]) -> None:
    for note in notes:
        if note["note_type"] == "discharge_summary":
            found = re.search(rf"Admitted: {DATE}\s+Discharged: {DATE}", note["text"])
            assert 1 <= (parse_date(found.group(2)) - parse_date(found.group(1))).days <= 14


def test_identifiers_are_present_and_vary(notes: list[dict[str, str]]) -> None:
    mrns = [re.findall(r"MRN \d{4}-\d{4}", n["text"]) for n in notes[:500]]
    assert all(len(found) == 1 for found in mrns)
    assert len({found[0] for found in mrns}) >= 495
    postcodes = [re.search(r"[A-Z]{2}\d{1,2} \d[A-Z]{2}\b", n["text"]) for n in notes[:500]]
    assert all(postcodes)
    assert all("Dr. " in n["text"] for n in notes[:500])


def first_name(text: str) -> str:
    for pattern in (
        r"Patient: (\S+) ",
        r"Name: [^,]+, (\S+) \|",
        r"Re: (\S+) ",
        r"^(\S+) \S+, DOB",
    ):
        found = re.search(pattern, text, flags=re.MULTILINE)
        if found:
            return found.group(1)
    raise AssertionError(f"no patient name in:\n{text}")


def test_names_pronouns_and_sex_specific_conditions_agree(notes: list[dict[str, str]]) -> None:
    female, male = set(FIRST_NAMES_FEMALE), set(FIRST_NAMES_MALE)
    for note in notes:
        text = note["text"]
        name = first_name(text)
        assert name in female or name in male
        he = re.search(r"\b(he|He|his|him|man|Mr)\b", text)
        she = re.search(r"\b(she|She|her|woman|Ms)\b", text)
        if name in female:
            assert not he, text
        else:
            assert not she, text
        if note["icd10"] == "N40":  # benign prostatic hyperplasia
            assert name in male
        if note["icd10"] == "M81.0":  # postmenopausal osteoporosis
            assert name in female


def test_patient_names_come_from_the_embedded_lists(notes: list[dict[str, str]]) -> None:
    assert len(FIRST_NAMES_FEMALE) + len(FIRST_NAMES_MALE) + len(LAST_NAMES) >= 400
    assert not set(FIRST_NAMES_FEMALE) & set(FIRST_NAMES_MALE)
    names = {first_name(n["text"]) for n in notes}
    assert len(names) >= 200


# --- clinically plausible values ---------------------------------------------------------------


def test_labs_shift_in_the_typical_direction(notes: list[dict[str, str]]) -> None:
    hba1c = r"HbA1c (\d+\.\d)%"
    diabetic = values(notes, hba1c, {"E11.9"}, inside=True)
    other = values(notes, hba1c, {"E11.9"}, inside=False)
    assert len(diabetic) >= 30 and len(other) >= 30
    assert statistics.mean(diabetic) > 7.0 > 6.0 > statistics.mean(other)

    tsh = r"TSH (\d+\.\d+) mU/L"
    hypo = values(notes, tsh, {"E03.9"}, inside=True)
    hyper = values(notes, tsh, {"E05.9"}, inside=True)
    rest = values(notes, tsh, {"E03.9", "E05.9"}, inside=False)
    assert statistics.mean(hypo) > 4.0 > statistics.mean(rest) > 0.4 > statistics.mean(hyper)

    wbc = r"WBC (\d+\.\d) x10\^9/L"
    assert statistics.mean(values(notes, wbc, {"J18.9"}, True)) > 11.0
    assert (
        statistics.mean(values(notes, wbc, {"J18.9", "L03.1", "J03.0", "N39.0", "J44.1"}, False))
        < 9.0
    )

    hb = r"Hb (\d+) g/L"
    assert statistics.mean(values(notes, hb, {"D50.9"}, True)) < 115
    assert statistics.mean(values(notes, hb, {"D50.9", "D51.9"}, False)) > 130

    mcv = r"MCV (\d+) fL"
    assert statistics.mean(values(notes, mcv, {"D50.9"}, True)) < 80
    assert statistics.mean(values(notes, mcv, {"D51.9"}, True)) > 100


def test_vitals_shift_in_the_typical_direction(notes: list[dict[str, str]]) -> None:
    sbp = r"(?:BP|[Bb]lood pressure) (\d+)/\d+"
    assert statistics.mean(values(notes, sbp, {"I10"}, True)) > 150
    assert statistics.mean(values(notes, sbp, {"I10", "N18.3", "I20.9"}, False)) < 132
    temp = r"(?:T|temp|temperature) (\d+\.\d)"
    assert statistics.mean(values(notes, temp, {"J18.9"}, True)) > 38.0
    assert statistics.mean(values(notes, temp, {"J18.9"}, False)) < 37.3
    spo2 = r"(?:SpO2|sats|oxygen saturation) (\d+)%"
    assert statistics.mean(values(notes, spo2, {"J44.1"}, True)) < 92
    assert statistics.mean(values(notes, spo2, {"J44.1"}, False)) > 95
    hr = r"(?:HR|pulse|heart rate) (\d+)"
    assert statistics.mean(values(notes, hr, {"I48.9"}, True)) > 110


def test_vitals_are_physiologically_plausible(notes: list[dict[str, str]]) -> None:
    for note in notes:
        bp = re.search(r"(?:BP|[Bb]lood pressure) (\d+)/(\d+)", note["text"])
        systolic, diastolic = map(int, bp.groups())
        assert 80 <= systolic <= 240 and 40 <= diastolic <= systolic - 20
    assert all(
        35.0 <= t <= 41.0 for t in values(notes, r"(?:T|temp|temperature) (\d+\.\d)", set(), False)
    )


# --- knowledge base ----------------------------------------------------------------------------


def test_knowledge_base_is_consistent() -> None:
    assert 25 <= len(CONDITIONS) <= 40
    assert len(BY_CODE) == len(CONDITIONS), "ICD-10 codes are unique"
    assert len({c.name for c in CONDITIONS}) == len(CONDITIONS)
    for cond in CONDITIONS:
        assert re.fullmatch(r"[A-Z]\d{2}(\.\d{1,2})?", cond.icd10)
        assert 1 <= len(cond.medications) <= 3
        for med in cond.medications:
            assert med in MEDICATIONS and med == med.lower()
            assert cond.doses(med) and set(cond.doses(med)) <= set(MEDICATIONS[med])
    used = {m for c in CONDITIONS for m in c.medications}
    assert ALL_MEDICATION_NAMES == tuple(sorted(used)) == tuple(sorted(set(MEDICATIONS)))


def test_no_medication_name_contains_another() -> None:
    for a in ALL_MEDICATION_NAMES:
        assert not [b for b in ALL_MEDICATION_NAMES if a != b and a in b]


@pytest.mark.parametrize(
    ("code", "drug"),
    [
        ("E11.9", "metformin"),
        ("I10", "amlodipine"),
        ("J18.9", "amoxicillin"),
        ("N39.0", "nitrofurantoin"),
        ("E03.9", "levothyroxine"),
        ("I80.2", "apixaban"),
        ("L03.1", "flucloxacillin"),
        ("D50.9", "ferrous sulfate"),
        ("M10.9", "colchicine"),
        ("J45.9", "salbutamol"),
    ],
)
def test_known_first_line_pairs(code: str, drug: str) -> None:
    assert drug in BY_CODE[code].medications


def test_condition_text_never_names_a_drug() -> None:
    """History, findings and plan phrases must not leak a formulary name before the plan."""
    for cond in CONDITIONS:
        fields = (
            cond.name,
            *cond.complaints,
            *cond.symptoms,
            *cond.findings,
            *cond.background,
            *cond.female_background,
            *cond.plan,
        )
        for phrase in fields:
            assert not [m for m in ALL_MEDICATION_NAMES if m in phrase.lower()], phrase


def test_penicillin_allergy_never_accompanies_a_penicillin(notes: list[dict[str, str]]) -> None:
    penicillins = {"amoxicillin", "flucloxacillin", "phenoxymethylpenicillin"}
    for note in notes:
        if note["medication"] in penicillins:
            assert "penicillin (rash)" not in note["text"]


# --- public corpus -----------------------------------------------------------------------------


def test_public_corpus_is_deterministic_and_seed_sensitive() -> None:
    assert generate_public_corpus(40, 1) == generate_public_corpus(40, 1)
    assert generate_public_corpus(40, 1) != generate_public_corpus(40, 2)
    assert generate_public_corpus(25, 1) == generate_public_corpus(40, 1)[:25]
    assert len(generate_public_corpus(0, 1)) == 0


def test_public_passages_have_no_identifiers(passages: list[str]) -> None:
    names = set(FIRST_NAMES_FEMALE) | set(FIRST_NAMES_MALE) | set(LAST_NAMES)
    for passage in passages:
        assert "MRN" not in passage and "DOB" not in passage and "Dr." not in passage
        assert not re.search(r"\d{4}-\d{4}", passage)
        assert not re.search(r"\b(year-old|he|she|his|her|Mr|Ms)\b", passage)
        assert not names & set(re.findall(r"[A-Z][\w'-]*", passage)), passage


def test_public_passages_have_no_note_headings(passages: list[str]) -> None:
    heading = re.compile(
        r"^(S|O|A|P|Subjective|Objective|Assessment|Plan|History|Follow-up):|DISCHARGE|REFERRAL",
        flags=re.MULTILINE,
    )
    assert not [p for p in passages if heading.search(p) or "\n" in p]


def test_public_passages_cover_the_knowledge_base(passages: list[str]) -> None:
    corpus = "\n".join(passages)
    assert all(c.icd10 in corpus for c in CONDITIONS)
    assert all(m in corpus.lower() for m in ALL_MEDICATION_NAMES)
    kinds = Counter(
        "condition" if "ICD-10" in p else "drug" if "dose" in p or "dosing" in p else "other"
        for p in passages
    )
    assert min(kinds.values()) >= 100


def test_public_passage_lengths(passages: list[str]) -> None:
    lengths = [len(p) for p in passages]
    assert min(lengths) >= 250 and max(lengths) <= 900
    assert 350 <= statistics.mean(lengths) <= 700
    assert len(set(passages)) >= 0.9 * len(passages)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**63))
def test_public_corpus_never_contains_note_markers(seed: int) -> None:
    for passage in generate_public_corpus(5, seed):
        assert "MRN" not in passage and "DOB" not in passage


# --- speed ---------------------------------------------------------------------------------------


def test_generating_5000_notes_is_fast() -> None:
    start = time.perf_counter()
    notes = generate_private_notes(5000, 0)
    elapsed = time.perf_counter() - start
    assert len(notes) == 5000
    assert elapsed < 2.0, f"5000 notes took {elapsed:.2f} s"
