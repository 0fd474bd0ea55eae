"""Read a raw dataset (JSON lines, CSV or Parquet; a local path or any fsspec URI).

Every defect is reported with where it is: the URI, the line (or row) and, for JSON, the column.
Each record keeps its origin in ``_origin`` so later stages can point at it too.
"""

from __future__ import annotations

import io
import json
from collections import Counter

from llmops import storage
from llmops.data.records import ORIGIN, DataQualityError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_HELP = "each record needs 'response' and either 'prompt' or 'instruction' (optional 'context')"
MAX_REPORTED = 5


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
    if not data.strip():
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


def _decode(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataQualityError(
            f"{uri} line {line}, byte column {column}: not valid UTF-8 "
            f"(byte 0x{data[exc.start]:02x}); re-encode the file as UTF-8"
        ) from None


def _read_jsonl(uri: str, data: bytes) -> list[dict]:
    text = _decode(uri, data)
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if number == len(lines) and not text.endswith("\n"):
                hint = "; the last line looks truncated"
            raise DataQualityError(f"{uri} line {number}, column {exc.colno}: invalid JSON ({exc.msg}){hint}") from None
        if not isinstance(value, dict):
            raise DataQualityError(f"{uri} line {number}: expected a JSON object per line, got {type(value).__name__}")
        value[ORIGIN] = f"{uri}:{number}"
        records.append(value)
    return records


def _read_csv(uri: str, data: bytes) -> list[dict]:
    import csv

    text = _decode(uri, data)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataQualityError(f"{uri}: the CSV file has no header row")
    records = []
    try:
        for row in reader:
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
        raise DataQualityError(f"{uri} line {reader.line_num}: malformed CSV ({exc})") from None
    return records


def _read_parquet(uri: str, data: bytes) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataQualityError(f"{uri}: not a readable Parquet file ({exc})") from None
    records = table.to_pylist()
    for row, record in enumerate(records, start=1):
        record[ORIGIN] = f"{uri}:row {row}"
    return records


def _check_schema(uri: str, records: list[dict]) -> None:
    columns = Counter(k for r in records for k in r if k != ORIGIN)
    if "response" not in columns or not ({"prompt", "instruction"} & columns.keys()):
        missing = [c for c in ("response",) if c not in columns]
        if not ({"prompt", "instruction"} & columns.keys()):
            missing.append("prompt or instruction")
        raise DataQualityError(
            f"{uri}: missing required column(s) {', '.join(repr(m) for m in missing)} "
            f"(found: {', '.join(sorted(columns)) or 'none'}); {REQUIRED_HELP}"
        )

    problems: list[str] = []
    seen_ids: dict[str, str] = {}
    for record in records:
        origin = record[ORIGIN]
        if "response" not in record:
            problems.append(f"{origin}: missing 'response'")
        elif "prompt" not in record and "instruction" not in record:
            problems.append(f"{origin}: missing 'prompt' or 'instruction'")
        for field in ("prompt", "instruction", "context", "response", "source", "id", "split"):
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                if field == "id" and isinstance(value, int) and not isinstance(value, bool):
                    record["id"] = str(value)
                    continue
                problems.append(f"{origin}: field {field!r} must be text, got {type(value).__name__} {value!r:.40}")
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
