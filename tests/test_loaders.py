"""User corpora: JSONL, CSV and datasets directories, and clear errors for bad ones."""

import json

import datasets
import pytest

from privtune.data.loaders import load_records
from privtune.errors import DataError

ROWS = [{"text": "first note", "label": 1}, {"text": "second note", "label": 0}]


def test_jsonl_csv_and_datasets_dir_load_the_same_texts(tmp_path):
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    csv = tmp_path / "notes.csv"
    csv.write_text('text,label\nfirst note,1\n"second note",0\n')
    ds_dir = tmp_path / "notes_ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(ds_dir))
    dict_dir = tmp_path / "notes_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(dict_dir))
    for source in (jsonl, csv, ds_dir, dict_dir):
        assert [r["text"] for r in load_records(source)] == ["first note", "second note"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", '{"body": "x"}\n', "no `text` column"),
        ("b.jsonl", '{"text": "ok"}\n{broken\n', "line 2 is not valid JSON"),
        # a quote never closed is named so (it was "Invalid control character": the line break)
        ("h.jsonl", '{"text": "secret text}\r\n', "(Unterminated string starting at column 10)"),
        ("c.jsonl", "", "empty"),
        ("d.csv", "body\nsecret text\n", "no `text` column"),
        ("e.csv", "", "empty"),
        ("f.jsonl", '{"text": ""}\n', "empty or non-string"),
        ("g.parquet", "x", "unsupported file type"),
        # half an emoji's surrogate pair: read fine, then prepare's UTF-8 write failed (exit 5)
        ("i.jsonl", '{"text": "secret text \\ud83d"}\n', "record 1's `text` has half of a"),
        ("j.json", '[{"text": "secret text \\udc00"}]', "at character 12: not Unicode text"),
        # json.loads' ValueError for an integer over Python's digit limit (was exit 5)
        ("k.jsonl", '{"text": "secret text", "n": ' + "9" * 5000 + "}\n", "line 1 holds a number"),
    ],
)
def test_bad_files_give_errors_naming_the_problem_without_record_text(
    tmp_path, name, content, message
):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert message in str(err.value)
    assert "Fix:" in str(err.value)
    assert "secret text" not in str(err.value)


def test_a_csv_without_a_header_row_is_refused_without_echoing_its_first_record(tmp_path):
    # csv.DictReader takes the first row for the header: here that row is a patient's record
    path = tmp_path / "notes.csv"
    path.write_text("Patient John Doe, 45, HIV positive\nPatient Jane Roe, 51, diabetic\n")
    with pytest.raises(DataError) as err:
        load_records(path)
    # the file's own path is named by design; pytest numbers it (pytest-45/ held "45")
    message = str(err.value).replace(str(path), "<path>")
    assert "no `text` column in the header row (3 columns" in message
    assert "add one naming the columns" in message
    for cell in ("John Doe", "45", "HIV", "Jane"):
        assert cell not in message


def test_a_csv_header_without_the_column_gives_the_fix(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("id,body\n1,first note\n")
    with pytest.raises(DataError, match=r"prepare\.text_column") as err:
        load_records(path)
    assert "first note" not in str(err.value)


def test_missing_source_names_the_parameter(tmp_path):
    with pytest.raises(DataError, match=r"prepare\.source"):
        load_records(tmp_path / "nope.jsonl")


def test_datasets_dir_without_text_column(tmp_path):
    ds_dir = tmp_path / "bad_ds"
    datasets.Dataset.from_list([{"body": "x"}]).save_to_disk(str(ds_dir))
    with pytest.raises(DataError, match="no `text` column"):
        load_records(ds_dir)


@pytest.mark.parametrize("name", ["notes.jsonl", "notes.csv"])
def test_bad_encoding_names_the_line_and_byte_offset(tmp_path, name):
    path = tmp_path / name
    head = b'{"text": "first note"}\n' if name.endswith("jsonl") else b"text\nfirst note\n"
    bad = b'{"text": "caf\xe9 secret"}\n' if name.endswith("jsonl") else b"caf\xe9 secret\n"
    path.write_bytes(head + bad)
    with pytest.raises(DataError) as err:
        load_records(path)
    message, offset = str(err.value), len(head) + bad.index(b"\xe9")
    line = head.count(b"\n") + 1
    assert f"line {line}, byte offset {offset}" in message
    assert "UTF-8" in message and "secret" not in message


@pytest.mark.parametrize("name", ["notes.jsonl", "notes.csv"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name):
    """Excel's "CSV UTF-8" (and some editors) start the file with U+FEFF; the first column is
    still `id`, and a bad byte after it is still located in the file's own bytes."""
    bom = b"\xef\xbb\xbf"
    path = tmp_path / name
    good = [b'{"id": "a", "text": "first note"}\n', b"id,text\na,first note\n"]
    path.write_bytes(bom + good[name.endswith("csv")])
    assert load_records(path, id_column="id") == [{"text": "first note", "id": "a"}]
    bad = [b'{"text": "caf\xe9"}\n', b"text\ncaf\xe9\n"][name.endswith("csv")]
    path.write_bytes(bom + bad)
    offset = (bom + bad).index(b"\xe9")
    with pytest.raises(DataError, match=f"byte offset {offset}"):
        load_records(path)


@pytest.mark.parametrize("name", ["notes.jsonl", "notes.csv"])
def test_a_record_over_the_limit_is_refused_naming_the_parameter(tmp_path, name):
    path = tmp_path / name
    long = "secret " * 30
    if name.endswith("jsonl"):
        path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": long}) + "\n")
    else:
        path.write_text(f"text\nshort\n{long}\n")
    with pytest.raises(DataError, match=r"prepare\.max_record_chars = 100") as err:
        load_records(path, max_chars=100)
    assert "secret" not in str(err.value)
    assert len(load_records(path, max_chars=1000)) == 2


def test_csv_field_over_the_csv_modules_limit_is_named(tmp_path):
    """Python's csv refuses fields over 128 KB with its own error; ours names the limit."""
    path = tmp_path / "notes.csv"
    path.write_text("text\n" + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"record 1 \(line 2\) has a field over the limit"):
        load_records(path)
    assert len(load_records(path, max_chars=300_000)[0]["text"]) == 200_000


@pytest.mark.parametrize(
    "content",
    [
        'id,text\n1,"a note\n2,"the next note"\n3,"a third"\n',  # the quote runs on
        'id,text\n1,"a note" and more\n2,"the next note"\n',  # text after a closing quote
        'id,text\n1,"secret text\n',  # never closed
    ],
)
def test_a_csv_with_a_stray_quote_is_refused_not_merged_into_one_record(tmp_path, content):
    """Python's csv reads a stray quote as a field that runs on through the next lines: notes
    silently merged into one. strict mode makes it an error naming the record."""
    path = tmp_path / "notes.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"not valid CSV at record \d") as err:
        load_records(path)
    assert "secret text" not in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.parametrize(
    ("content", "found"),
    [
        # the opening quote forgotten: the note's comma splits it, the rest would be dropped
        ('id,text\n1,"a note"\n2,secret text, age 90. Seen by N79563."\n', 3),
        ('id,text,ward\n1,"a note",a\n2,"secret text"\n', 2),  # a line cut short
    ],
)
def test_a_csv_row_with_another_number_of_fields_than_its_header_is_refused(
    tmp_path, content, found
):
    """csv.DictReader files extra fields under None and fills missing ones with None: a note
    with an unquoted comma would load cut short, silently."""
    path = tmp_path / "notes.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"record 2 \(line 3\) has {found} fields") as err:
        load_records(path)
    assert "secret text" not in str(err.value) and "quote every field" in str(err.value)


def test_a_csv_with_blank_trailing_header_cells_loads(tmp_path):
    """Excel writes a header's empty trailing cells as `,,`: repeated (empty) names, which a
    dict merges; every row has as many fields, so it loads as before."""
    path = tmp_path / "notes.csv"
    path.write_text('id,text,,\n1,"a note, with a comma",,\n\n2,second note,,\n')
    assert [r["text"] for r in load_records(path)] == ["a note, with a comma", "second note"]


def test_a_json_array_file_loads_and_a_bad_one_names_the_element(tmp_path):
    path = tmp_path / "notes.json"
    path.write_text(json.dumps(ROWS, indent=1))
    assert [r["text"] for r in load_records(path)] == ["first note", "second note"]
    path.write_text(json.dumps([ROWS[0], "secret text"]))
    with pytest.raises(DataError, match="element 2 of the array is not a JSON object") as err:
        load_records(path)
    assert "secret text" not in str(err.value)
    path.write_text('[{"text": "secret text"},')
    with pytest.raises(DataError, match=r"line 1 is not valid JSON \(Expecting value at col"):
        load_records(path)
    lines = tmp_path / "lines.json"  # a .json of JSON lines still reads as JSONL
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert len(load_records(lines)) == 2


def test_json_errors_say_where_once(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "secret\ttext"}\n')  # a raw tab: an invalid control character
    with pytest.raises(DataError) as err:
        load_records(path)
    assert "Invalid control character at column" in str(err.value)
    assert "at at" not in str(err.value) and "secret" not in str(err.value)


def test_an_empty_id_is_named_as_empty_not_as_a_repeat(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"id": "a", "text": "one"}, {"id": None, "text": "two"}, {"id": " ", "text": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"record 2 has an empty `id`") as err:
        load_records(path, id_column="id")
    assert "prepare.id_column" in str(err.value)


def test_a_datasetdict_without_train_split_names_its_splits(tmp_path):
    both = datasets.DatasetDict(
        {"validation": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)}
    )
    both.save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError, match=r"splits \['test', 'validation'\] without a `train`"):
        load_records(tmp_path / "both")
    one = datasets.DatasetDict({"notes": datasets.Dataset.from_list(ROWS)})
    one.save_to_disk(str(tmp_path / "one"))
    assert len(load_records(tmp_path / "one")) == 2  # a single split is the corpus


def test_half_a_surrogate_pair_in_an_id_or_group_is_refused_by_field(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"text": "a", "mrn": "MRN-7\\ud83d", "pid": "P1"}\n')
    with pytest.raises(DataError, match=r"`mrn` has half of a UTF-16 .* not Unicode an id") as err:
        load_records(path, id_column="mrn")
    assert "MRN-7" not in str(err.value)
    path.write_text('{"text": "a", "pid": "P\\udc001"}\n')
    with pytest.raises(DataError, match=r"`pid` has half of a UTF-16"):
        load_records(path, group_column="pid")


@pytest.mark.parametrize("header", ["note_id,body,body", "body,note_id,body"])
def test_a_header_naming_a_read_column_twice_is_refused(tmp_path, header):
    """csv's rows as dicts keep the last of two `body` cells: the model would train on a triage
    comment (or the ids) in place of the note, with no error."""
    path = tmp_path / "notes.csv"
    path.write_text(f"{header}\nn1,Patient seen for cough,triage comment 1\n")
    with pytest.raises(DataError, match=r"names `body` 2 times \(columns [12], 3\)") as err:
        load_records(path, text_column="body", id_column="note_id")
    assert "cough" not in str(err.value) and "triage" not in str(err.value)
    path.write_text("note_id,body,extra,extra\nn1,Patient seen for cough,a,b\n")  # not read
    assert load_records(path, text_column="body") == [{"text": "Patient seen for cough"}]


@pytest.mark.parametrize("header", ["note_id, patient, body", "Note_ID,Patient,Body"])
def test_a_column_named_but_for_case_or_spaces_is_pointed_at(tmp_path, header):
    path = tmp_path / "notes.csv"
    path.write_text(f"{header}\nn1,P1,Patient seen for cough\n")
    with pytest.raises(
        DataError, match=r"no `body` column; ' ?[bB]ody' differs from it only"
    ) as err:
        load_records(path, text_column="body")
    assert "prepare.text_column to" in str(err.value) and "cough" not in str(err.value)


@pytest.mark.parametrize("name", ["notes.csv", "notes.jsonl"])
@pytest.mark.parametrize(
    ("bom", "encoding"),
    [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xff\xfe\x00\x00", "utf-32-le")],
)
def test_a_utf16_or_utf32_file_is_named_with_the_right_fix(tmp_path, name, bom, encoding):
    """Excel's "Unicode Text" and PowerShell's `>` write UTF-16 with a byte-order mark; the
    generic fix (latin1 to UTF-8) would turn it into text full of NUL characters."""
    path = tmp_path / name
    body = "text\nRenée, MRN 4411\n" if name.endswith("csv") else '{"text": "Renée, MRN 4411"}\n'
    path.write_bytes(bom + body.encode(encoding))
    family = encoding[:6]
    with pytest.raises(DataError, match=f"{family.upper()} text, not UTF-8") as err:
        load_records(path)
    assert f"iconv -f {family} -t utf-8" in str(err.value) and "Ren" not in str(err.value)
    assert "CSV UTF-8" in str(err.value)


@pytest.mark.parametrize(
    ("value", "kind"),
    [(1.0, "a float"), (True, "a boolean"), (["P1"], "an array"), ({"a": 1}, "an object")],
)  # fmt: skip
def test_an_id_or_group_of_another_json_type_is_refused_by_type(tmp_path, value, kind):
    path = tmp_path / "notes.jsonl"
    for column in ("rid", "pt"):
        rows = [{"rid": "n1", "pt": "P1", "text": "a"}, {"rid": "n2", "pt": "P2", "text": "b"}]
        rows[1][column] = value
        path.write_text("\n".join(json.dumps(r) for r in rows))
        with pytest.raises(DataError, match=f"record 2 has `{column}` as {kind}"):
            load_records(path, id_column="rid", group_column="pt")


def test_integer_ids_load_and_ids_are_compared_without_surrounding_spaces(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"rid": 17, "text": "a"}, {"rid": "n2", "text": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert [r["id"] for r in load_records(path, id_column="rid")] == ["17", "n2"]
    rows.append({"rid": "n2 ", "text": "c"})  # the same id as n2, as "P1 " is patient P1
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="record 3 repeats an id"):
        load_records(path, id_column="rid")


@pytest.mark.parametrize("name", ["notes.csv", "notes.jsonl"])
def test_a_bad_record_is_named_with_the_line_it_starts_on(tmp_path, name):
    """A record's error names its line, as the field-count errors do: in a CSV a quoted note
    may span lines, and a JSONL may have blank ones, so record 3 is not line 4."""
    path = tmp_path / name
    if name.endswith("csv"):
        path.write_text('id,text\na,"first note,\nover two lines"\nb,second\n\nc,\n')
    else:
        path.write_text(
            '{"id": "a", "text": "first"}\n\n{"id": "b", "text": "second"}\n'
            '{"id": "c", "text": ""}\n'
        )
    line = 6 if name.endswith("csv") else 4
    match = f"record 3 has an empty or non-string `text`, at line {line}"
    with pytest.raises(DataError, match=match):
        load_records(path, id_column="id")
