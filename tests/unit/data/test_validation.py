"""Great Expectations validation of a curated dataset: pass, each defect, and suite loading."""

from __future__ import annotations

import json
import os

import pytest

from llmops import storage
from llmops.data.records import SPLITS, DataQualityError
from llmops.data.validation import (
    EXPECTATIONS_DIR,
    DataValidationError,
    load_suite_definition,
    validate_records,
)
from serving.pii import PII_REGEX_LIST

SUITE = "curated_dataset"
PARAMS = {"max_tokens": 64, "min_records": 3, "pii_regex_list": PII_REGEX_LIST}
N_EXPECTATIONS = len(json.loads((EXPECTATIONS_DIR / f"{SUITE}.json").read_text(encoding="utf-8"))["expectations"])


def good_rows() -> list[dict]:
    """Four clean records per split; token counts include both limits (1 and max_tokens)."""
    rows = []
    for split in SPLITS:
        for i in range(4):
            rows.append(
                {
                    "id": f"{split}-{i}",
                    "prompt": f"How do I reverse a list in Python? ({split} case {i})",
                    "response": f"Call xs.reverse() or use xs[::-1]; example {i}.",
                    "source": "unit",
                    "split": split,
                    "n_tokens": [1, 20, 40, 64][i],
                    "prompt_splits": 1,
                    "meta": '{"license": "PSF"}' if i == 1 else None,
                }
            )
    return rows


def frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(
        rows, columns=["id", "prompt", "response", "source", "split", "n_tokens", "prompt_splits", "meta"]
    )


def _set(rows, rid, **values):
    for row in rows:
        if row["id"] == rid:
            row.update(values)
            return rows
    raise AssertionError(rid)


# name -> (rows, expectation type, column, defect text, things the message must show)
DEFECTS = {
    "empty_response": (
        lambda: _set(good_rows(), "train-2", response=""),
        "expect_column_value_lengths_to_be_between",
        "response",
        "empty response",
        ["1 unexpected", "record ids: ['train-2']"],
    ),
    "over_length": (
        lambda: _set(good_rows(), "validation-1", n_tokens=65),
        "expect_column_values_to_be_between",
        "n_tokens",
        "record longer than data.max_tokens",
        ["1 unexpected", "example values: [65]", "record ids: ['validation-1']"],
    ),
    "leakage": (
        lambda: _set(_set(good_rows(), "train-0", prompt_splits=2), "test-0", prompt_splits=2),
        "expect_column_values_to_be_in_set",
        "prompt_splits",
        "train/test leakage: the same prompt appears in more than one split",
        ["2 unexpected", "example values: [2, 2]", "'train-0'", "'test-0'"],
    ),
    "pii": (
        lambda: _set(good_rows(), "test-3", response="Write to jane.doe@example.com for access."),
        "expect_column_values_to_not_match_regex_list",
        "response",
        "PII left in responses after scrubbing",
        ["1 unexpected", "jane.doe@example.com", "record ids: ['test-3']"],
    ),
    "pii_in_metadata": (
        lambda: _set(good_rows(), "train-1", meta='{"reviewer": "jane.doe@example.com"}'),
        "expect_column_values_to_not_match_regex_list",
        "meta",
        "PII left in metadata after scrubbing",
        ["1 unexpected", "record ids: ['train-1']"],
    ),
    "pii_in_id": (
        lambda: _set(good_rows(), "test-0", id="jane.doe@example.com"),
        "expect_column_values_to_not_match_regex_list",
        "id",
        "PII in record ids (an id is never scrubbed: give records ids without personal data)",
        ["1 unexpected", "record ids: ['jane.doe@example.com']"],
    ),
    "missing_split": (
        lambda: [r for r in good_rows() if r["split"] != "test"],
        "expect_column_distinct_values_to_contain_set",
        "split",
        "a split is empty",
        [],
    ),
    "duplicate_ids": (
        lambda: _set(good_rows(), "validation-3", id="train-1"),
        "expect_column_values_to_be_unique",
        "id",
        "duplicate record ids",
        ["2 unexpected", "'train-1'"],
    ),
}


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    out = tmp_path_factory.mktemp("valid")
    uri = storage.to_uri(str(out))
    return out, uri, validate_records(frame(good_rows()), SUITE, PARAMS, uri)


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """Each defect validated once, on its own, in a frame that is otherwise clean."""
    results = {}
    for name, (make_rows, *_rest) in DEFECTS.items():
        out = tmp_path_factory.mktemp(name)
        uri = storage.to_uri(str(out))
        rows = make_rows()
        with pytest.raises(DataValidationError) as info:
            validate_records(frame(rows), SUITE, PARAMS, uri)
        results[name] = (out, uri, len(rows), info.value)
    return results


def test_clean_dataset_passes_and_saves_result_and_data_docs(passing):
    out, uri, outcome = passing
    summary = outcome.summary()
    assert summary["success"] is True
    assert summary["suite"] == SUITE
    assert summary["evaluated_expectations"] == N_EXPECTATIONS == 17
    assert summary["failed_expectations"] == 0
    assert outcome.failed == []
    assert summary["result_uri"] == f"{uri}/result.json"
    assert summary["data_docs_uri"] == f"{uri}/data_docs/index.html"

    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert result["success"] is True
    assert result["statistics"]["evaluated_expectations"] == N_EXPECTATIONS
    assert result["statistics"]["unsuccessful_expectations"] == 0
    index = out / "data_docs" / "index.html"
    assert index.is_file() and "<html" in index.read_text(encoding="utf-8").lower()


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_defect_fails_with_a_message_naming_it(failures, defect):
    out, uri, n_rows, exc = failures[defect]
    _rows, expectation, column, defect_text, details = DEFECTS[defect]
    message = str(exc)

    assert isinstance(exc, DataQualityError)
    assert exc.outcome.success is False
    assert [f["expectation"] for f in exc.outcome.failed] == [expectation]
    assert exc.outcome.evaluated == N_EXPECTATIONS
    assert message.startswith(
        f"Great Expectations suite {SUITE!r} failed 1 of {N_EXPECTATIONS} expectations on {n_rows} records:"
    )
    failure_line = next(line for line in message.splitlines() if line.startswith(f"  - {expectation}"))
    assert f"(column={column})" in failure_line
    assert f"[{defect_text}]" in failure_line
    for detail in details:
        assert detail in message
    assert f"Validation result: {uri}/result.json" in message
    assert f"Data Docs: {uri}/data_docs/index.html" in message

    # Saved on failure too.
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert result["success"] is False
    assert [r["expectation_config"]["type"] for r in result["results"] if not r["success"]] == [expectation]
    assert (out / "data_docs" / "index.html").is_file()
    assert exc.outcome.summary()["failed_expectations"] == 1


def test_failure_reports_counts_example_values_and_ids_in_the_outcome(failures):
    exc = failures["pii"][3]
    (failure,) = exc.outcome.failed
    assert failure["unexpected_count"] == 1
    assert failure["unexpected_percent"] == pytest.approx(100 / 12)
    assert failure["examples"] == ["Write to jane.doe@example.com for access."]
    assert failure["example_ids"] == ["test-3"]
    assert "regex_list" not in failure["kwargs"]  # the long pattern list stays out of the message
    assert "(?<!" not in str(exc)

    (dup,) = failures["duplicate_ids"][3].outcome.failed
    assert dup["unexpected_count"] == 2
    assert sorted(dup["examples"]) == ["train-1", "train-1"]


def test_missing_split_message_names_the_missing_split(failures):
    lines = str(failures["missing_split"][3]).splitlines()
    head = "  - expect_column_distinct_values_to_contain_set"
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    # The failure's own text: its head after the defect, plus the indented detail lines under it.
    text = lines[start].split("]", 1)[1]
    for line in lines[start + 1 :]:
        if not line.startswith("      "):
            break
        text += line
    assert "'test'" in text


def test_unknown_suite_lists_the_known_ones(tmp_path):
    (tmp_path / "alpha.json").write_text('{"expectations": [{"type": "x", "kwargs": {}}]}')
    (tmp_path / "beta.json").write_text("{}")
    with pytest.raises(DataQualityError) as info:
        load_suite_definition("nope", tmp_path)
    message = str(info.value)
    assert "'nope' not found" in message
    assert str(tmp_path / "nope.json") in message
    assert "['alpha', 'beta']" in message
    assert load_suite_definition("alpha", tmp_path)["expectations"][0]["type"] == "x"


def test_invalid_suite_json_reports_line_and_column(tmp_path):
    (tmp_path / "broken.json").write_text('{\n  "expectations": [\n    {"type": "x",}\n  ]\n}\n')
    with pytest.raises(DataQualityError, match=r"broken\.json line 3, column 18: invalid JSON"):
        load_suite_definition("broken", tmp_path)


@pytest.mark.parametrize("body", ['{"name": "s"}', '{"expectations": []}', '{"expectations": {"a": 1}}'])
def test_suite_without_expectations_is_rejected(tmp_path, body):
    (tmp_path / "empty.json").write_text(body)
    with pytest.raises(DataQualityError, match="needs a non-empty 'expectations' list"):
        load_suite_definition("empty", tmp_path)


def test_shipped_suite_loads():
    definition = load_suite_definition(SUITE)
    assert len(definition["expectations"]) == N_EXPECTATIONS
    assert all(e.get("meta", {}).get("defect") for e in definition["expectations"])
    assert os.path.isfile(EXPECTATIONS_DIR / f"{SUITE}.json")
