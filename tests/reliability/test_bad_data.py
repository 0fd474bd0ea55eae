"""Bad data: a corpus of broken raw datasets, each refused by the real curation path with a
message that names the defect (and the file, line or record where it is), with nothing written
under the store's ``datasets/`` prefix; a failed ``llm_data_prep`` run announces no dataset, so
``llm_finetune`` is never triggered; ``llm_finetune`` refuses a dataset version that failed
validation or changed after publishing; and on messy but usable data every input record is either
published or named in the version's drop report with its reason.

Run alone: ``.venv/bin/python -m pytest tests/reliability/test_bad_data.py -p no:cacheprovider``.
"""

from __future__ import annotations

import gzip
import json
import re
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llmops import storage
from llmops.config import ConfigError, load_settings
from llmops.data import stages, versioning
from llmops.data.ingest import MAX_RECORD_BYTES
from llmops.data.records import DataQualityError
from llmops.data.validation import DataValidationError
from tests.dagruns import FAST_EVALUATION
from tests.datagen import good_records, write_jsonl
from tests.integration.conftest import tiny_model  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.model]

BAD_DATA = pytest.mark.reliability("bad data")


def jsonl_bytes(records: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def published_files(settings) -> list[str]:
    """Everything under the store's datasets prefix: version folders, manifests, staging leftovers."""
    root = Path(storage.local_path(settings.datasets_uri()))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def curate(settings, raw: Path, **overrides) -> dict:
    return stages.curate(settings, settings.data.model_copy(update={"raw_uri": str(raw), **overrides}))


# -- the corpus -----------------------------------------------------------------------------------
# Each writer puts one bad raw dataset in ``folder`` and returns its path. The pattern is what the
# error must say: the defect in words, and where it is.

CASES: list = []


def bad(case_id: str, pattern: str, error: type[Exception] = DataQualityError, **overrides):
    def register(write: Callable[[Path], Path]) -> Callable[[Path], Path]:
        CASES.append(pytest.param(write, pattern, error, overrides, id=case_id))
        return write

    return register


# encoding


@bad("non-utf8-bytes", r"latin1\.jsonl line 2, byte column 16: not valid UTF-8 \(byte 0xe9\); re-encode")
def latin1(folder: Path) -> Path:
    path = folder / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "response": "fine"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    return path


@bad("utf8-bom-then-invalid-byte-on-line-3", r"bom\.jsonl line 3, byte column 35: not valid UTF-8 \(byte 0xff\)")
def bom_then_invalid(folder: Path) -> Path:
    # The BOM itself is fine (Excel writes one); the line and column of the real defect stay exact.
    path = folder / "bom.jsonl"
    lines = jsonl_bytes(good_records(2)) + b'{"instruction": "x", "response": "\xff"}\n'
    path.write_bytes(b"\xef\xbb\xbf" + lines)
    return path


@bad("utf16-encoded-file", r"utf16\.jsonl: not a text file: it starts with a UTF-16 \(little-endian\) byte-order mark")
def utf16(folder: Path) -> Path:
    path = folder / "utf16.jsonl"
    path.write_bytes(jsonl_bytes(good_records(10)).decode().encode("utf-16"))
    return path


@bad("nul-bytes", r"nul\.jsonl line 3, byte column 17: NUL byte \(0x00\); .*binary or corrupted")
def nul_bytes(folder: Path) -> Path:
    path = folder / "nul.jsonl"
    lines = jsonl_bytes(good_records(5)).split(b"\n")
    lines[2] = lines[2][:16] + b"\x00\x00\x00" + lines[2][16:]
    path.write_bytes(b"\n".join(lines))
    return path


@bad("gzip-file-named-jsonl", r"gz\.jsonl: not a text file: it is gzip-compressed; decompress it first")
def gzipped(folder: Path) -> Path:
    path = folder / "gz.jsonl"
    path.write_bytes(gzip.compress(jsonl_bytes(good_records(10))))
    return path


@bad("control-characters-only-responses", r"all 12 responses are empty, e\.g\. .*ctl\.jsonl:1 \(id=rec-000\)")
def control_only(folder: Path) -> Path:
    return write_jsonl(folder / "ctl.jsonl", [dict(r, response="\x01\x07\u200b\ufeff\x7f") for r in good_records(12)])


# structure and schema


@bad(
    "json-array-instead-of-json-lines",
    r"array\.jsonl line 1: expected a JSON object per line, got list; the file is one JSON array of 12 objects",
)
def json_array(folder: Path) -> Path:
    path = folder / "array.jsonl"
    path.write_text(json.dumps(good_records(12)))
    return path


@bad(
    "pretty-printed-json-document",
    r"pretty\.json line 1, column 2: invalid JSON .*one pretty-printed JSON document, not JSON lines",
)
def pretty_json(folder: Path) -> Path:
    path = folder / "pretty.json"
    path.write_text(json.dumps(good_records(12), indent=2))
    return path


@bad("json-scalar-line", r"scalar\.jsonl line 6: expected a JSON object per line, got int")
def scalar_line(folder: Path) -> Path:
    path = folder / "scalar.jsonl"
    path.write_bytes(jsonl_bytes(good_records(5)) + b"42\n" + jsonl_bytes(good_records(8)[5:]))
    return path


@bad(
    "csv-missing-required-columns",
    r"cols\.csv: missing required column\(s\) 'response', 'prompt or instruction' \(found: answer, question\)",
)
def csv_wrong_columns(folder: Path) -> Path:
    path = folder / "cols.csv"
    path.write_text("question,answer\nwhat?,that\nwho?,them\n")
    return path


@bad("csv-wrong-delimiter", r"semi\.csv: missing required column\(s\) .*the header is one column holding ';'")
def csv_semicolons(folder: Path) -> Path:
    path = folder / "semi.csv"
    path.write_text("prompt;response\nWhat is a list?;A sequence.\n")
    return path


@bad("csv-ragged-row", r"ragged\.csv line 4: 1 more field\(s\) than the header's 3")
def csv_ragged(folder: Path) -> Path:
    path = folder / "ragged.csv"
    path.write_text("id,prompt,response\n1,What is a set?,Unique items.\n2,What is a dict?,A map.\n3,a,b,c\n")
    return path


@bad(
    "parquet-column-of-wrong-type",
    r"typed\.parquet: wrong column type\(s\) in the Parquet schema: 'response' is int64; text expected",
)
def parquet_wrong_type(folder: Path) -> Path:
    path = folder / "typed.parquet"
    table = pa.table({"prompt": [f"What is {i} squared?" for i in range(12)], "response": [i * i for i in range(12)]})
    pq.write_table(table, path)
    return path


@bad(
    "mixed-types-number-as-response",
    r"mixed\.jsonl: 1 bad record\(s\):\n  .*mixed\.jsonl:7: field 'response' must be text, got int 42",
)
def number_response(folder: Path) -> Path:
    records = good_records(12)
    records[6]["response"] = 42
    return write_jsonl(folder / "mixed.jsonl", records)


@bad("list-as-instruction", r"list\.jsonl:3: field 'instruction' must be text, got list \['Explain', 'zip'\]")
def list_prompt(folder: Path) -> Path:
    records = good_records(12)
    records[2]["instruction"] = ["Explain", "zip"]
    return write_jsonl(folder / "list.jsonl", records)


@bad("nested-object-as-response", r"nested\.jsonl:5: field 'response' must be text, got dict \{'text'")
def nested_response(folder: Path) -> Path:
    records = good_records(12)
    records[4]["response"] = {"text": "An answer", "score": 3}
    return write_jsonl(folder / "nested.jsonl", records)


@bad("prompt-and-instruction-in-one-record", r"both\.jsonl:2: both 'prompt' and 'instruction' are set; give one")
def prompt_and_instruction(folder: Path) -> Path:
    records = good_records(12)
    records[1]["prompt"] = "A different question entirely?"
    return write_jsonl(folder / "both.jsonl", records)


@bad("context-with-prompt", r"ctx\.jsonl:1: 'context' goes with 'instruction'; with 'prompt' it would be ignored")
def context_with_prompt(folder: Path) -> Path:
    records = [
        {"id": r["id"], "prompt": r["instruction"], "context": "Python 3.12", "response": r["response"]}
        for r in good_records(12)
    ]
    return write_jsonl(folder / "ctx.jsonl", records)


@bad(
    "mixed-prompt-and-instruction-schemas",
    r"mix\.jsonl: mixed schemas: 6 record\(s\) give 'prompt' \(e\.g\. .*mix\.jsonl:1 \(id=rec-000\).*\) "
    r"and 6 give 'instruction'",
)
def mixed_schemas(folder: Path) -> Path:
    records = good_records(12)
    for record in records[:6]:
        record["prompt"] = record.pop("instruction")
        record.pop("context")
    return write_jsonl(folder / "mix.jsonl", records)


@bad("unknown-file-format", r"notes\.txt: unknown raw format; expected a file ending in .*\.jsonl")
def unknown_format(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_bytes(jsonl_bytes(good_records(12)))
    return path


@bad("declared-source-file-missing", r"raw data not found: file://.*/absent\.jsonl: no such file")
def missing_file(folder: Path) -> Path:
    return folder / "absent.jsonl"


# truncation


@bad(
    "truncated-last-json-line",
    r"cut\.jsonl line 10, column \d+: invalid JSON \(Unterminated string.*\); the last line looks truncated",
)
def truncated_json(folder: Path) -> Path:
    path = write_jsonl(folder / "cut.jsonl", good_records(10))
    path.write_bytes(path.read_bytes()[:-25])
    return path


@bad(
    "truncated-csv-unclosed-quote",
    r"cut\.csv line 4: malformed CSV \(a quoted field is never closed; the file looks truncated\)",
)
def truncated_csv(folder: Path) -> Path:
    path = folder / "cut.csv"
    path.write_text(
        'id,prompt,response\n1,What is a set?,"Unique items."\n2,What is a dict?,A map.\n'
        '3,What is a tuple?,"An immutable sequence\nof items, such as'
    )
    return path


@bad("truncated-parquet", r"cut\.parquet: not a readable Parquet file \(.*magic bytes not found")
def truncated_parquet(folder: Path) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.Table.from_pylist(
            [
                {k: r[k] for k in ("id", "prompt", "response")}
                for r in (dict(r, prompt=r["instruction"]) for r in good_records(40))
            ]
        ),
        sink,
    )
    payload = sink.getvalue().to_pybytes()
    path = folder / "cut.parquet"
    path.write_bytes(payload[: len(payload) * 2 // 3])
    return path


# huge records (a 50 MB one in JSON lines: test_huge_single_record_refused_quickly_without_parsing_it)


@bad(
    "csv-field-over-the-record-limit",
    r"big\.csv line 3: malformed CSV \(a field over the limit of 4,194,304 characters",
)
def csv_huge_field(folder: Path) -> Path:
    path = folder / "big.csv"
    path.write_text(
        f'prompt,response\nWhat is a set?,Unique items.\nSummarise this.,"{"All work and no play. " * 200_000}"\n'
    )
    return path


@bad(
    "parquet-row-over-the-record-limit", r"big\.parquet:row 2: a record of 4,400,015 bytes, over the limit of 4,194,304"
)
def parquet_huge_row(folder: Path) -> Path:
    path = folder / "big.parquet"
    responses = ["Unique items.", "All work and no play. " * 200_000, "A map."]
    pq.write_table(
        pa.table({"prompt": ["What is a set?", "Summarise this.", "What is a dict?"], "response": responses}), path
    )
    return path


# empties


@bad("empty-file", r"empty\.jsonl: the file is empty \(0 bytes\); there are no records to curate")
def empty_file(folder: Path) -> Path:
    path = folder / "empty.jsonl"
    path.write_bytes(b"")
    return path


@bad("blank-lines-only", r"blank\.jsonl: the file is empty \(8 bytes\)")
def blank_lines(folder: Path) -> Path:
    path = folder / "blank.jsonl"
    path.write_bytes(b"\n  \n\t\n\r\n")
    return path


@bad("csv-header-only", r"header\.csv: the file holds no records")
def header_only(folder: Path) -> Path:
    path = folder / "header.csv"
    path.write_text("id,instruction,context,response\n")
    return path


@bad("all-responses-whitespace", r"all 8 responses are empty, e\.g\. .*noanswers\.jsonl:1 \(id=rec-000\)")
def whitespace_responses(folder: Path) -> Path:
    return write_jsonl(folder / "noanswers.jsonl", [dict(r, response=" \t\n ") for r in good_records(8)])


@bad("all-prompts-whitespace", r"all 8 prompts are empty, e\.g\. .*noprompts\.jsonl:1 \(id=rec-000\)")
def whitespace_prompts(folder: Path) -> Path:
    records = [dict(r, instruction="\n \u00a0 ", context="") for r in good_records(8)]
    return write_jsonl(folder / "noprompts.jsonl", records)


@bad(
    "too-many-empty-responses",
    r"5 of 20 records \(25%\) have an empty prompt or response, more than the allowed 20%: "
    r"e\.g\. .*some\.jsonl:1 \(id=rec-000\)",
)
def some_empty(folder: Path) -> Path:
    records = good_records(20)
    for record in records[:5]:
        record["response"] = ""
    return write_jsonl(folder / "some.jsonl", records)


# duplicates


@bad(
    "all-records-duplicates",
    r"all 12 records are duplicates of one record \(.*dups\.jsonl:1 \(id=d0\)\); nothing to learn from",
)
def all_duplicates(folder: Path) -> Path:
    record = good_records(1)[0]
    return write_jsonl(folder / "dups.jsonl", [dict(record, id=f"d{i}") for i in range(12)])


@bad(
    "near-duplicates-after-normalisation",
    r"40 of 60 records \(67%\) are duplicates, more than the allowed 50%: e\.g\. .*near\.jsonl:21 \(id=upper-0\)",
)
def near_duplicates(folder: Path) -> Path:
    # Case, punctuation, accents and spacing differ; a reader would call each pair the same text.
    base = good_records(20)
    shouted = [dict(r, id=f"upper-{i}", instruction=r["instruction"].upper() + "!!") for i, r in enumerate(base)]
    spaced = [
        dict(r, id=f"space-{i}", response="  " + r["response"].replace(" ", "   ").replace(".", " ..."))
        for i, r in enumerate(base)
    ]
    return write_jsonl(folder / "near.jsonl", base + shouted + spaced)


@bad("duplicate-ids-different-content", r"ids\.jsonl:8: id 'rec-002' already used at .*ids\.jsonl:3")
def duplicate_ids(folder: Path) -> Path:
    records = good_records(12)
    records[7]["id"] = "rec-002"
    return write_jsonl(folder / "ids.jsonl", records)


# over-length


@bad("most-records-over-length", r"too many over-length records: 20 of 20 \(100%\) exceed max_tokens=64", max_tokens=64)
def over_length(folder: Path) -> Path:
    records = [dict(r, response=r["response"] + " More detail follows." * 40) for r in good_records(20)]
    return write_jsonl(folder / "long.jsonl", records)


@bad(
    "one-over-length-record-with-fail-policy",
    r"1 of 30 records exceed max_tokens=128 and the policy is 'fail': "
    r"e\.g\. .*fail\.jsonl:8 \(id=rec-007\) \(\d+ tokens\)",
    max_tokens=128,
    over_length="fail",
)
def over_length_fail(folder: Path) -> Path:
    records = good_records(30)
    records[7]["response"] += " More detail follows." * 40
    return write_jsonl(folder / "fail.jsonl", records)


# PII


@bad(
    "pii-with-scrubbing-disabled",
    r"\[PII left in responses after scrubbing\]: 1 unexpected \(2\.5%\)\n"
    r"\s+example values: \['Write to jane\.doe@example\.com for the details\.'\]\n\s+record ids: \['rec-005'\]",
    DataValidationError,
    scrub_pii=False,
)
def pii_unscrubbed(folder: Path) -> Path:
    records = good_records(40)
    records[5]["response"] = "Write to jane.doe@example.com for the details."
    return write_jsonl(folder / "pii.jsonl", records)


@bad(
    "card-number-failing-luhn-survives-scrubbing",
    r"\[PII left in prompts after scrubbing\]: 1 unexpected \(2\.5%\)\n"
    r"\s+example values: \['Why was card 4111 1111 1111 1112 declined\?.*'\]\n\s+record ids: \['rec-009'\]",
    DataValidationError,
)
def card_not_luhn(folder: Path) -> Path:
    # A card-shaped number that fails the checksum is left by the scrubber (it may be an id) but
    # is still flagged before publishing: a mistyped card number is a card number.
    records = good_records(40)
    records[9]["instruction"] = "Why was card 4111 1111 1111 1112 declined?"
    return write_jsonl(folder / "card.jsonl", records)


@bad(
    "pii-in-record-id",
    r"\[PII in record ids \(an id is never scrubbed: .*\)\]: 1 unexpected \(2\.5%\)\n"
    r"\s+example values: .*\n\s+record ids: \['jane\.doe@example\.com'\]",
    DataValidationError,
)
def pii_id(folder: Path) -> Path:
    records = good_records(40)
    records[3]["id"] = "jane.doe@example.com"
    return write_jsonl(folder / "pid.jsonl", records)


# leakage between splits


def _given_splits(n: int = 30) -> list[dict]:
    records = [dict(r, split="train") for r in good_records(n)]
    for r in records[:6]:
        r["split"] = "validation"
    for r in records[6:12]:
        r["split"] = "test"
    return records


@bad(
    "train-test-leakage",
    r"\[train/test leakage: the same prompt appears in more than one split\]: 2 unexpected \(6\.5%\)\n"
    r"\s+example values: \[2, 2\]\n\s+record ids: \['rec-020', 'leak'\]",
    DataValidationError,
)
def leakage(folder: Path) -> Path:
    records = _given_splits()
    leaked = dict(records[20], id="leak", split="test", response="A different answer to the same question.")
    return write_jsonl(folder / "leak.jsonl", [*records, leaked])


@bad(
    "leakage-of-a-reworded-prompt",
    r"\[train/test leakage: the same prompt appears in more than one split\]: 2 unexpected \(6\.5%\)\n"
    r"\s+example values: \[2, 2\]\n\s+record ids: \['rec-025', 'reworded'\]",
    DataValidationError,
)
def leakage_normalised(folder: Path) -> Path:
    records = _given_splits()
    source = records[25]
    leaked = dict(
        source,
        id="reworded",
        split="validation",
        instruction=f"  {source['instruction'].upper()}?!",
        response="Another answer, to what a reader would call the same question.",
    )
    return write_jsonl(folder / "reworded.jsonl", [*records, leaked])


# labels and templates


@bad(
    "unknown-split-label",
    r"splits\.jsonl:3 \(id=rec-002\): unknown split 'dev'; expected one of \('train', 'validation', 'test'\)",
)
def unknown_split(folder: Path) -> Path:
    records = good_records(20)
    records[2]["split"] = "dev"
    return write_jsonl(folder / "splits.jsonl", records)


@bad(
    "unknown-template",
    r"no template 'python_docs_qa_v9' \(known: .*plain_instruction, python_docs_qa\)",
    template="python_docs_qa_v9",
)
def for_unknown_template(folder: Path) -> Path:
    return write_jsonl(folder / "good.jsonl", good_records(20))


@bad(
    "judge-template-used-for-instructions",
    r"template judge_rubric@catalog is a 'judge' template, not an instruction template",
    template="judge_rubric",
)
def for_judge_template(folder: Path) -> Path:
    return write_jsonl(folder / "good.jsonl", good_records(20))


@bad(
    "template-label-mismatch",
    r"template mismatch: 3 record\(s\) were written for template\(s\) \['chatml@2'\] but this run formats with "
    r"python_docs_qa@catalog: e\.g\. .*labels\.jsonl:5 \(id=rec-004\)",
)
def template_mismatch(folder: Path) -> Path:
    records = good_records(20)
    for record in records[4:7]:
        record["template"] = "chatml@2"
    return write_jsonl(folder / "labels.jsonl", records)


# too little data


@bad(
    "too-few-records-for-the-splits",
    r"\[too few records to train and evaluate\]: observed 2\n.*\[a split is empty\]: missing \['test', 'validation'\]",
    DataValidationError,
)
def too_few(folder: Path) -> Path:
    return write_jsonl(folder / "few.jsonl", good_records(2))


@BAD_DATA
@pytest.mark.parametrize(("write", "pattern", "error", "overrides"), CASES)
def test_rejected_and_nothing_published(settings, tmp_path, write, pattern, error, overrides):
    raw = write(tmp_path)
    with pytest.raises(error) as info:
        curate(settings, raw, **overrides)
    message = str(info.value)
    assert re.search(pattern, message), f"the message does not name the defect as expected:\n{message}"
    assert published_files(settings) == []


def test_the_corpus_covers_every_category_of_the_issue():
    ids = {case.id for case in CASES}
    assert len(ids) == len(CASES) >= 25
    for category, words in {
        "encoding": ("utf8", "utf16", "nul", "control"),
        "schema": ("columns", "type", "schemas"),
        "truncation": ("truncated",),
        "empties": ("empty", "whitespace", "header-only"),
        "duplicates": ("duplicate",),
        "over-length": ("over-length",),
        "huge single records": ("over-the-record-limit",),
        "PII": ("pii",),
        "leakage": ("leakage",),
        "label or template mismatch": ("split-label", "template"),
        "mixed types": ("mixed-types",),
    }.items():
        assert any(word in case_id for case_id in ids for word in words), category


@BAD_DATA
def test_huge_single_record_refused_quickly_without_parsing_it(settings, tmp_path):
    """A 50 MB record among good ones (a file whose line breaks were lost) is refused after one scan
    for its end: never decoded, parsed, cleaned or tokenized (peak memory is the file's bytes once)."""
    raw = tmp_path / "huge.jsonl"
    huge = {"id": "huge", "instruction": "Summarise this.", "response": "All work and no play. " * 2_400_000}
    with raw.open("wb") as out:
        out.write(jsonl_bytes(good_records(5)))
        out.write(jsonl_bytes([huge]))
        out.write(jsonl_bytes(good_records(10)[5:]))
    size = raw.stat().st_size
    assert size > 50_000_000

    tracemalloc.start()
    started = time.process_time()  # CPU time: what refusing costs, however loaded the machine
    try:
        with pytest.raises(DataQualityError) as info:
            curate(settings, raw)
        elapsed = time.process_time() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.search(
        rf"huge\.jsonl line 6: a record of {len(json.dumps(huge)):,} bytes, over the limit of {MAX_RECORD_BYTES:,} "
        r"bytes per record; no training example is that long",
        str(info.value),
    ), str(info.value)
    assert elapsed < 5, f"refusing took {elapsed:.1f} s of CPU"
    assert peak < 1.25 * size, (
        f"peak memory {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file: it was copied or parsed"
    )
    assert published_files(settings) == []


# -- nothing lost: messy but usable data ----------------------------------------------------------


def messy_records() -> list[dict]:
    """Forty good records plus what curation must drop or repair, each with its own id."""
    records = good_records(40)
    records[3]["response"] = "Mail jane.doe@example.com or call +1 415 555 0132 for help."
    records[8]["reviewer"] = {"email": "ops@example.org", "host": "10.1.2.3"}
    extra = [
        dict(records[1], id="exact-dup-of-1"),
        dict(records[2], id="exact-dup-of-2"),
        dict(records[5], id="near-dup-of-5", instruction=records[5]["instruction"].upper() + " ?"),
        dict(records[6], id="near-dup-of-6", response=records[6]["response"].replace(" ", "  ").lower()),
        dict(records[7], id="empty-response", instruction="What is an empty answer?", response=" \u200b "),
        dict(records[9], id="empty-prompt", instruction="\x00\x07", response="An answer without a question."),
        dict(records[4], id="over-length-1", instruction="Tell me everything.", response="All the detail. " * 300),
        dict(records[4], id="over-length-2", instruction="Tell me more.", response="Even more detail here. " * 300),
    ]
    return records + extra


@BAD_DATA
def test_messy_input_every_record_published_or_reported_with_its_reason(settings, tmp_path, ledger):
    records = messy_records()
    raw = write_jsonl(tmp_path / "messy.jsonl", records)
    published = curate(settings, raw)

    manifest = storage.read_json(published["manifest_uri"])
    kept = [r for split in ("train", "validation", "test") for r in storage.read_jsonl(manifest["files"][split]["uri"])]
    reported = manifest["dropped"]["records"]
    ledger.account(expected=len(records), delivered=len(kept) + len(reported))
    ledger.figure("published", len(kept))
    ledger.figure("dropped_with_reason", len(reported))

    kept_ids, reported_ids = {r["id"] for r in kept}, [d["id"] for d in reported]
    assert len(reported_ids) == len(set(reported_ids)) and not kept_ids & set(reported_ids)
    assert kept_ids | set(reported_ids) == {r["id"] for r in records}
    assert manifest["records"] == {"read": len(records), "published": len(kept), "dropped": len(reported)}
    reasons = {d["id"]: (d["stage"], d["reason"], d.get("duplicate_of")) for d in reported}
    origin = storage.to_uri(str(raw))
    assert reasons == {
        "exact-dup-of-1": ("deduplicate", "exact duplicate", f"{origin}:2 (id=rec-001)"),
        "exact-dup-of-2": ("deduplicate", "exact duplicate", f"{origin}:3 (id=rec-002)"),
        "near-dup-of-5": ("deduplicate", "near duplicate", f"{origin}:6 (id=rec-005)"),
        "near-dup-of-6": ("deduplicate", "near duplicate", f"{origin}:7 (id=rec-006)"),
        "empty-response": ("clean", "empty response", None),
        "empty-prompt": ("clean", "empty prompt", None),
        "over-length-1": ("profile_tokens", "longer than max_tokens", None),
        "over-length-2": ("profile_tokens", "longer than max_tokens", None),
    }
    assert all(d["origin"].startswith(f"{origin}:") for d in reported)
    assert manifest["dropped"]["by_reason"] == {
        "clean: empty prompt": 1,
        "clean: empty response": 1,
        "deduplicate: exact duplicate": 2,
        "deduplicate: near duplicate": 2,
        "profile_tokens: longer than max_tokens": 2,
    }

    # Repaired, not dropped: PII is scrubbed wherever it is published, metadata included.
    by_id = {r["id"]: r for r in kept}
    assert by_id["rec-003"]["response"] == "Mail [EMAIL] or call [PHONE] for help."
    assert by_id["rec-008"]["meta"]["reviewer"] == {"email": "[EMAIL]", "host": "[IP_ADDRESS]"}
    assert manifest["stages"]["scrub_pii"]["replaced"] == {"EMAIL": 2, "IP_ADDRESS": 1, "PHONE": 1}


@BAD_DATA
def test_a_record_lost_between_stages_blocks_publishing(settings, tmp_path):
    """An intermediate file of the run that lost a record (a partial copy, a hand edit) is caught
    by publish's accounting: no stage reported that record dropped, so nothing is published."""
    data = settings.data.model_copy(update={"raw_uri": str(write_jsonl(tmp_path / "good.jsonl", good_records(40)))})
    run_uri = stages.run_folder(settings, "manual__lost_record")
    step = stages.ingest(data, run_uri)
    stats = {"ingest": step["stats"]}
    for name, stage in (
        ("clean", stages.clean),
        ("deduplicate", stages.deduplicate),
        ("scrub_pii", stages.scrub_pii),
        ("format", stages.format_records),
        ("split", stages.split),
    ):
        step = stage(data, step["uri"], run_uri)
        stats[name] = step["stats"]
    split_file = Path(storage.local_path(step["uri"]))
    split_file.write_text("".join(split_file.read_text().splitlines(keepends=True)[:-1]))
    step = stages.profile_tokens(data, settings.models.base, settings.models.cache_dir, step["uri"], run_uri)
    stats["profile_tokens"] = step["stats"]
    checked = stages.validate(data, step["uri"], run_uri)
    with pytest.raises(DataQualityError) as info:
        stages.publish(settings, data, checked["uri"], checked["stats"], stats, {"run_uri": run_uri})
    assert str(info.value) == (
        "refusing to publish: 40 records were read, 39 are to be published and 0 were reported dropped; "
        "1 record(s) vanished without a reason"
    )
    assert published_files(settings) == []


# -- no training starts ---------------------------------------------------------------------------

DATASET = "bad-data-reliability"


@pytest.fixture(scope="module")
def dag_home(tmp_path_factory) -> Path:
    """A store and a config of this module's own: the dataset's name (and so its Asset) is not
    shared with any other test's DAG runs."""
    from llmops.config import INCLUDE_DIR

    home = tmp_path_factory.mktemp("bad-data-dags")
    config = yaml.safe_load((INCLUDE_DIR / "config" / "local.yaml").read_text())
    config["data"]["dataset_name"] = DATASET
    # Should a regression let training start, it stays short instead of evaluating for minutes.
    config["evaluation"] = {**config["evaluation"], **FAST_EVALUATION}
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    return home


def dag_env(home: Path) -> dict[str, str]:
    return {
        "LLMOPS_HOME": str(home),
        "LLMOPS_CONFIG_FILE": str(home / "config.yaml"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
    }


def asset_events(asset_name: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .filter(AssetModel.name == asset_name)
        )
        return [{"run_id": e.source_run_id, "extra": e.extra} for e in rows]


@pytest.mark.integration
@BAD_DATA
def test_failed_data_prep_run_announces_nothing_so_finetuning_never_starts(airflow_db, dag_home, tmp_path):
    from tests.dagruns import parsed_dag, task_states

    bad = pii_id(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", good_records(30))
    asset = f"curated_dataset.{DATASET}"
    with parsed_dag("llm_data_prep", **dag_env(dag_home)) as dag:
        settings = load_settings()
        before = asset_events(asset)
        run = dag.test(run_conf={"raw_uri": str(bad)})
        states = task_states(run)
        assert run.state == "failed"
        assert states["profile_tokens"] == "success" and states["validate_dataset"] == "failed", states
        assert states["publish_version"] == "upstream_failed" and states["announce_dataset"] == "upstream_failed"
        assert asset_events(asset) == before, "a failed run announced a dataset: llm_finetune would train on it"
        assert published_files(settings) == []

        # The same DAG on good data does announce its version: the check above can see an event.
        run = dag.test(run_conf={"raw_uri": str(good)})
        assert run.state == "success", task_states(run)
        events = asset_events(asset)
        assert [e["run_id"] for e in events if e not in before] == [run.run_id]


# -- llm_finetune refuses a bad dataset version ---------------------------------------------------


def _publish(settings, records: list[dict], validation: dict) -> versioning.PublishedVersion:
    return versioning.publish(
        records, settings.datasets_uri(), settings.data.dataset_name, {"validation": validation}, None
    )


def _validation_result(settings, success: bool) -> str:
    uri = storage.join(settings.runs_uri(), "llm_data_prep", "manual", "validation", "result.json")
    storage.write_json(uri, {"success": success})
    return uri


def _curated(settings, n: int = 12) -> list[dict]:
    return [
        {"id": f"q{i}", "prompt": f"Question {i}?", "response": f"Answer {i}.", "source": "t", "split": split}
        for i, split in enumerate(["train", "validation", "test"] * (n // 3))
    ]


def failed_validation(settings) -> str:
    return _publish(
        settings, _curated(settings), {"success": False, "result_uri": _validation_result(settings, False)}
    ).version


def manifest_missing(settings) -> str:
    version = _publish(
        settings, _curated(settings), {"success": True, "result_uri": _validation_result(settings, True)}
    )
    storage.delete(version.manifest_uri)
    return version.version


def split_file_edited(settings) -> str:
    version = _publish(
        settings, _curated(settings), {"success": True, "result_uri": _validation_result(settings, True)}
    )
    train = Path(storage.local_path(storage.join(version.uri, "train.jsonl")))
    train.write_text(train.read_text().replace("Answer 0.", "Answer 0, edited after publishing."))
    return version.version


def validation_verdict_flipped(settings) -> str:
    # The manifest says "passed"; the Great Expectations result it points to says otherwise.
    return _publish(
        settings, _curated(settings), {"success": True, "result_uri": _validation_result(settings, False)}
    ).version


def manifest_points_elsewhere(settings) -> str:
    version = _publish(
        settings, _curated(settings), {"success": True, "result_uri": _validation_result(settings, True)}
    )
    other = storage.join(settings.store_uri, "elsewhere", "train.jsonl")
    storage.write_bytes(other, b'{"id": "x", "prompt": "p", "response": "r", "split": "train"}\n')
    manifest = storage.read_json(version.manifest_uri)
    manifest["files"]["train"]["uri"] = other
    storage.write_json(version.manifest_uri, manifest)
    return version.version


@BAD_DATA
@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (failed_validation, r"did not pass validation; refusing to train on it"),
        (manifest_missing, r"dataset_version: '[0-9a-f]{64}' of 'python-docs-instruct' does not exist \(known: \[\]\)"),
        (
            split_file_edited,
            r"train\.jsonl has sha256 [0-9a-f]{12}…, the manifest says [0-9a-f]{12}…; "
            r"the file changed after it was published",
        ),
        (
            validation_verdict_flipped,
            r"the manifest says validation passed, but its validation result .*result\.json says it failed",
        ),
        (
            manifest_points_elsewhere,
            r"the manifest's train file is 'file://.*/elsewhere/train\.jsonl', not the version's own",
        ),
    ],
    ids=[
        "validation-failed",
        "manifest-missing",
        "split-file-edited",
        "validation-verdict-flipped",
        "manifest-points-elsewhere",
    ],
)
def test_finetune_refuses_a_dataset_version(settings, make, pattern):
    from llmops.finetune import select_dataset

    version = make(settings)
    with pytest.raises(ConfigError) as info:
        select_dataset(settings, version)
    assert re.search(pattern, str(info.value)), str(info.value)


@pytest.mark.integration
@BAD_DATA
def test_finetune_run_on_an_edited_dataset_fails_before_training(airflow_db, dag_home, tiny_model):  # noqa: F811
    from tests.dagruns import parsed_dag, task_states

    with parsed_dag("llm_finetune", **dag_env(dag_home)) as dag:
        settings = load_settings()
        version = split_file_edited(settings)
        conf = {"dataset_version": version, "force": True, "base_model": str(tiny_model), "max_steps": 1}
        run = dag.test(run_conf=conf)
        states = task_states(run)
        assert run.state == "failed"
        assert states["resolve_config"] == "success" and states["select_dataset"] == "failed", states
        assert states["train_adapter"] == "upstream_failed", states
        assert not list(dag_home.glob("**/training-jobs/*")), "a training job was started"
