"""Behaviour of canary creation, insertion into records, candidates and persistence."""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.data.canaries import (
    SECRET_FORMAT,
    SECRET_SPACE_SIZE,
    Canary,
    candidate_secrets,
    format_secret,
    insert_canaries,
    is_valid_secret,
    load_canaries,
    make_canaries,
    random_secret,
    save_canaries,
    trained_occurrences,
)
from privtune.data.generator import ALL_MEDICATION_NAMES, generate_private_notes

SECRET_RE = re.compile(r"\d{3} \d{3} \d{3}")


@pytest.fixture(scope="module")
def notes() -> list[dict[str, str]]:
    return generate_private_notes(300, seed=5)


def containing(records: list[dict[str, str]], canary: Canary) -> list[int]:
    return [i for i, r in enumerate(records) if canary.text in r["text"]]


# --- secrets -----------------------------------------------------------------------------------


def test_secret_format_describes_nine_digits() -> None:
    assert SECRET_FORMAT == "ddd ddd ddd"
    assert SECRET_SPACE_SIZE == 10**9
    assert format_secret(5) == "000 000 005"
    assert format_secret(SECRET_SPACE_SIZE - 1) == "999 999 999"
    with pytest.raises(ValueError):
        format_secret(SECRET_SPACE_SIZE)
    assert is_valid_secret("012 345 678")
    assert not is_valid_secret("012345678") and not is_valid_secret("012 345 67a")


def test_random_secrets_are_valid_and_uniform() -> None:
    rng = random.Random(0)
    secrets = [random_secret(rng) for _ in range(4000)]
    assert all(SECRET_RE.fullmatch(s) for s in secrets)
    assert len(set(secrets)) == len(secrets)
    for position in (0, 5, 10):
        counts = Counter(s[position] for s in secrets)
        assert set(counts) == set("0123456789")
        assert all(300 <= c <= 500 for c in counts.values()), counts


# --- make_canaries -----------------------------------------------------------------------------


def test_default_canaries_have_expected_counts_and_are_unique() -> None:
    canaries = make_canaries()
    assert Counter(c.repetitions for c in canaries) == {1: 4, 4: 4, 16: 4, 0: 8}
    assert len({c.id for c in canaries}) == len(canaries)
    assert len({c.prefix for c in canaries}) == len(canaries)
    assert len({c.secret for c in canaries}) == len(canaries)
    assert "canary-r4-01" in {c.id for c in canaries}
    for canary in canaries:
        assert SECRET_RE.fullmatch(canary.secret)
        assert canary.text == canary.prefix + canary.secret
        assert re.search(r"MRN \d{4}-\d{4}", canary.prefix)
        assert not [m for m in ALL_MEDICATION_NAMES if m in canary.prefix.lower()]


def test_make_canaries_is_deterministic_and_seed_sensitive() -> None:
    assert make_canaries(seed=3) == make_canaries(seed=3)
    a, b = make_canaries(seed=3), make_canaries(seed=4)
    assert {c.secret for c in a}.isdisjoint({c.secret for c in b})


@settings(max_examples=50, deadline=None)
@given(
    repetitions=st.lists(st.integers(1, 64), max_size=4, unique=True),
    per_repetition=st.integers(0, 6),
    held_out=st.integers(0, 6),
    seed=st.integers(0, 2**32),
)
def test_make_canaries_counts_for_any_arguments(
    repetitions: list[int], per_repetition: int, held_out: int, seed: int
) -> None:
    canaries = make_canaries(repetitions, per_repetition, held_out, seed)
    expected = Counter({r: per_repetition for r in repetitions if per_repetition})
    if held_out:
        expected[0] = held_out
    assert Counter(c.repetitions for c in canaries) == expected
    for attr in ("id", "prefix", "secret"):
        assert len({getattr(c, attr) for c in canaries}) == len(canaries)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repetitions": (0, 4)},
        {"repetitions": (4, 4)},
        {"repetitions": (-1,)},
        {"per_repetition": -1},
        {"held_out": -2},
    ],
)
def test_make_canaries_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_canaries(**kwargs)


def test_canary_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="repetitions"):
        Canary("x", "code is ", "123 456 789", -1)
    with pytest.raises(ValueError, match="does not match"):
        Canary("x", "code is ", "123456789", 1)
    with pytest.raises(ValueError, match="prefix"):
        Canary("x", "", "123 456 789", 1)


# --- insert_canaries ---------------------------------------------------------------------------


def test_each_canary_lands_in_exactly_r_records(notes: list[dict[str, str]]) -> None:
    canaries = make_canaries(seed=1)
    out = insert_canaries(notes, canaries, seed=2)
    assert len(out) == len(notes)
    for canary in canaries:
        assert len(containing(out, canary)) == canary.repetitions
        assert sum(r["text"].count(canary.text) for r in out) == canary.repetitions


def test_held_out_canaries_appear_nowhere(notes: list[dict[str, str]]) -> None:
    canaries = make_canaries(seed=1)
    out = insert_canaries(notes, canaries, seed=2)
    for canary in (c for c in canaries if c.repetitions == 0):
        assert not any(canary.secret in r["text"] or canary.prefix in r["text"] for r in out)


def test_a_record_receives_at_most_one_canary(notes: list[dict[str, str]]) -> None:
    canaries = make_canaries(seed=1)
    out = insert_canaries(notes, canaries, seed=2)
    per_record = [sum(c.text in r["text"] for c in canaries) for r in out]
    assert max(per_record) == 1
    assert sum(per_record) == sum(c.repetitions for c in canaries)
    changed = [o for o, n in zip(out, notes, strict=True) if o != n]
    assert len(changed) == sum(per_record)


def test_inputs_are_not_mutated_and_keys_are_kept(notes: list[dict[str, str]]) -> None:
    before = copy.deepcopy(notes)
    out = insert_canaries(notes, make_canaries(seed=1), seed=2)
    assert notes == before
    assert all(o is not n for o, n in zip(out, notes, strict=True))
    assert all(set(o) == set(n) for o, n in zip(out, notes, strict=True))
    for o, n in zip(out, notes, strict=True):
        assert {k: v for k, v in o.items() if k not in ("text", "med_prompt")} == {
            k: v for k, v in n.items() if k not in ("text", "med_prompt")
        }


@pytest.mark.parametrize("placement", ["line", "end"])
def test_med_prompt_stays_valid(notes: list[dict[str, str]], placement: str) -> None:
    out = insert_canaries(notes, make_canaries(seed=1), seed=9, placement=placement)
    moved = 0
    for record in out:
        prompt, med = record["med_prompt"], record["medication"]
        assert record["text"].startswith(prompt + med)
        assert med not in prompt
        moved += any(c.text in prompt for c in make_canaries(seed=1))
    if placement == "line":
        assert moved > 0, "some canaries should land before the plan (and be in med_prompt)"
    else:
        assert moved == 0


def test_canary_is_its_own_line(notes: list[dict[str, str]]) -> None:
    canaries = make_canaries(seed=1)
    out = insert_canaries(notes, canaries, seed=3)
    for canary in canaries:
        for index in containing(out, canary):
            lines = [ln for ln in out[index]["text"].split("\n") if canary.text in ln]
            assert len(lines) == 1 and lines[0].endswith(canary.text + ".")
            assert re.fullmatch(r"[A-Za-z ]*:? ?", lines[0][: -len(canary.text) - 1])


def test_placement_end_and_max_offset(notes: list[dict[str, str]]) -> None:
    canaries = make_canaries(seed=1)
    for record in insert_canaries(notes, canaries, seed=4, placement="end"):
        hits = [c for c in canaries if c.text in record["text"]]
        if hits:
            assert record["text"].endswith(hits[0].text + ".")
    for record in insert_canaries(notes, canaries, seed=4, max_offset=200):
        for canary in canaries:
            at = record["text"].find(canary.text)
            if at >= 0:
                line_start = record["text"].rfind("\n", 0, at) + 1
                assert line_start <= 200


def test_a_note_with_no_line_start_near_its_beginning_gets_the_canary_as_its_first_line():
    """A record is truncated from its end: a canary appended to a long one-line note (or one
    whose first line is longer than max_offset) would never be trained on."""
    canaries = make_canaries(repetitions=(1,), per_repetition=2, held_out=1, seed=0)
    records = [{"text": "x" * 300}, {"text": "y" * 120 + "\n" + "z" * 50}]
    planted = insert_canaries(records, canaries, seed=0, max_offset=100)
    for record, original in zip(planted, records, strict=True):
        first, rest = record["text"].split("\n", 1)
        assert any(first.endswith(c.text + ".") for c in canaries) and rest == original["text"]
    out = insert_canaries(records, canaries, seed=0, max_offset=121)
    assert out[1]["text"].startswith("y" * 120 + "\n")  # a line start within reach is used


def test_insertion_is_deterministic_and_seed_sensitive(notes: list[dict[str, str]]) -> None:
    canaries = make_canaries(seed=1)
    assert insert_canaries(notes, canaries, seed=2) == insert_canaries(notes, canaries, seed=2)
    first = containing(insert_canaries(notes, canaries, seed=2), canaries[-9])
    second = containing(insert_canaries(notes, canaries, seed=3), canaries[-9])
    assert first != second


def test_too_few_records_is_a_clear_error() -> None:
    canaries = make_canaries()  # needs 4 * (1 + 4 + 16) = 84 records
    records = [{"text": f"note {i}\nline two"} for i in range(83)]
    with pytest.raises(ValueError, match="needs 84 distinct records.*only 83"):
        insert_canaries(records, canaries, seed=0)
    out = insert_canaries(records + [{"text": "one more"}], canaries, seed=0)
    assert sum(any(c.text in r["text"] for c in canaries) for r in out) == 84


def test_held_out_only_needs_no_records() -> None:
    canaries = make_canaries(repetitions=(), held_out=3)
    assert insert_canaries([], canaries, seed=0) == []


def test_bad_placement_is_rejected(notes: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="placement"):
        insert_canaries(notes, make_canaries(), seed=0, placement="middle")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.text(alphabet=st.sampled_from("ab \n."), min_size=1, max_size=40),
        min_size=6,
        max_size=12,
    ),
    seed=st.integers(0, 2**32),
)
def test_insertion_only_adds_one_line(texts: list[str], seed: int) -> None:
    """Removing the canary's line recovers the original text exactly."""
    canaries = make_canaries(repetitions=(1, 2), per_repetition=1, held_out=1, seed=seed)
    records = [{"text": t, "id": str(i)} for i, t in enumerate(texts)]
    out = insert_canaries(records, canaries, seed=seed)
    for original, new in zip(records, out, strict=True):
        hits = [c for c in canaries if c.text in new["text"]]
        if not hits:
            assert new == original
            continue
        text = new["text"]
        at = text.index(hits[0].text)
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        candidates = {text[:start] + text[end + 1 :], text[: max(start - 1, 0)] + text[end:]}
        assert original["text"] in candidates
        assert new["id"] == original["id"]


# --- candidate secrets -------------------------------------------------------------------------


def test_candidates_are_distinct_valid_and_deterministic() -> None:
    secrets = candidate_secrets(5000, seed=1)
    assert len(secrets) == len(set(secrets)) == 5000
    assert all(SECRET_RE.fullmatch(s) for s in secrets)
    assert secrets == candidate_secrets(5000, seed=1)
    assert set(secrets).isdisjoint(candidate_secrets(5000, seed=2))
    assert candidate_secrets(0, seed=1) == []


def test_candidates_respect_exclude() -> None:
    canaries = make_canaries()
    excluded = {c.secret for c in canaries} | set(candidate_secrets(300, seed=7))
    secrets = candidate_secrets(300, seed=7, exclude=excluded)
    assert len(secrets) == 300
    assert excluded.isdisjoint(secrets)


def test_candidates_reject_impossible_requests() -> None:
    with pytest.raises(ValueError):
        candidate_secrets(-1, seed=0)
    with pytest.raises(ValueError):
        candidate_secrets(SECRET_SPACE_SIZE + 1, seed=0)


# --- persistence -------------------------------------------------------------------------------


def test_json_round_trip(tmp_path) -> None:
    canaries = make_canaries(seed=8)
    path = tmp_path / "nested" / "canaries.json"
    save_canaries(canaries, path)
    assert load_canaries(path) == canaries
    payload = json.loads(path.read_text())
    assert payload["secret_format"] == SECRET_FORMAT
    assert len(payload["canaries"]) == len(canaries)
    assert [p.name for p in path.parent.iterdir()] == ["canaries.json"]


def test_load_rejects_other_formats_and_malformed_files(tmp_path) -> None:
    path = tmp_path / "c.json"
    save_canaries(make_canaries(), path)
    payload = json.loads(path.read_text())
    payload["secret_format"] = "dddd"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="secret format"):
        load_canaries(path)
    path.write_text(json.dumps({"secret_format": SECRET_FORMAT, "canaries": [{"id": "x"}]}))
    with pytest.raises(ValueError, match="malformed"):
        load_canaries(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError):
        load_canaries(path)


def _characters(texts, add_special_tokens=True):
    """A tokenizer whose tokens are characters: lengths are easy to place by hand."""
    assert not add_special_tokens
    return {"input_ids": [list(text) for text in texts]}


def test_canaries_past_the_truncation_are_counted_as_never_trained():
    canary = Canary("canary-r2-01", "MRN 1: ", "123 456 789", 2)
    held_out = Canary("canary-r0-01", "MRN 2: ", "987 654 321", 0)
    early = "Addendum: MRN 1: 123 456 789.\nlong note " + "x" * 200
    late = "x" * 200 + "\nAddendum: MRN 1: 123 456 789."
    texts = [early, late, "an ordinary note"]
    secret_end = early.index("123 456 789") + 11  # characters = tokens here; +1 for bos
    counts = trained_occurrences([canary, held_out], texts, _characters, secret_end + 1)
    assert counts == {"canary-r2-01": 1}  # the late copy is cut; held-out ones are not planted
    assert trained_occurrences([canary], texts, _characters, secret_end) == {"canary-r2-01": 0}
    assert trained_occurrences([canary], texts, _characters, len(late) + 1) == {"canary-r2-01": 2}


def test_attack_stage_counts_and_warns_of_canaries_training_never_saw(capsys):
    """The attack stage reports planted against trained occurrences, and warns (before its
    long attacks) when some copies lie past base.max_length; the warning holds no text."""
    from privtune.stages.attack import _canary_coverage

    canary = Canary("canary-r2-01", "MRN 1: ", "123 456 789", 2)
    early = "Addendum: MRN 1: 123 456 789.\nlong note " + "x" * 200
    late = "x" * 200 + "\nAddendum: MRN 1: 123 456 789."
    train = [{"text": early}, {"text": late}, {"text": "an ordinary note"}]
    whole = _canary_coverage([canary], train, _characters, len(late) + 1)
    assert whole == {"canary_occurrences_planted": 2.0, "canary_occurrences_trained": 2.0}
    assert capsys.readouterr().err == ""
    cut = _canary_coverage([canary], train, _characters, 64)
    assert cut == {"canary_occurrences_planted": 2.0, "canary_occurrences_trained": 1.0}
    warning = capsys.readouterr().err
    assert "1 of 2 planted canary occurrences lie past base.max_length = 64" in warning
    assert "123 456 789" not in warning and "MRN" not in warning
