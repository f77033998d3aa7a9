"""Load a user's own corpus: JSONL, CSV, or a `datasets` directory, each with a `text` column.

Errors name the file and the line, never the record's content (it may be private).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from privtune.config import MAX_RECORD_CHARS
from privtune.errors import DataError

TEXT_COLUMN = "text"


def _not_utf8(path: Path, line: int, offset: int, byte: int) -> DataError:
    """Where the bad bytes are (line and byte offset), never what the record says."""
    return DataError(
        str(path),
        f"not UTF-8 text at line {line}, byte offset {offset} (byte 0x{byte:02x})",
        "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`), then rerun",
    )


def _too_long(source: str, where: str, length: int | None, limit: int) -> DataError:
    size = f"{length:,} characters" if length is not None else "a field over the limit"
    return DataError(
        source,
        f"{where} has {size}, more than prepare.max_record_chars = {limit:,}",
        "split long documents into records of at most that many characters, or raise "
        "prepare.max_record_chars (tokenizing and memory grow with it; records are truncated "
        "to base.max_length tokens anyway)",
    )


def _check_rows(rows: list[dict], source: str, max_chars: int = MAX_RECORD_CHARS) -> list[dict]:
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
        if len(row[TEXT_COLUMN]) > max_chars:
            raise _too_long(source, f"record {index + 1}", len(row[TEXT_COLUMN]), max_chars)
    return rows


def load_jsonl(path: Path, max_chars: int = MAX_RECORD_CHARS) -> list[dict]:
    rows = []
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, number, offset + err.start, raw[err.start]) from None
            offset += len(raw)
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
    return _check_rows(rows, str(path), max_chars)


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field size limit is process-wide: set for one read, then put back."""
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def load_csv(path: Path, max_chars: int = MAX_RECORD_CHARS) -> list[dict]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _not_utf8(path, line, err.start, data[err.start]) from None
    with _csv_field_limit(max_chars), io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        rows: list[dict] = []
        try:
            rows.extend(dict(row) for row in reader)
        except csv.Error as err:
            # the reader has not counted the line it failed on yet
            where = f"record {len(rows) + 1} (line {reader.line_num + 1})"
            if "field larger than field limit" in str(err):
                raise _too_long(str(path), where, None, max_chars) from None
            raise DataError(
                str(path),
                f"not valid CSV at {where} ({type(err).__name__})",
                "write RFC 4180 CSV: a header with a `text` column, quoted fields",
            ) from None
        if reader.fieldnames is None or TEXT_COLUMN not in reader.fieldnames:
            if reader.fieldnames is None:
                raise DataError(str(path), "the dataset is empty", "provide a header and rows")
            raise DataError(
                str(path),
                f"no `{TEXT_COLUMN}` column in the header (columns: {reader.fieldnames})",
                f"rename the column holding the document text to `{TEXT_COLUMN}`",
            )
    return _check_rows(rows, str(path), max_chars)


def load_datasets_dir(path: Path, max_chars: int = MAX_RECORD_CHARS) -> list[dict]:
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
    return _check_rows([dict(row) for row in ds], str(path), max_chars)


def load_records(source: str | Path, max_chars: int = MAX_RECORD_CHARS) -> list[dict]:
    """Load records from a JSONL/CSV file or a datasets directory; each has a `text` field of
    at most ``max_chars`` characters (prepare.max_record_chars)."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            "prepare.source",
            f"'{path}' does not exist",
            "set prepare.source to `generator` or to an existing .jsonl/.csv/dataset directory",
        )
    try:
        if path.is_dir():
            return load_datasets_dir(path, max_chars)
        suffix = path.suffix.lower()
        if suffix in {".jsonl", ".json"}:
            return load_jsonl(path, max_chars)
        if suffix == ".csv":
            return load_csv(path, max_chars)
    except OSError as err:  # unreadable: permissions, a broken mount
        raise DataError(
            str(path),
            f"cannot be read ({err.strerror or type(err).__name__})",
            "check the path and its permissions",
        ) from None
    raise DataError(
        "prepare.source",
        f"unsupported file type '{suffix}'",
        "use a .jsonl or .csv file with a `text` column, or a save_to_disk directory",
    )
