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
        ("c.jsonl", "", "empty"),
        ("d.csv", "body\nsecret text\n", "no `text` column"),
        ("e.csv", "", "empty"),
        ("f.jsonl", '{"text": ""}\n', "empty or non-string"),
        ("g.parquet", "x", "unsupported file type"),
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
    message = str(err.value)
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
