"""Each kind of bad input stops curation with a message naming the defect and where it is, and
leaves no dataset version behind."""

from __future__ import annotations

import json

import pytest

from llmops import storage
from llmops.data import stages
from llmops.data.records import DataQualityError
from llmops.data.validation import DataValidationError
from tests.datagen import good_records, write_jsonl

pytestmark = pytest.mark.model


def _no_version_written(settings) -> bool:
    dataset = storage.join(settings.datasets_uri(), settings.data.dataset_name)
    return not [c for c in storage.list_dir(dataset) if not c.startswith(".")]


def _curate(settings, raw, **overrides):
    data = settings.data.model_copy(update={"raw_uri": str(raw), **overrides})
    return stages.curate(settings, data)


def test_good_input_publishes_a_version_and_rerun_writes_nothing(settings, good_raw):
    first = _curate(settings, good_raw)
    assert first["created"]
    assert sum(first["counts"].values()) == 40
    manifest = storage.read_json(first["manifest_uri"])
    assert manifest["validation"]["success"] is True
    assert storage.exists(manifest["validation"]["data_docs_uri"])
    assert manifest["source_uris"] == [storage.to_uri(str(good_raw))]
    second = _curate(settings, good_raw)
    assert second["version"] == first["version"] and not second["created"]


def test_missing_file(settings, tmp_path):
    with pytest.raises(DataQualityError, match=r"raw data not found: .*nope\.jsonl"):
        _curate(settings, tmp_path / "nope.jsonl")
    assert _no_version_written(settings)


def test_empty_file(settings, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataQualityError, match=r"empty\.jsonl: the file is empty"):
        _curate(settings, tmp_path / "empty.jsonl")
    assert _no_version_written(settings)


def test_truncated_json_line(settings, tmp_path):
    raw = write_jsonl(tmp_path / "cut.jsonl", good_records(10))
    raw.write_bytes(raw.read_bytes()[:-25])
    with pytest.raises(DataQualityError, match=r"cut\.jsonl line 10, column \d+: invalid JSON .*truncated"):
        _curate(settings, raw)
    assert _no_version_written(settings)


def test_non_utf8_file(settings, tmp_path):
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataQualityError, match=r"latin1\.jsonl line 2, byte column 16: not valid UTF-8 \(byte 0xe9\)"):
        _curate(settings, raw)
    assert _no_version_written(settings)


def test_missing_required_columns(settings, tmp_path):
    raw = tmp_path / "cols.csv"
    raw.write_text("question,answer\nwhat?,that\n")
    with pytest.raises(
        DataQualityError,
        match=r"missing required column\(s\) 'response', 'prompt or instruction' "
        r"\(found: answer, question\)",
    ):
        _curate(settings, raw)
    assert _no_version_written(settings)


def test_all_responses_empty(settings, tmp_path):
    raw = write_jsonl(tmp_path / "noanswers.jsonl", [dict(r, response="  ") for r in good_records(8)])
    with pytest.raises(
        DataQualityError, match=r"all 8 responses are empty, e\.g\. .*noanswers\.jsonl:1 \(id=rec-000\)"
    ):
        _curate(settings, raw)
    assert _no_version_written(settings)


def test_file_of_duplicates_only(settings, tmp_path):
    record = good_records(1)[0]
    raw = write_jsonl(tmp_path / "dups.jsonl", [dict(record, id=f"d{i}") for i in range(12)])
    with pytest.raises(DataQualityError, match=r"all 12 records are duplicates of one record \(.*dups\.jsonl:1"):
        _curate(settings, raw)
    assert _no_version_written(settings)


def test_too_many_over_length_records(settings, tmp_path):
    long = [dict(r, response=r["response"] + " More detail follows." * 40) for r in good_records(20)]
    raw = write_jsonl(tmp_path / "long.jsonl", long)
    with pytest.raises(DataQualityError, match=r"too many over-length records: 20 of 20 \(100%\) exceed max_tokens=64"):
        _curate(settings, raw, max_tokens=64)
    assert _no_version_written(settings)


def test_pii_that_survives_scrubbing_fails_validation(settings, tmp_path):
    records = good_records()
    records[5]["response"] = "Write to jane.doe@example.com for the details."
    raw = write_jsonl(tmp_path / "pii.jsonl", records)
    with pytest.raises(DataValidationError) as info:
        _curate(settings, raw, scrub_pii=False)
    message = str(info.value)
    assert "expect_column_values_to_not_match_regex_list(column=response)" in message
    assert "PII left in responses after scrubbing" in message
    assert "jane.doe@example.com" in message and "rec-005" in message
    assert storage.exists(info.value.outcome.data_docs_uri)
    assert _no_version_written(settings)


def test_train_test_leakage_fails_validation(settings, tmp_path):
    records = [dict(r, split="train") for r in good_records(30)]
    for r in records[:6]:
        r["split"] = "validation"
    for r in records[6:12]:
        r["split"] = "test"
    leaked = dict(records[20], id="leak", split="test", response="A different answer to the same question.")
    raw = write_jsonl(tmp_path / "leak.jsonl", [*records, leaked])
    with pytest.raises(DataValidationError) as info:
        _curate(settings, raw)
    assert "train/test leakage" in str(info.value)
    assert "leak" in json.dumps(info.value.outcome.failed)
    assert _no_version_written(settings)
