"""Stage `prepare`: private splits with canaries planted, a public split, and a data card."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from privtune import io
from privtune.config import PREPARED_DIR, Params
from privtune.errors import ConfigError, DataError


def _split(records: list[dict], params: Params) -> tuple[list[dict], list[dict], list[dict]]:
    p = params.prepare
    rows = list(records)
    random.Random(p.seed).shuffle(rows)
    n_valid = max(1, round(p.valid_fraction * len(rows)))
    n_test = max(1, round(p.test_fraction * len(rows)))
    if len(rows) - n_valid - n_test < 2:
        raise DataError(
            "prepare.source",
            f"only {len(rows)} records: too few for train/valid/test splits",
            "provide more records or lower prepare.valid_fraction / prepare.test_fraction",
        )
    return rows[n_valid + n_test :], rows[:n_valid], rows[n_valid : n_valid + n_test]


def prepare(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Private train/valid/test splits with canaries planted, a public split, a data card."""
    from privtune.data.canaries import (
        audit_records,
        insert_canaries,
        make_audit_canaries,
        make_canaries,
        save_canaries,
    )
    from privtune.data.generator import generate_private_notes, generate_public_corpus
    from privtune.data.loaders import load_records

    p = params.prepare
    if p.source == "generator":
        records = generate_private_notes(p.n_private, p.seed)
    else:
        source = Path(p.source)
        records = load_records(
            source if source.is_absolute() else root / source, p.max_record_chars
        )
    train, valid, test = _split(records, params)
    canaries = make_canaries(
        p.canaries.repetitions, p.canaries.per_repetition, p.canaries.held_out, seed=p.seed
    )
    needed = sum(c.repetitions for c in canaries)
    if needed > len(train):
        raise ConfigError(
            "prepare.canaries",
            f"planting needs {needed} training records but the train split has {len(train)}",
            "lower prepare.canaries.per_repetition or the repetitions, or add records",
        )
    train = insert_canaries(train, canaries, seed=p.seed)
    audit = []
    if p.canaries.audit:
        # Standalone records (one per IN canary): adding or removing one is exactly the
        # add/remove neighbouring relation the DP guarantee is stated for.
        audit = make_audit_canaries(p.canaries.audit, seed=p.seed, avoid=canaries)
        train = train + [{**r, "kind": "audit_canary"} for r in audit_records(audit)]
    public = [{"text": t} for t in generate_public_corpus(p.n_public, p.seed + 1)]

    with io.atomic_dir(root / PREPARED_DIR) as out:
        for name, rows in [("public", public), ("train", train), ("valid", valid), ("test", test)]:
            io.write_jsonl(out / f"{name}.jsonl", rows)
        save_canaries(canaries, out / "canaries.json")
        save_canaries(audit, out / "audit_canaries.json")
        digest = hashlib.sha256()
        for name in ["public", "train", "valid", "test"]:
            digest.update((out / f"{name}.jsonl").read_bytes())
        card = {
            "source": p.source,
            "seed": p.seed,
            "counts": {
                "public": len(public),
                "train": len(train),
                "valid": len(valid),
                "test": len(test),
            },
            "canaries": {
                "planted": sum(c.repetitions > 0 for c in canaries),
                "held_out": sum(c.repetitions == 0 for c in canaries),
                "repetitions": sorted({c.repetitions for c in canaries if c.repetitions}),
                "records_with_canary": needed,
                "audit": len(audit),
                "audit_included": sum(c.repetitions for c in audit),
            },
            "mean_characters": {
                name: round(sum(len(r["text"]) for r in rows) / len(rows), 1)
                for name, rows in [("public", public), ("train", train), ("test", test)]
            },
            "content_sha256": digest.hexdigest(),
        }
        io.write_json(out / "data_card.json", card)
    return card
