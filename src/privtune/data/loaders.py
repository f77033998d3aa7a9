"""Load a user's own corpus: JSONL, CSV, or a `datasets` directory, with a text column
(`prepare.text_column`, default `text`) and optionally an id column (`prepare.id_column`).

Records come back as ``{"text": ...}`` (plus ``"id"``): the other columns stay behind, since the
prepared splits need only the text and every copied field is more private data to carry.
Errors name the file, the line and the columns present, never a record's content.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from privtune.errors import DataError

TEXT_COLUMN = "text"


def _missing_column(source: str, column: str, present: list[str], which: str = "text") -> DataError:
    key = "prepare.text_column" if which == "text" else "prepare.id_column"
    return DataError(
        source,
        f"no `{column}` column (columns: {sorted(str(c) for c in present)})",
        f"set {key} to the column holding the {'document text' if which == 'text' else 'ids'}"
        + (f", or rename that column to `{column}`" if which == "text" else ""),
    )


def _check_rows(
    rows: list[dict], source: str, text_column: str = TEXT_COLUMN, id_column: str | None = None
) -> list[dict]:
    """Each row reduced to its text (and id): present, non-empty strings; ids unique."""
    if not rows:
        raise DataError(source, "the dataset is empty", "provide at least one record")
    out = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        for column, which in [(text_column, "text"), (id_column, "id")]:
            if column is not None and column not in row:
                err = _missing_column(source, column, list(row), which)
                raise DataError(err.field, f"record {index + 1} has {err.problem}", err.fix)
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                source,
                f"record {index + 1} has an empty or non-string `{text_column}`",
                "remove empty records or fill them with text",
            )
        record = {"text": text}
        if id_column is not None:
            record["id"] = str(row[id_column])
            if record["id"] in seen:  # the value itself may identify a patient: not shown
                raise DataError(
                    source,
                    f"record {index + 1} repeats an id of an earlier record (`{id_column}`)",
                    f"make `{id_column}` unique, or set prepare.id_column to null",
                )
            seen.add(record["id"])
        out.append(record)
    return out


def load_jsonl(
    path: Path, text_column: str = TEXT_COLUMN, id_column: str | None = None
) -> list[dict]:
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
    return _check_rows(rows, str(path), text_column, id_column)


def load_csv(
    path: Path, text_column: str = TEXT_COLUMN, id_column: str | None = None
) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DataError(str(path), "the dataset is empty", "provide a header and rows")
        for column, which in [(text_column, "text"), (id_column, "id")]:
            if column is not None and column not in reader.fieldnames:
                raise _missing_column(str(path), column, list(reader.fieldnames), which)
        rows = [dict(row) for row in reader]
    return _check_rows(rows, str(path), text_column, id_column)


def load_datasets_dir(
    path: Path, text_column: str = TEXT_COLUMN, id_column: str | None = None
) -> list[dict]:
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
    for column, which in [(text_column, "text"), (id_column, "id")]:
        if column is not None and column not in ds.column_names:
            raise _missing_column(str(path), column, list(ds.column_names), which)
    return _check_rows([dict(row) for row in ds], str(path), text_column, id_column)


def load_records(
    source: str | Path, text_column: str = TEXT_COLUMN, id_column: str | None = None
) -> list[dict]:
    """Records of a JSONL/CSV file or a datasets directory as ``{"text"[, "id"]}`` dicts."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            "prepare.source",
            f"'{path}' does not exist",
            "set prepare.source to an existing .jsonl/.csv file or dataset directory (or to "
            "src/privtune/data/generator.py for the generated notes)",
        )
    if path.is_dir():
        return load_datasets_dir(path, text_column, id_column)
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        return load_jsonl(path, text_column, id_column)
    if suffix == ".csv":
        return load_csv(path, text_column, id_column)
    raise DataError(
        "prepare.source",
        f"unsupported file type '{suffix}'",
        "use a .jsonl or .csv file (its text column named by prepare.text_column), or a "
        "save_to_disk directory",
    )
