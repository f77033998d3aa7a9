"""Scan what a project publishes (MLflow store, registry included, reports, metrics, plots,
logs) for private text: every canary's secret and a sample of private record lines."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

PUBLISHED = ("reports", "metrics", "plots")
TEXT_SUFFIXES = {".json", ".txt", ".yaml", ".yml", ".md", ".csv", ".log", ".py", ""}


def private_probes(project: Path, records: int = 100, seed: int = 0) -> list[str]:
    """Every canary secret (planted, held out and audit) and ``records`` identifying lines (with
    digits: names, MRNs, dates, labs; generic template lines would also match generated text)
    of as many random private records, train and test."""
    prepared = project / "data" / "prepared"
    probes = []
    for name in ("canaries.json", "audit_canaries.json"):
        if (prepared / name).is_file():
            probes += [c["secret"] for c in json.loads((prepared / name).read_text())["canaries"]]
    texts = [
        json.loads(line)["text"]
        for split in ("train", "test")
        for line in (prepared / f"{split}.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rng = random.Random(seed)
    for text in rng.sample(texts, min(records, len(texts))):
        lines = [s for s in text.splitlines() if len(s) > 25 and any(c.isdigit() for c in s)]
        if lines:
            probes.append(rng.choice(lines))
    return probes


def _store_text(db: Path) -> str:
    """Every text cell of every table: runs, params, tags, metrics, experiments, registered
    models, versions and their tags and descriptions, logged models."""
    with sqlite3.connect(db) as connection:
        tables = [
            r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return "\n".join(
            str(row)
            for table in tables
            for row in connection.execute(f'SELECT * FROM "{table}"')  # noqa: S608
        )


def find_leaks(project: Path, probes: list[str], logs: tuple[str, ...] = ()) -> list[str]:
    """The probes found in the project's MLflow store (its database and every text artifact),
    its reports, metrics and plots, and in ``logs``. Empty when nothing leaked."""
    blobs = list(logs)
    if (project / "mlflow.db").is_file():
        blobs.append(_store_text(project / "mlflow.db"))
    for folder in ("mlruns", *PUBLISHED):
        for path in (project / folder).rglob("*") if (project / folder).is_dir() else ():
            if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "MLmodel"):
                blobs.append(path.read_text(errors="ignore"))
    text = "\n".join(blobs)
    return [probe for probe in probes if probe in text]
