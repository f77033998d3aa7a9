"""Load a user's own corpus: JSONL (or a .json array), CSV, or a `datasets` directory, with a
text column (`prepare.text_column`, default `text`), optionally an id column
(`prepare.id_column`) and a group column (`prepare.group_column`: whose record it is, e.g. a
patient id).

Records come back as ``{"text": ...}`` (plus ``"id"``, ``"group"``): the other columns stay
behind, since the prepared splits need only the text and every copied field is more private
data to carry.
Errors name the file, the line and the columns present, never a record's content.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from privtune.config import MAX_RECORD_CHARS
from privtune.errors import DataError

TEXT_COLUMN = "text"
# A prepared record's patient, as a number prepare gives each patient (in a seeded random
# order: never derived from the id): what the attacks' intervals resample by.
GROUP_NUMBER = "group_number"


# Keys shown in a missing-column error: a few short names without digit runs. Others may be
# data: a .json object keyed by patient or note id (`to_json(orient="index")`) has ids as keys.
_SHOWN_KEYS, _SHOWN_KEY_CHARS = 20, 40
_ID_LIKE = re.compile(r"\d{3}")


def _column_names(present: list[str]) -> str | None:
    """The present names as the error may show them, or None when some may be data."""
    names = sorted(map(str, present))
    if len(names) > _SHOWN_KEYS or any(
        len(n) > _SHOWN_KEY_CHARS or _ID_LIKE.search(n) for n in names
    ):
        return None
    return str(names)


def _missing_column(
    source: str, column: str, present: list[str], which: str = "text", named: bool = True
) -> DataError:
    """`named`: the present names may be shown (when they look like names, not ids: see
    `_column_names`); a CSV's header row may be a record (a file without a header), so its
    cells are counted, never echoed, but for one that equals ``column`` save case and spaces
    (` Body`): it says nothing a record could."""
    key = f"prepare.{which}_column"
    held = {"text": "document text", "id": "ids", "group": "patient (group) ids"}[which]
    fix = f"set {key} to the column holding the {held}"
    if which == "text":
        fix += f", or rename that column to `{column}`"
    near = [
        n for n in map(str, present) if n != column and n.strip().casefold() == column.casefold()
    ]
    if near:  # it equals the name asked for but for case and spaces: nothing of a record
        return DataError(
            source,
            f"no `{column}` column; {near[0]!r} differs from it only in case or spaces",
            f"set {key} to {near[0]!r} exactly, or rename that column to `{column}`",
        )
    if named and (names := _column_names(present)) is not None:
        return DataError(source, f"no `{column}` column (columns: {names})", fix)
    if named:
        return DataError(
            source,
            f"no `{column}` column ({len(present)} keys; not shown, as some look like data: "
            "long, or with digits, as ids would be)",
            "each record must be one object whose keys are the columns (a .json array of "
            "them, or JSONL: one a line), not an object keyed by patient or note id; then " + fix,
        )
    return DataError(
        source,
        f"no `{column}` column in the header row ({len(present)} columns; their names are not "
        "shown, as the first row may be a record)",
        "if the first row is a note, the file has no header row: add one naming the columns "
        f"(e.g. `id,text`); otherwise {fix}",
    )


def _require_columns(
    source: str,
    present: list[str],
    text_column: str,
    id_column: str | None,
    record: int | None = None,
    named: bool = True,
    group_column: str | None = None,
) -> None:
    """The text column (and the id and group columns, when named) are among ``present``."""
    for column, which in [(text_column, "text"), (id_column, "id"), (group_column, "group")]:
        if column is not None and column not in present:
            err = _missing_column(source, column, present, which, named)
            if record is None:
                raise err
            raise DataError(err.field, f"record {record} has {err.problem}", err.fix)


def _require_unique_columns(source: str, header: list[str], used: tuple) -> None:
    """A column privtune reads is named once: with two `text` columns a record would take the
    last one's cells (a triage comment for the note), silently."""
    for column in dict.fromkeys(c for c in used if c is not None):
        places = [str(i + 1) for i, name in enumerate(header) if name == column]
        if len(places) > 1:
            raise DataError(
                source,
                f"the header row names `{column}` {len(places)} times (columns "
                f"{', '.join(places)})",
                f"rename the other columns, so that `{column}` names only the one to read",
            )


def _not_utf8(path: Path, line: int, offset: int, byte: int) -> DataError:
    """Where the bad bytes are (line and byte offset), never what the record says."""
    return DataError(
        str(path),
        f"not UTF-8 text at line {line}, byte offset {offset} (byte 0x{byte:02x})",
        "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`), then rerun",
    )


_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _refuse_other_unicode(path: Path, head: bytes) -> None:
    """A UTF-16 or UTF-32 file, known by its byte-order mark, named with its own fix (the
    generic one, from latin1, would make it text full of NULs)."""
    for mark, encoding in _OTHER_BOMS:  # UTF-32's marks first: they begin with UTF-16's
        if head.startswith(mark):
            name = encoding.upper()
            raise DataError(
                str(path),
                f"{name} text, not UTF-8 (it starts with a {name} byte-order mark, as Excel's "
                '"Unicode Text" and Windows PowerShell\'s `>` write)',
                f"re-encode the file as UTF-8 (`iconv -f {encoding} -t utf-8 in > out`); from "
                'Excel, save as "CSV UTF-8" instead (its Unicode Text is tab-separated)',
            )


def _read_utf8(path: Path) -> str:
    """The whole file as text, without a byte-order mark (Excel's "CSV UTF-8" starts with one,
    which would prefix the first column's name)."""
    data = path.read_bytes()
    _refuse_other_unicode(path, data[:4])
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = bom + err.start
        raise _not_utf8(path, data.count(b"\n", 0, at) + 1, at, data[at]) from None


def _too_long(source: str, where: str, length: int | None, limit: int) -> DataError:
    size = f"{length:,} characters" if length is not None else "a field over the limit"
    return DataError(
        source,
        f"{where} has {size}, more than prepare.max_record_chars = {limit:,}",
        "split long documents into records of at most that many characters, or raise "
        "prepare.max_record_chars (tokenizing and memory grow with it; records are truncated "
        "to base.max_length tokens anyway)",
    )


def _id_value(source: str, record: int, column: str, value: object) -> object:
    """An id or group value as JSON or a saved dataset may give it: a string or an integer (or
    null, refused as empty by the caller). A float (1.0 would not repeat 1), a boolean, an
    array, an object or anything else is refused by its type; the value is never shown."""
    if value is None or isinstance(value, str) or type(value) is int:
        return value
    kinds = {bool: "a boolean", float: "a float", list: "an array", dict: "an object"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    raise DataError(
        source,
        f"record {record} has `{column}` as {kind}",
        f"write every `{column}` as a string or an integer",
    )


def _check_rows(
    rows: list[dict],
    source: str,
    text_column: str = TEXT_COLUMN,
    id_column: str | None = None,
    max_chars: int = MAX_RECORD_CHARS,
    group_column: str | None = None,
    lines: list[int] | None = None,
) -> list[dict]:
    """Each row reduced to its text (and id, group): present, non-empty strings; ids unique.
    ``lines``: the line each row starts on (CSV, JSONL), added to a record's error."""
    if not rows:
        raise DataError(source, "the dataset is empty", "provide at least one record")
    out: list[dict] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        try:
            out.append(
                _checked_row(
                    row, index, source, text_column, id_column, max_chars, group_column, seen
                )
            )
        except DataError as err:
            if lines is None:
                raise
            raise DataError(err.field, f"{err.problem}, at line {lines[index]}", err.fix) from None
    return out


def _checked_row(
    row: dict,
    index: int,
    source: str,
    text_column: str,
    id_column: str | None,
    max_chars: int,
    group_column: str | None,
    seen: set[str],
) -> dict:
    """One row of `_check_rows` (``seen``: the ids so far, added to)."""
    _require_columns(
        source, list(row), text_column, id_column, record=index + 1, group_column=group_column
    )
    text = row[text_column]
    if not isinstance(text, str) or not text.strip():
        raise DataError(
            source,
            f"record {index + 1} has an empty or non-string `{text_column}`",
            "remove empty records or fill them with text",
        )
    if len(text) > max_chars:
        raise _too_long(source, f"record {index + 1}", len(text), max_chars)
    _require_unicode(source, index + 1, text_column, text)
    record = {"text": text}
    if id_column is not None:
        value = _id_value(source, index + 1, id_column, row[id_column])
        if value is None or not str(value).strip():
            raise DataError(
                source,
                f"record {index + 1} has an empty `{id_column}`",
                f"give every record an id in `{id_column}`, or set prepare.id_column to null",
            )
        record["id"] = str(value).strip()  # "n2 " is n2, as a group's id is
        _require_unicode(source, index + 1, id_column, record["id"], "an id")
        if record["id"] in seen:  # the value itself may identify a patient: not shown
            raise DataError(
                source,
                f"record {index + 1} repeats an id of an earlier record (`{id_column}`)",
                f"make `{id_column}` unique, or set prepare.id_column to null",
            )
        seen.add(record["id"])
    if group_column is not None:
        # "P1 " is P1: a stray space splits no patient in two
        value = _id_value(source, index + 1, group_column, row[group_column])
        group = "" if value is None else str(value).strip()
        if not group:  # the value is never shown
            raise DataError(
                source,
                f"record {index + 1} has an empty `{group_column}`",
                f"give every record the id of its patient (group) in `{group_column}`, "
                "or set prepare.group_column to null",
            )
        _require_unicode(source, index + 1, group_column, group, "an id")
        record["group"] = group
    return record


def _json_error(err: json.JSONDecodeError, where: str) -> str:
    """json's message and position, never the text around it (it may be a record)."""
    return f"{where} is not valid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"


def _json_number_error(path: Path, where: str) -> DataError:
    """The one ValueError json.loads raises besides a syntax error: an integer longer than
    Python's limit on converting digits (4,300), which is not a field of any corpus."""
    return DataError(
        str(path),
        f"{where} holds a number of more than 4,300 digits, which Python's JSON reader refuses",
        "remove that field or write it as a string",
    )


def _require_unicode(source: str, record: int, column: str, value: str, what: str = "text") -> None:
    """Refused here, by record and column: half a UTF-16 pair as a JSON escape ("\\ud83d"
    alone, from a tool that cut an emoji in two) decodes to a string no UTF-8 file can hold,
    so prepare's write would fail after reading."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            source,
            f"record {record}'s `{column}` has half of a UTF-16 surrogate pair (a \\ud800-"
            f"\\udfff escape without its other half) at character {err.start}: not Unicode {what}",
            "re-export the file from its source as UTF-8, or remove that escape",
        ) from None


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


def load_json_array(
    path: Path,
    text_column: str = TEXT_COLUMN,
    id_column: str | None = None,
    max_chars: int = MAX_RECORD_CHARS,
    group_column: str | None = None,
) -> list[dict]:
    """A .json file holding one array of objects (what json.dump of a list of records writes)."""
    text = _read_utf8(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        problem = _json_error(err, f"line {err.lineno}")
        raise DataError(str(path), problem, "write one JSON array of objects") from None
    except ValueError:
        raise _json_number_error(path, "the file") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            problem = f"element {index + 1} of the array is not a JSON object"
            raise DataError(str(path), problem, "make each element an object: {...}")
    return _check_rows(rows, str(path), text_column, id_column, max_chars, group_column)


def load_jsonl(
    path: Path,
    text_column: str = TEXT_COLUMN,
    id_column: str | None = None,
    max_chars: int = MAX_RECORD_CHARS,
    group_column: str | None = None,
) -> list[dict]:
    rows: list[dict] = []
    lines: list[int] = []  # where each record is
    offset = 0
    with open(path, "rb") as handle:
        _refuse_other_unicode(path, handle.read(4))
        handle.seek(0)
        for number, raw in enumerate(handle, start=1):
            bom = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[bom:].decode("utf-8")
            except UnicodeDecodeError as err:
                at = bom + err.start
                raise _not_utf8(path, number, offset + at, raw[at]) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:  # without its line break: an unclosed string is named so, not as a control
                row = json.loads(line.rstrip("\r\n"))  # character where it meets the break
            except json.JSONDecodeError as err:
                problem = _json_error(err, f"line {number}")
                raise DataError(str(path), problem, "write one JSON object per line") from None
            except ValueError:
                raise _json_number_error(path, f"line {number}") from None
            if not isinstance(row, dict):
                raise DataError(str(path), f"line {number} is not a JSON object", "use {...}")
            rows.append(row)
            lines.append(number)
    return _check_rows(rows, str(path), text_column, id_column, max_chars, group_column, lines)


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """csv's field size limit is process-wide: set for one read, then put back."""
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def load_csv(
    path: Path,
    text_column: str = TEXT_COLUMN,
    id_column: str | None = None,
    max_chars: int = MAX_RECORD_CHARS,
    group_column: str | None = None,
) -> list[dict]:
    """A CSV with a header row. A row of another number of fields than the header (a note
    with an unquoted comma: the rest of it would be dropped; a line cut short) is refused,
    not mended. csv.reader rather than DictReader: DictReader files extra fields under None
    and merges repeated header names (Excel's blank trailing cells), so it cannot count."""
    text = _read_utf8(path)
    header: list[str] | None = None
    rows: list[dict] = []
    lines: list[int] = []  # where each record starts (a quoted field may span lines)
    with _csv_field_limit(max_chars), io.StringIO(text, newline="") as handle:
        # strict: a stray quote is an error, not a field running on through the next notes
        reader = csv.reader(handle, strict=True)
        read = 0  # lines of the rows read whole: an error is in the record starting after them
        try:
            for fields in reader:
                start, read = read + 1, reader.line_num  # a quoted field may span lines
                if not fields:  # a blank line
                    continue
                if header is None:
                    header = fields
                    # with the text column found, the row is a header: its names may be shown
                    named = text_column in header
                    _require_columns(
                        str(path), header, text_column, id_column, None, named, group_column
                    )
                    _require_unique_columns(
                        str(path), header, (text_column, id_column, group_column)
                    )
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        str(path),
                        f"record {len(rows) + 1} (line {start}) has {len(fields)} "
                        f"fields, the header {len(header)}",
                        "quote every field that holds a comma, a quote or a line break "
                        '("...", a quote inside doubled: ""), as RFC 4180 CSV does',
                    )
                rows.append(dict(zip(header, fields, strict=True)))
                lines.append(start)
        except csv.Error as err:
            where = f"record {len(rows) + 1} (line {read + 1})"
            if "field larger than field limit" in str(err):
                raise _too_long(str(path), where, None, max_chars) from None
            raise DataError(
                str(path),
                # csv's messages name the rule broken, never a field's text
                f"not valid CSV at {where} ({err})",
                "write RFC 4180 CSV: a header naming the columns, quoted fields",
            ) from None
    if header is None:
        raise DataError(str(path), "the dataset is empty", "provide a header and rows")
    return _check_rows(rows, str(path), text_column, id_column, max_chars, group_column, lines)


def load_datasets_dir(
    path: Path,
    text_column: str = TEXT_COLUMN,
    id_column: str | None = None,
    max_chars: int = MAX_RECORD_CHARS,
    group_column: str | None = None,
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
        if "train" not in ds and len(ds) != 1:
            raise DataError(
                str(path),
                f"a DatasetDict of the splits {sorted(ds)} without a `train` split",
                "save the split that holds your corpus on its own (ds[name].save_to_disk(dir)) "
                "or name it train: prepare makes its own train/valid/test split",
            )
        ds = ds["train" if "train" in ds else next(iter(ds))]
    _require_columns(
        str(path), list(ds.column_names), text_column, id_column, group_column=group_column
    )
    return _check_rows(
        [dict(row) for row in ds], str(path), text_column, id_column, max_chars, group_column
    )


def existing_source(source: str | Path) -> Path:
    """``source`` (prepare.source's corpus) when it exists; else the error naming the field."""
    path = Path(source)
    if not path.exists():
        raise DataError(
            "prepare.source",
            f"'{path}' does not exist",
            "set prepare.source to an existing .jsonl/.csv file or dataset directory (or to "
            "src/privtune/data/generator.py for the generated notes)",
        )
    return path


def load_records(
    source: str | Path,
    text_column: str = TEXT_COLUMN,
    id_column: str | None = None,
    max_chars: int = MAX_RECORD_CHARS,
    group_column: str | None = None,
) -> list[dict]:
    """Records of a JSONL/CSV file or a datasets directory as ``{"text"[, "id"][, "group"]}``
    dicts, each text at most ``max_chars`` characters (prepare.max_record_chars)."""
    path = existing_source(source)
    columns = (text_column, id_column, max_chars, group_column)
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return load_datasets_dir(path, *columns)
        if suffix == ".json" and _starts_with_array(path):
            return load_json_array(path, *columns)
        if suffix in {".jsonl", ".json"}:
            return load_jsonl(path, *columns)
        if suffix == ".csv":
            return load_csv(path, *columns)
    except OSError as err:  # unreadable: permissions, a broken mount
        raise DataError(
            str(path),
            f"cannot be read ({err.strerror or type(err).__name__})",
            "check the path and its permissions",
        ) from None
    raise DataError(
        "prepare.source",
        f"unsupported file type '{suffix}'",
        "use a .jsonl or .csv file (its text column named by prepare.text_column), or a "
        "save_to_disk directory",
    )
