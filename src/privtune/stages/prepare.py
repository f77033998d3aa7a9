"""Stage `prepare`: private splits with canaries planted, a public split, and a data card.

The private records are split five ways: `attack` (attack.members records held out of
everything, the membership attack's non-members: records no stage trains, validates or
evaluates on), then train / valid / test by the fractions of what is left. With
`prepare.group_column` (a patient id) a patient's records never straddle two splits, and
`prepare.max_records_per_group` bounds how many notes one patient has, in every split.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import GENERATOR_SOURCE, PREPARED_DIR, Params
from privtune.data.loaders import GROUP_NUMBER
from privtune.errors import ConfigError, DataError
from privtune.progress import notice

SPLITS = ("public", "train", "valid", "test", "attack")


def _split_sizes(n_records: int, members: int, params: Params) -> tuple[int, int, int]:
    """(valid, test, train) sizes left by an attack split of ``members`` records."""
    rest = n_records - members
    n_valid = max(1, round(params.prepare.valid_fraction * rest))
    n_test = max(1, round(params.prepare.test_fraction * rest))
    return n_valid, n_test, rest - n_valid - n_test


def _affords(n_records: int, members: int, planted: int, params: Params) -> bool:
    """Whether ``n_records`` split with ``members`` attack members leave a train split that
    holds the planted canaries' records and as many records as there are members."""
    train = _split_sizes(n_records, members, params)[2]
    return train >= 2 and train - planted >= members


def _most_members(n_records: int, planted: int, params: Params) -> int:
    """The largest attack.members these records afford: the attack split comes out of the
    records before train, so each member more is a training record less (0: none fits)."""
    for members in range(n_records // 2, 0, -1):
        if _affords(n_records, members, planted, params):
            return members
    return 0


def records_for_members(members: int, params: Params) -> int:
    """The fewest records whose splits afford ``members`` attack members (and as many
    non-members) with the canaries planted: the inverse of _most_members."""
    planted, n = _planted(params), 2 * members
    while not _affords(n, members, planted, params):
        n += 1
    return n


def _planted(params: Params) -> int:
    """Training records that will carry a canary (each canary once per repetition)."""
    c = params.prepare.canaries
    return c.per_repetition * sum(c.repetitions)


def _most_grouped_members(records: list[dict], planted: int, params: Params) -> int:
    """_most_members for records split by patient: found by splitting them (the cuts move to
    patient boundaries), binary search then down to one that fits (0: none)."""

    def fits(members: int) -> bool:
        attack = params.attack.model_copy(update={"members": members})
        trial = params.model_copy(update={"attack": attack})
        train = _cut(records, trial)[0]["train"]
        return len(train) >= 2 and len(train) - planted >= members

    low, high = 0, len(records) // 2
    while low < high:  # the largest that fits, were fitting monotone in members
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    while low > 0 and not fits(low):  # a patient boundary may break monotony by a little
        low -= 1
    return low


def _fewer_members_fix(records: list[dict], params: Params, left_by_cap: int = 0) -> str:
    planted, n_records = _planted(params), len(records)
    if params.prepare.group_column is not None:
        most = _most_grouped_members(records, planted, params)
    else:
        most = _most_members(n_records, planted, params)
    least = next(m.ge for m in type(params.attack).model_fields["members"].metadata)
    canaries = f"or plant fewer canaries (prepare.canaries: {planted} records carry one)"
    capped = f", or {cap_fix(left_by_cap)}" if left_by_cap else ""
    if most >= least:
        return (
            f"lower attack.members to at most {most} (these {n_records} records' most), "
            f"{canaries}{capped}"
        )
    return (
        f"provide more records: {n_records} afford {most} members at most, under "
        f"attack.members' minimum of {least}; {canaries}{capped}"
    )


def cap_fix(left_by_cap: int) -> str:
    """The other way to more records, when the cap of a patient's notes left some out."""
    return (
        f"keep more notes a patient (prepare.max_records_per_group left out {left_by_cap} "
        "records; a patient's privacy bound grows with it)"
    )


def _grouped(rows: list[dict]) -> list[dict]:
    """``rows`` with each group's records together, groups in the order they first appear."""
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row)
    return [row for members in by_group.values() for row in members]


def _group_end(rows: list[dict], n: int) -> int:
    """The first cut at or after ``n`` that no group straddles (``n`` without groups)."""
    if not 0 < n < len(rows) or "group" not in rows[0]:
        return n
    while n < len(rows) and rows[n]["group"] == rows[n - 1]["group"]:
        n += 1
    return n


def _cut(records: list[dict], params: Params) -> tuple[dict[str, list[dict]], int]:
    """attack (attack.members records), then valid / test / train of the rest, unchecked; and
    how many records were left out because their patient's other records went to the attack
    split (with groups, every split takes whole patients)."""
    p, n_attack = params.prepare, params.attack.members
    rows = list(records)
    generator = random.Random(p.seed)
    generator.shuffle(rows)
    grouped = p.group_column is not None
    if grouped:  # patients in a random order, each one's records together
        rows = _grouped(rows)
    # the attack split is exactly attack.members records: the rest of its last patient's
    # records are used nowhere (they would be members of train, or test notes of a patient
    # the attack holds out)
    cut = _group_end(rows, n_attack)
    attack, rows, dropped = rows[:n_attack], rows[cut:], cut - n_attack
    n_valid, n_test, _ = _split_sizes(len(records) - dropped, n_attack, params)
    n_valid = _group_end(rows, n_valid)
    n_test = _group_end(rows, n_valid + n_test) - n_valid
    splits = {
        "train": rows[n_valid + n_test :],
        "valid": rows[:n_valid],
        "test": rows[n_valid : n_valid + n_test],
        "attack": attack,
    }
    if grouped:  # a patient's notes apart again: no run of one patient's notes in a file,
        for rows in splits.values():  # and the first N of a split are N patients' notes
            generator.shuffle(rows)
    return splits, dropped


def _split(
    records: list[dict], params: Params, left_by_cap: int = 0
) -> tuple[dict[str, list[dict]], int]:
    """`_cut`, refused when it leaves fewer than two training records."""
    splits, dropped = _cut(records, params)
    if len(splits["train"]) < 2:
        raise DataError(  # the fix says what the cap left out (_fewer_members_fix)
            "prepare.source",
            f"only {len(records)} record{'' if len(records) == 1 else 's'}: too few for an "
            f"attack split of attack.members = {params.attack.members} and train/valid/test "
            "splits",
            _fewer_members_fix(records, params, left_by_cap)
            + ", or lower prepare.valid_fraction / prepare.test_fraction",
        )
    return splits, dropped


def _capped(records: list[dict], cap: int | None, seed: int) -> tuple[list[dict], int]:
    """At most ``cap`` records of each group, chosen at random (seeded), in their order; and
    how many were left out."""
    if cap is None:
        return records, 0
    by_group: dict[str, list[int]] = {}
    for index, row in enumerate(records):
        by_group.setdefault(row["group"], []).append(index)
    generator = random.Random(seed)
    kept = sorted(
        i
        for indices in by_group.values()
        for i in generator.sample(indices, min(cap, len(indices)))
    )
    return [records[i] for i in kept], len(records) - len(kept)


def _group_summary(
    splits: dict[str, list[dict]], params: Params, dropped_at_split: int, dropped_by_cap: int
) -> dict[str, Any] | None:
    """The data card's counts of patients (groups): never an id."""
    p = params.prepare
    if p.group_column is None:
        return None
    train_counts = Counter(row["group"] for row in splits["train"])
    return {
        "column": p.group_column,
        "max_records_per_group": p.max_records_per_group,
        "groups": {name: len({row["group"] for row in rows}) for name, rows in splits.items()},
        "train_records_per_group_max": max(train_counts.values()),
        "train_records_per_group_mean": round(len(splits["train"]) / len(train_counts), 2),
        "records_left_out": {"attack_split_boundary": dropped_at_split, "cap": dropped_by_cap},
    }


def is_generator(source: str) -> bool:
    """Whether prepare.source names the embedded generator (its module path)."""
    return Path(source).as_posix().removeprefix("./") == GENERATOR_SOURCE


def source_path(params: Params, root: Path) -> Path | None:
    """The user's corpus (prepare.source, relative to the project), None for the generated
    notes; a path that does not exist is the error naming prepare.source."""
    from privtune.data.loaders import existing_source

    if is_generator(params.prepare.source):
        return None
    source = Path(params.prepare.source)
    return existing_source(source if source.is_absolute() else root / source)


def _members_available(
    train: list[dict], planted: int, records: list[dict], params: Params, left_by_cap: int = 0
) -> None:
    """The membership attack needs attack.members canary-free training records: say so here,
    before any training, rather than attacking with fewer."""
    clean = len(train) - planted
    if clean < params.attack.members:
        raise ConfigError(
            "attack.members",
            f"{params.attack.members} members wanted but the train split has {clean} records "
            f"without a canary ({len(train)} records, {planted} with one)",
            _fewer_members_fix(records, params, left_by_cap),
        )


def _without_duplicates(records: list[dict]) -> tuple[list[dict], int]:
    """The records with exact repeats of an earlier record's text left out, and how many.

    Copied-forward notes are common in clinical corpora; split at random, one copy could train
    while another is a membership non-member or a test note."""
    seen: set[str] = set()
    kept = []
    for record in records:
        if record["text"] not in seen:
            seen.add(record["text"])
            kept.append(record)
    return kept, len(records) - len(kept)


@dataclass(frozen=True)
class Prepared:
    """What the prepare stage writes, built and checked in memory first."""

    splits: dict[str, list[dict]]  # SPLITS' records, canaries planted in train
    canaries: list  # the exposure canaries (planted and held out)
    audit: list  # the black-box audit's text canaries
    records_with_canary: int
    duplicates: int  # records left out as exact repeats of an earlier one
    groups: dict[str, Any] | None = None  # counts of patients (prepare.group_column)


def build(params: Params, root: Path = Path(".")) -> Prepared:
    """Every split, from the corpus (or the generator), with every check prepare makes
    (readable records, split sizes, room for the canaries and the attack's members) and
    nothing written: the stage writes it, and `privtune check` runs it alone."""
    from privtune.data.canaries import (
        audit_records,
        insert_canaries,
        make_audit_canaries,
        make_canaries,
    )
    from privtune.data.generator import generate_private_notes, generate_public_corpus
    from privtune.data.loaders import load_records

    p = params.prepare
    source = source_path(params, root)
    if source is None:
        if p.group_column is not None:
            raise ConfigError(
                "prepare.group_column",
                "the generated notes have no patient column (each is its own patient)",
                "set prepare.group_column to null, or prepare.source to your corpus",
            )
        records = generate_private_notes(p.n_private, p.seed)
    else:
        columns = (p.text_column, p.id_column, p.max_record_chars, p.group_column)
        records = load_records(source, *columns)
    records, duplicates = _without_duplicates(records)
    if duplicates:  # said before the split's checks: it may be why the corpus came up short
        notice(
            f"prepare: {duplicates} record(s) repeat an earlier record's text exactly and were "
            "left out (a copy in train and another among the attack's non-members or the test "
            "notes would make the attacks and the perplexity wrong)"
        )
    # every split keeps at most the cap of a patient's notes: the attack's members (train)
    # and non-members (the attack split) then come from one distribution
    records, left_by_cap = _capped(records, p.max_records_per_group, p.seed)
    splits, left_at_split = _split(records, params, left_by_cap)
    groups = _group_summary(splits, params, left_at_split, left_by_cap)
    if groups is not None:  # counted: the splits carry a patient number, never the id
        splits = _numbered(splits)
    train = splits["train"]
    canaries = make_canaries(
        p.canaries.repetitions,
        p.canaries.per_repetition,
        p.canaries.held_out,
        seed=p.seed,
        identifier=p.canaries.identifier,
    )
    needed = sum(c.repetitions for c in canaries)
    if needed > len(train):
        raise ConfigError(
            "prepare.canaries",
            f"planting needs {needed} training records but the train split has {len(train)}",
            "lower prepare.canaries.per_repetition or the repetitions, or add records",
        )
    _members_available(train, needed, records, params, left_by_cap)
    train = insert_canaries(train, canaries, seed=p.seed, max_offset=p.canaries.max_offset)
    audit = []
    if p.canaries.audit:
        # Standalone records (one per IN canary): adding or removing one is exactly the
        # add/remove neighbouring relation the DP guarantee is stated for.
        audit = make_audit_canaries(
            p.canaries.audit, seed=p.seed, avoid=canaries, identifier=p.canaries.identifier
        )
        included = [{**r, "kind": "audit_canary"} for r in audit_records(audit)]
        train = train + included
        share = len(included) / len(train)
        if share > 0.25:  # said by `privtune check` too: it runs this build
            notice(  # the audit's records would crowd the user's own out of each batch
                f"warning: prepare: the black-box audit's text canaries are {share:.0%} of the "
                "train split: with a corpus this small, lower prepare.canaries.audit (0: no "
                "text audit) so that most of each batch is your records"
            )
    public = [{"text": t} for t in generate_public_corpus(p.n_public, p.seed + 1)]
    written = {**splits, "train": train, "public": public}
    return Prepared(written, canaries, audit, needed, duplicates, groups)


def _numbered(splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The splits with each record's patient id replaced by a number (``GROUP_NUMBER``),
    given in the order patients first appear in the shuffled splits, so it says nothing of
    the id: the attacks' intervals resample patients by it."""
    numbers: dict[str, int] = {}
    return {
        name: [
            {**{k: v for k, v in r.items() if k != "group"},
             GROUP_NUMBER: numbers.setdefault(r["group"], len(numbers))}
            for r in rows
        ]
        for name, rows in splits.items()
    }  # fmt: skip


def prepare(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Private train/valid/test splits with canaries planted, a public split, a data card."""
    from privtune.data.canaries import save_canaries

    p = params.prepare
    built = build(params, root)
    written, canaries, audit, duplicates = (
        built.splits, built.canaries, built.audit, built.duplicates,
    )  # fmt: skip
    train, public = written["train"], written["public"]
    with io.atomic_dir(root / PREPARED_DIR) as out:
        for name in SPLITS:
            io.write_jsonl(out / f"{name}.jsonl", written[name])
        save_canaries(canaries, out / "canaries.json")
        save_canaries(audit, out / "audit_canaries.json")
        digest = hashlib.sha256()
        for name in SPLITS:
            digest.update((out / f"{name}.jsonl").read_bytes())
        card = {
            "source": p.source,
            "seed": p.seed,
            "counts": {name: len(written[name]) for name in SPLITS},
            "canaries": {
                "planted": sum(c.repetitions > 0 for c in canaries),
                "held_out": sum(c.repetitions == 0 for c in canaries),
                "repetitions": sorted({c.repetitions for c in canaries if c.repetitions}),
                "records_with_canary": built.records_with_canary,
                "audit": len(audit),
                "audit_included": sum(c.repetitions for c in audit),
            },
            "mean_characters": {
                name: round(sum(len(r["text"]) for r in rows) / len(rows), 1)
                for name, rows in [("public", public), ("train", train), ("test", written["test"])]
            },
            "duplicates_removed": duplicates,
            **({"groups": built.groups} if built.groups is not None else {}),
            "content_sha256": digest.hexdigest(),
        }
        io.write_json(out / "data_card.json", card)
    return card
