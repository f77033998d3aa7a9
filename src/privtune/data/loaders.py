"""Load a user's own corpus: JSONL, CSV, or a `datasets` directory, each with a `text` column.

Errors name the file and the line, never the record's content (it may be private).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from privtune.errors import DataError

TEXT_COLUMN = "text"


def _check_rows(rows: list[dict], source: str) -> list[dict]:
    if not rows:
        raise DataError(source, "the dataset is empty", "provide at least one record")
    for index, row in enumerate(rows):
        if TEXT_COLUMN not in row:
            raise DataError(
                source,
                f"record {index + 1} has no `{TEXT_COLUMN}` column (columns: {sorted(row)})",
                f"rename the column holding the document text to `{TEXT_COLUMN}`",
            )
        if not isinstance(row[TEXT_COLUMN], str) or not row[TEXT_COLUMN].strip():
            raise DataError(
                source,
                f"record {index + 1} has an empty or non-string `{TEXT_COLUMN}`",
                "remove empty records or fill them with text",
            )
    return rows


def load_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    str(path),
                    f"line {number} is not valid JSON ({err.msg} at column {err.colno})",
                    "write one JSON object per line",
                ) from None
            if not isinstance(row, dict):
                raise DataError(str(path), f"line {number} is not a JSON object", "use {...}")
            rows.append(row)
    return _check_rows(rows, str(path))


def load_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or TEXT_COLUMN not in reader.fieldnames:
            if reader.fieldnames is None:
                raise DataError(str(path), "the dataset is empty", "provide a header and rows")
            raise DataError(
                str(path),
                f"no `{TEXT_COLUMN}` column in the header (columns: {reader.fieldnames})",
                f"rename the column holding the document text to `{TEXT_COLUMN}`",
            )
        rows = [dict(row) for row in reader]
    return _check_rows(rows, str(path))


def load_datasets_dir(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(
            str(path),
            f"not a dataset saved with save_to_disk ({type(err).__name__})",
            "point prepare.source at a .jsonl/.csv file or a save_to_disk directory",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if TEXT_COLUMN not in ds.column_names:
        raise DataError(
            str(path),
            f"no `{TEXT_COLUMN}` column (columns: {ds.column_names})",
            f"rename the column holding the document text to `{TEXT_COLUMN}`",
        )
    return _check_rows([dict(row) for row in ds], str(path))


def load_records(source: str | Path) -> list[dict]:
    """Load records from a JSONL/CSV file or a datasets directory; each has a `text` field."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            "prepare.source",
            f"'{path}' does not exist",
            "set prepare.source to `generator` or to an existing .jsonl/.csv/dataset directory",
        )
    if path.is_dir():
        return load_datasets_dir(path)
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        return load_jsonl(path)
    if suffix == ".csv":
        return load_csv(path)
    raise DataError(
        "prepare.source",
        f"unsupported file type '{suffix}'",
        "use a .jsonl or .csv file with a `text` column, or a save_to_disk directory",
    )
