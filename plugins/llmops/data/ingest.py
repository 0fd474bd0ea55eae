"""Read a raw dataset (JSON lines, CSV or Parquet; a local path or any fsspec URI).

Every defect is reported with where it is: the URI, the line (or row) and, for JSON, the column.
Each record keeps its origin in ``_origin`` so later stages can point at it too.

One file, one schema: every record gives ``response`` and either ``prompt`` (used as it is) or
``instruction`` (+ optional ``context``, rendered with the run's template), never both, and all
records of a file give the same one. A record larger than ``MAX_RECORD_BYTES`` is refused before
it is decoded or parsed.
"""

from __future__ import annotations

import io
import json
from collections import Counter

from llmops import storage
from llmops.data.records import ORIGIN, DataQualityError, examples

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_HELP = "each record needs 'response' and either 'prompt' or 'instruction' (optional 'context')"
MAX_REPORTED = 5
STRING_FIELDS = ("prompt", "instruction", "context", "response", "source", "id", "split", "template")
# An example that fits the largest allowed data.max_tokens (131072) takes well under a MiB; a record
# of several MiB is a mis-split or corrupted file, and cleaning, scrubbing and tokenizing it would
# take minutes before the over-length check could drop it.
MAX_RECORD_BYTES = 4 * 1024 * 1024

# Leading bytes of files that are not text at all, and what to tell the user about them.
_SIGNATURES = (
    (b"\xff\xfe", "starts with a UTF-16 (little-endian) byte-order mark: the file is UTF-16; re-encode it as UTF-8"),
    (b"\xfe\xff", "starts with a UTF-16 (big-endian) byte-order mark: the file is UTF-16; re-encode it as UTF-8"),
    (b"\x1f\x8b", "is gzip-compressed; decompress it first"),
    (b"PK\x03\x04", "is a ZIP archive (an Excel workbook?); export it as CSV or JSON lines"),
    (b"PAR1", "is a Parquet file; name it *.parquet"),
)


def detect_format(uri: str) -> str:
    lowered = uri.lower().split("?", 1)[0]
    for suffix, fmt in FORMATS.items():
        if lowered.endswith(suffix):
            return fmt
    raise DataQualityError(f"{uri}: unknown raw format; expected a file ending in {', '.join(sorted(FORMATS))}")


def read_raw(uri: str, storage_options: dict | None = None) -> list[dict]:
    """Read and schema-check raw records. Raises ``DataQualityError`` naming the defect."""
    uri = storage.to_uri(uri)
    fmt = detect_format(uri)
    try:
        data = storage.read_bytes(uri, storage_options)
    except storage.StorageError as exc:
        raise DataQualityError(f"raw data not found: {exc}") from None
    if not data or data.isspace():
        raise DataQualityError(f"{uri}: the file is empty ({len(data)} bytes); there are no records to curate")
    if fmt == "jsonl":
        records = _read_jsonl(uri, data)
    elif fmt == "csv":
        records = _read_csv(uri, data)
    else:
        records = _read_parquet(uri, data)
    if not records:
        raise DataQualityError(f"{uri}: the file holds no records")
    _check_schema(uri, records)
    return records


def _check_text_file(uri: str, data: bytes) -> None:
    for signature, problem in _SIGNATURES:
        if data.startswith(signature):
            raise DataQualityError(f"{uri}: not a text file: it {problem}")


def _decode(uri: str, data: bytes, first_line: int = 1) -> str:
    """``data`` (which starts at line ``first_line`` of the file) as text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start
        number = first_line + data.count(b"\n", 0, at)
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise DataQualityError(
            f"{uri} line {number}, byte column {column}: not valid UTF-8 "
            f"(byte 0x{data[at]:02x}); re-encode the file as UTF-8"
        ) from None


def _lines(uri: str, data: bytes):
    """``(number, line bytes)`` of every line, each checked for size and NUL bytes before anything
    decodes it: a line of 50 MB is refused after one scan for its end, not parsed."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    number = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        number += 1
        if end - start > MAX_RECORD_BYTES:
            raise DataQualityError(
                f"{uri} line {number}: a record of {end - start:,} bytes, over the limit of "
                f"{MAX_RECORD_BYTES:,} bytes per record; no training example is that long (a missing line break "
                "or a corrupted file?)"
            )
        nul = data.find(b"\x00", start, end)
        if nul != -1:
            raise DataQualityError(
                f"{uri} line {number}, byte column {nul - start + 1}: NUL byte (0x00); JSON text never holds "
                "one, so the file is binary or corrupted"
            )
        yield number, data[start:end]
        start = end + 1


def _read_jsonl(uri: str, data: bytes) -> list[dict]:
    _check_text_file(uri, data)
    truncated = not data.endswith(b"\n")
    records = []
    last = data.count(b"\n") + (1 if truncated else 0)
    for number, raw in _lines(uri, data):
        line = _decode(uri, raw, number)
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if number == 1 and line.strip() in ("[", "{"):
                hint = "; the file looks like one pretty-printed JSON document, not JSON lines (one object per line)"
            elif number == last and truncated:
                hint = "; the last line looks truncated"
            raise DataQualityError(f"{uri} line {number}, column {exc.colno}: invalid JSON ({exc.msg}){hint}") from None
        if not isinstance(value, dict):
            hint = ""
            if isinstance(value, list) and number == 1 and all(isinstance(v, dict) for v in value):
                hint = f"; the file is one JSON array of {len(value)} objects: write one object per line instead"
            raise DataQualityError(
                f"{uri} line {number}: expected a JSON object per line, got {type(value).__name__}{hint}"
            )
        value[ORIGIN] = f"{uri}:{number}"
        records.append(value)
    return records


def _read_csv(uri: str, data: bytes) -> list[dict]:
    import csv

    _check_text_file(uri, data)
    nul = data.find(b"\x00")
    if nul != -1:
        line = data.count(b"\n", 0, nul) + 1
        raise DataQualityError(f"{uri} line {line}: NUL byte (0x00); the file is binary or corrupted")
    text = _decode(uri, data.removeprefix(b"\xef\xbb\xbf"))
    # strict: an unclosed quote at the end (a truncated file) or stray text after a closing quote is
    # an error, not a field that silently swallows the rest of the file.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    previous_limit = csv.field_size_limit(MAX_RECORD_BYTES)
    records = []
    ended = 0  # the line the last complete row ended on: a broken row starts after it
    try:
        if not reader.fieldnames:
            raise DataQualityError(f"{uri}: the CSV file has no header row")
        ended = reader.line_num
        for row in reader:
            ended = reader.line_num
            if None in row:
                raise DataQualityError(
                    f"{uri} line {reader.line_num}: {len(row[None])} more field(s) than the header's "
                    f"{len(reader.fieldnames)}"
                )
            if all(v in (None, "") for v in row.values()):
                continue
            record = {k: v for k, v in row.items() if v is not None}
            record[ORIGIN] = f"{uri}:{reader.line_num}"
            records.append(record)
    except csv.Error as exc:
        detail = str(exc)
        if "unexpected end of data" in detail:
            detail = "a quoted field is never closed; the file looks truncated"
        elif "field larger than field limit" in detail:
            detail = f"a field over the limit of {MAX_RECORD_BYTES:,} characters per record"
        raise DataQualityError(f"{uri} line {ended + 1}: malformed CSV ({detail})") from None
    finally:
        csv.field_size_limit(previous_limit)
    return records


def _read_parquet(uri: str, data: bytes) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataQualityError(f"{uri}: not a readable Parquet file ({exc})") from None
    # A wrongly typed column is one defect, named once, not one per row.
    wrong = [
        f"{f.name!r} is {f.type}"
        for f in table.schema
        if f.name in STRING_FIELDS
        and not (pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_null(f.type))
        and not (f.name == "id" and pa.types.is_integer(f.type))
    ]
    if wrong:
        raise DataQualityError(f"{uri}: wrong column type(s) in the Parquet schema: {', '.join(wrong)}; text expected")
    records = table.to_pylist()
    for row, record in enumerate(records, start=1):
        record[ORIGIN] = f"{uri}:row {row}"
    return records


def _given(record: dict, field: str) -> bool:
    """Whether the record sets ``field``; CSV and Parquet spell "not set" as "" and null."""
    return record.get(field) not in (None, "")


def _oversize(record: dict) -> int | None:
    """The record's size in bytes when it is over ``MAX_RECORD_BYTES``, else None."""
    strings = [v for k, v in record.items() if isinstance(v, str) and not k.startswith("_")]
    # A character is at most 4 bytes of UTF-8: most records are cleared without encoding them.
    if 4 * sum(map(len, strings)) <= MAX_RECORD_BYTES:
        return None
    size = sum(len(v.encode("utf-8")) for v in strings)
    return size if size > MAX_RECORD_BYTES else None


def _check_schema(uri: str, records: list[dict]) -> None:
    columns = Counter(k for r in records for k in r if k != ORIGIN)
    if "response" not in columns or not ({"prompt", "instruction"} & columns.keys()):
        missing = [c for c in ("response",) if c not in columns]
        if not ({"prompt", "instruction"} & columns.keys()):
            missing.append("prompt or instruction")
        found = ", ".join(sorted(columns)) or "none"
        hint = ""
        if len(columns) == 1 and (delimiter := next((d for d in ";\t|" if d in found), None)):
            hint = f"; the header is one column holding {delimiter!r}: is that the file's delimiter? use commas"
        raise DataQualityError(
            f"{uri}: missing required column(s) {', '.join(repr(m) for m in missing)} "
            f"(found: {found}){hint}; {REQUIRED_HELP}"
        )

    problems: list[str] = []
    seen_ids: dict[str, str] = {}
    by_schema: dict[str, list[dict]] = {"prompt": [], "instruction": []}
    for record in records:
        origin = record[ORIGIN]
        if "response" not in record:
            problems.append(f"{origin}: missing 'response'")
        elif "prompt" not in record and "instruction" not in record:
            problems.append(f"{origin}: missing 'prompt' or 'instruction'")
        for field in STRING_FIELDS:
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                if field == "id" and isinstance(value, int) and not isinstance(value, bool):
                    record["id"] = str(value)
                    continue
                problems.append(f"{origin}: field {field!r} must be text, got {type(value).__name__} {value!r:.40}")
        if size := _oversize(record):
            problems.append(f"{origin}: a record of {size:,} bytes, over the limit of {MAX_RECORD_BYTES:,} bytes")
        if _given(record, "prompt"):
            if _given(record, "instruction"):
                problems.append(f"{origin}: both 'prompt' and 'instruction' are set; give one of them")
            elif _given(record, "context"):
                problems.append(f"{origin}: 'context' goes with 'instruction'; with 'prompt' it would be ignored")
            by_schema["prompt"].append(record)
        elif _given(record, "instruction"):
            by_schema["instruction"].append(record)
        rid = record.get("id")
        if isinstance(rid, str) and rid:
            if rid in seen_ids:
                problems.append(f"{origin}: id {rid!r} already used at {seen_ids[rid]}")
            else:
                seen_ids[rid] = origin
        if len(problems) >= MAX_REPORTED:
            break
    if problems:
        raise DataQualityError(f"{uri}: {len(problems)} bad record(s):\n  " + "\n  ".join(problems))
    prompts, instructions = by_schema["prompt"], by_schema["instruction"]
    if prompts and instructions:
        raise DataQualityError(
            f"{uri}: mixed schemas: {len(prompts)} record(s) give 'prompt' (e.g. {examples(prompts, 2)}) and "
            f"{len(instructions)} give 'instruction' (e.g. {examples(instructions, 2)}); only instructions are "
            "rendered with the template, so the two would train on differently formatted prompts. Give every "
            "record the same one"
        )
