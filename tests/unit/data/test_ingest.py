"""``read_raw``: every supported format reads, and every defect is reported with where it is."""

from __future__ import annotations

import json

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import mock_aws

from llmops.data.ingest import read_raw
from llmops.data.records import ORIGIN, DataQualityError


def _jsonl(*values) -> str:
    return "".join(json.dumps(v) + "\n" for v in values)


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _error(path_or_uri) -> str:
    with pytest.raises(DataQualityError) as info:
        read_raw(str(path_or_uri))
    return str(info.value)


# --- good inputs -----------------------------------------------------------------------------


def test_jsonl_records_keep_their_physical_line(tmp_path):
    path = _write(
        tmp_path,
        "raw.jsonl",
        json.dumps({"id": 7, "instruction": "What is a tuple?", "response": "An immutable sequence."})
        + "\n\n"
        + json.dumps(
            {"id": "b", "instruction": "Explain zip.", "context": "zip(*iterables)", "response": "It pairs items."}
        )
        + "\n",
    )
    uri = f"file://{path}"
    records = read_raw(str(path))
    assert records == [
        {"id": "7", "instruction": "What is a tuple?", "response": "An immutable sequence.", ORIGIN: f"{uri}:1"},
        {
            "id": "b",
            "instruction": "Explain zip.",
            "context": "zip(*iterables)",
            "response": "It pairs items.",
            ORIGIN: f"{uri}:3",
        },
    ]


def test_plain_path_and_file_uri_read_the_same_records(tmp_path):
    path = _write(tmp_path, "raw.ndjson", _jsonl({"prompt": "p", "response": "r"}))
    by_path = read_raw(str(path))
    by_uri = read_raw(f"file://{path}")
    assert by_path == by_uri
    assert by_uri[0][ORIGIN] == f"file://{path}:1"


def test_csv_reads_with_physical_line_numbers(tmp_path):
    path = _write(
        tmp_path,
        "raw.csv",
        'id,instruction,context,response\n1,Explain map.,,"Applies a function\nto every item."\n\n'
        '2,Explain filter.,"filter(f, xs)",Keeps items where f is true.\n',
    )
    uri = f"file://{path}"
    first, second = read_raw(str(path))
    assert first["id"] == "1"
    assert first["response"] == "Applies a function\nto every item."
    assert first[ORIGIN] in {f"{uri}:2", f"{uri}:3"}
    # The second record is on physical line 5 (after a two-line record and a blank line), not row 2.
    assert second == {
        "id": "2",
        "instruction": "Explain filter.",
        "context": "filter(f, xs)",
        "response": "Keeps items where f is true.",
        ORIGIN: f"{uri}:5",
    }


def test_parquet_reads_with_row_numbers_and_text_ids(tmp_path):
    path = tmp_path / "raw.parquet"
    table = pa.table({"id": [10, 11], "prompt": ["What is a set?", "What is a dict?"], "response": ["Unique.", "Map."]})
    pq.write_table(table, path)
    uri = f"file://{path}"
    records = read_raw(f"file://{path}")
    assert records == [
        {"id": "10", "prompt": "What is a set?", "response": "Unique.", ORIGIN: f"{uri}:row 1"},
        {"id": "11", "prompt": "What is a dict?", "response": "Map.", ORIGIN: f"{uri}:row 2"},
    ]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = _write(tmp_path, "bom.jsonl", bom + _jsonl({"prompt": "a", "response": "b"}).encode())
    csv_file = _write(tmp_path, "bom.csv", bom + b"prompt,response\na,b\n")
    assert [r["prompt"] for r in read_raw(str(jsonl))] == ["a"]
    assert [r["prompt"] for r in read_raw(str(csv_file))] == ["a"]


def test_a_long_csv_field_reads_and_the_reader_limit_is_restored(tmp_path):
    import csv

    limit = csv.field_size_limit()
    long = "word " * 40_000  # 200,000 characters: over the csv module's default limit
    path = _write(tmp_path, "long.csv", f'prompt,response\nSay it all.,"{long}"\n')
    (record,) = read_raw(str(path))
    assert record["response"] == long
    assert csv.field_size_limit() == limit


# --- bad inputs --------------------------------------------------------------------------------


def test_missing_file_names_the_uri(tmp_path):
    path = tmp_path / "absent.jsonl"
    message = _error(path)
    assert "not found" in message
    assert f"file://{path}" in message


@pytest.mark.parametrize("content", [b"", b" \n\t\n"], ids=["zero-bytes", "whitespace-only"])
def test_empty_file_is_rejected(tmp_path, content):
    path = _write(tmp_path, "raw.jsonl", content)
    message = _error(path)
    assert f"file://{path}" in message
    assert "empty" in message
    assert f"({len(content)} bytes)" in message


def test_truncated_last_line_names_line_column_and_truncation(tmp_path):
    last = '{"prompt": "c", "resp'
    path = _write(
        tmp_path, "raw.jsonl", _jsonl({"prompt": "a", "response": "b"}, {"prompt": "x", "response": "y"}) + last
    )
    message = _error(path)
    column = last.index('"resp') + 1
    assert f"line 3, column {column}:" in message
    assert "truncated" in message


def test_invalid_json_mid_file_names_exact_line_and_column(tmp_path):
    bad = '{"prompt": "c" "response": "d"}'
    path = _write(
        tmp_path,
        "raw.jsonl",
        _jsonl({"prompt": "a", "response": "b"}) + bad + "\n" + _jsonl({"prompt": "e", "response": "f"}),
    )
    message = _error(path)
    column = bad.index('"response') + 1
    assert f"file://{path} line 2, column {column}:" in message
    assert "invalid JSON" in message
    assert "truncated" not in message


def test_invalid_json_mid_file_without_final_newline_is_not_called_truncated(tmp_path):
    bad = '{"prompt": "c" "response": "d"}'
    good = json.dumps({"prompt": "e", "response": "f"})
    path = _write(tmp_path, "raw.jsonl", _jsonl({"prompt": "a", "response": "b"}) + bad + "\n" + good)
    message = _error(path)
    assert "line 2, column" in message
    assert "truncated" not in message


def test_non_utf8_bytes_name_line_and_byte_column(tmp_path):
    second = b'{"prompt": "caf\xe9", "response": "r"}\n'
    path = _write(tmp_path, "raw.jsonl", _jsonl({"prompt": "a", "response": "b"}).encode() + second)
    message = _error(path)
    column = second.index(b"\xe9") + 1
    assert f"line 2, byte column {column}:" in message
    assert "UTF-8" in message
    assert "0xe9" in message


def test_json_line_that_is_a_list_is_rejected(tmp_path):
    path = _write(tmp_path, "raw.jsonl", _jsonl({"prompt": "a", "response": "b"}, ["prompt", "response"]))
    message = _error(path)
    assert f"file://{path} line 2:" in message
    assert "JSON object" in message
    assert "list" in message


@pytest.mark.parametrize(
    ("rows", "missing", "found"),
    [
        ([{"id": "1", "prompt": "a"}], "'response'", "id, prompt"),
        ([{"context": "c", "response": "r"}], "'prompt or instruction'", "context, response"),
    ],
    ids=["no-response", "no-prompt"],
)
def test_missing_required_columns_are_named_with_the_found_ones(tmp_path, rows, missing, found):
    path = _write(tmp_path, "raw.jsonl", _jsonl(*rows))
    message = _error(path)
    assert f"missing required column(s) {missing}" in message
    assert f"(found: {found})" in message


def test_wrong_type_names_field_and_line(tmp_path):
    path = _write(
        tmp_path,
        "raw.jsonl",
        _jsonl({"prompt": "a", "response": "b"}, {"prompt": "What is 6*7?", "response": 42}),
    )
    message = _error(path)
    assert f"file://{path}:2: field 'response' must be text, got int 42" in message
    assert f"file://{path}:1" not in message


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _write(
        tmp_path,
        "raw.jsonl",
        _jsonl(
            {"id": "q1", "prompt": "a", "response": "b"},
            {"id": "q2", "prompt": "c", "response": "d"},
            {"id": "q1", "prompt": "e", "response": "f"},
        ),
    )
    uri = f"file://{path}"
    message = _error(path)
    assert f"{uri}:3: id 'q1' already used at {uri}:1" in message


def test_integer_and_text_ids_that_are_equal_are_duplicates(tmp_path):
    path = _write(
        tmp_path,
        "raw.jsonl",
        _jsonl({"id": 5, "prompt": "a", "response": "b"}, {"id": "5", "prompt": "c", "response": "d"}),
    )
    message = _error(path)
    assert f"file://{path}:2: id '5' already used at file://{path}:1" in message


def test_unknown_extension_is_rejected_even_when_the_file_is_valid(tmp_path):
    path = _write(tmp_path, "raw.txt", _jsonl({"prompt": "a", "response": "b"}))
    message = _error(path)
    assert "unknown raw format" in message
    assert "raw.txt" in message
    for suffix in (".csv", ".jsonl", ".parquet"):
        assert suffix in message


def test_csv_row_with_extra_fields_names_its_line(tmp_path):
    path = _write(tmp_path, "raw.csv", "prompt,response\na,b\nc,d,e\n")
    message = _error(path)
    assert f"file://{path} line 3: 1 more field(s) than the header's 2" in message


def test_corrupt_parquet_is_rejected(tmp_path):
    path = _write(tmp_path, "raw.parquet", b"PAR1 this is not really parquet")
    message = _error(path)
    assert f"file://{path}: not a readable Parquet file" in message


# --- S3 ------------------------------------------------------------------------------------------


@pytest.fixture
def s3_client(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="raw-data")
        yield client


def test_s3_object_reads_through_the_given_client(s3_client):
    s3_client.put_object(
        Bucket="raw-data",
        Key="in/qa.jsonl",
        Body=_jsonl({"id": 1, "instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"}).encode(),
    )
    records = read_raw("s3://raw-data/in/qa.jsonl", {"client": s3_client})
    assert [r[ORIGIN] for r in records] == ["s3://raw-data/in/qa.jsonl:1", "s3://raw-data/in/qa.jsonl:2"]
    assert records[0]["id"] == "1"
    assert records[1]["instruction"] == "c"


def test_missing_s3_key_is_not_found_naming_the_uri(s3_client):
    with pytest.raises(DataQualityError) as info:
        read_raw("s3://raw-data/in/absent.jsonl", {"client": s3_client})
    assert "not found" in str(info.value)
    assert "s3://raw-data/in/absent.jsonl" in str(info.value)
