"""Data capture in SageMaker's layout: a writer for the local gateway, one reader for both.

Files sit where SageMaker puts them, under the capture destination::

    <destination>/<endpoint>/<variant>/<yyyy>/<mm>/<dd>/<hh>/<MM-SS-mmm>-<uuid>.jsonl

one JSON object per line, one line per captured request::

    {"captureData": {"endpointInput":  {"observedContentType": "application/json", "mode": "INPUT",
                                        "data": "...", "encoding": "JSON"},
                     "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                        "data": "...", "encoding": "JSON"}},
     "eventMetadata": {"eventId": "...", "inferenceTime": "2026-11-22T10:00:00.123Z", "inferenceId": "..."},
     "eventVersion": "0"}

``data`` holds the payload as text when its content type is a JSON (or CSV) type, else base64.
The gateway adds fields SageMaker does not write, all in ``eventMetadata``: ``endpointName``,
``variantName``, ``latencyMs``, ``statusCode``, ``shadow`` and, on a shadow's record, the
``sourceEventId`` of the production request it mirrors; ``clientName``, the API key's client that
sent the request; ``guardrails`` when a guardrail found something (``serving.guardrails``): the
mode, the rules found per side (``{"input": [{"rule", "count"}], "output": [...]}``) and, when it
stopped the request or withheld the answer, ``"blocked": "input"`` or ``"output"``. The reader
takes the endpoint and variant from the path, so it reads SageMaker's own files as well (where the
extra fields are absent).

The writer never blocks the request path: records go to a queue that a thread drains to the
files, flushing after each batch. ``close()`` drains the queue before it returns, so every
record submitted before shutdown is on disk.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from serving.pii import scrub_text

EVENT_VERSION = "0"
_MEDIA_JSON = ("application/json",)
_MEDIA_CSV = ("text/csv",)


class CaptureFormatError(ValueError):
    """A capture file holds a line that is not a capture record."""


def local_root(destination: str) -> Path:
    """The folder of a local capture destination (a path or a ``file://`` URI)."""
    if destination.startswith("file://"):
        return Path(destination.removeprefix("file://"))
    if "://" in destination:
        raise ValueError(f"the local gateway captures to a folder or a file:// URI, not {destination!r}")
    return Path(destination)


def encode_payload(body: bytes, content_type: str | None, json_types=_MEDIA_JSON, csv_types=_MEDIA_CSV) -> dict:
    media = (content_type or "").split(";")[0].strip().lower()
    json_types = {t.split(";")[0].strip().lower() for t in json_types}
    csv_types = {t.split(";")[0].strip().lower() for t in csv_types}
    if media in json_types or media in csv_types:
        try:
            return {"data": body.decode("utf-8"), "encoding": "JSON" if media in json_types else "CSV"}
        except UnicodeDecodeError:
            pass
    return {"data": base64.b64encode(body).decode("ascii"), "encoding": "BASE64"}


def capture_record(
    *,
    endpoint: str,
    variant: str,
    request: bytes | None,
    request_type: str | None,
    response: bytes | None,
    response_type: str | None,
    status_code: int,
    latency_ms: float,
    inference_time: datetime,
    event_id: str | None = None,
    inference_id: str | None = None,
    shadow: bool = False,
    source_event_id: str | None = None,
    client: str | None = None,
    guardrails: dict | None = None,
    json_types=_MEDIA_JSON,
    csv_types=_MEDIA_CSV,
) -> dict:
    """One capture record; ``request``/``response`` None leaves that side out (CaptureMode)."""
    data: dict = {}
    if request is not None:
        data["endpointInput"] = {
            "observedContentType": request_type or "",
            "mode": "INPUT",
            **encode_payload(request, request_type, json_types, csv_types),
        }
    if response is not None:
        data["endpointOutput"] = {
            "observedContentType": response_type or "",
            "mode": "OUTPUT",
            **encode_payload(response, response_type, json_types, csv_types),
        }
    metadata = {
        "eventId": event_id or str(uuid.uuid4()),
        "inferenceTime": inference_time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{inference_time.microsecond // 1000:03d}Z",
    }
    if inference_id:
        metadata["inferenceId"] = inference_id
    metadata.update(endpointName=endpoint, variantName=variant, latencyMs=round(latency_ms, 3), statusCode=status_code)
    if shadow:
        metadata["shadow"] = True
        metadata["sourceEventId"] = source_event_id
    if client:
        metadata["clientName"] = client
    if guardrails:
        metadata["guardrails"] = guardrails
    return {"captureData": data, "eventMetadata": metadata, "eventVersion": EVENT_VERSION}


@dataclass(frozen=True)
class CaptureBudget:
    """How much data capture may take: at most ``max_bytes`` under each destination, never the
    disk's last ``min_free_bytes``, and at most ``max_queued`` records waiting for the writer. A
    record over any of them is dropped and counted (``CaptureWriter.dropped``), never waited for."""

    max_bytes: int = 10 * 1024**3
    min_free_bytes: int = 1024**3
    max_queued: int = 100_000

    def __post_init__(self):
        if self.max_bytes <= 0 or self.min_free_bytes < 0 or self.max_queued <= 0:
            raise ValueError(f"capture budget: sizes must be positive, got {self}")


class CaptureWriter:
    """Appends records to hourly JSONL files from a background thread.

    ``submit`` only enqueues (the caller never waits for a disk); ``close`` writes what is queued
    and closes the files. Files roll over every hour and at ``max_file_bytes``. The queue is
    bounded and every destination has a budget (``CaptureBudget``): what does not fit is dropped
    and counted by reason, and the writer logs an error, at most once a minute, while it drops.
    """

    def __init__(
        self,
        max_file_bytes: int = 64 * 1024 * 1024,
        flush_interval: float = 0.2,
        budget: CaptureBudget | None = None,
    ):
        self.budget = budget or CaptureBudget()
        self._queue: queue.Queue = queue.Queue(maxsize=self.budget.max_queued)
        self._used: dict[Path, int] = {}  # bytes under each destination, counted once, then kept up
        self._free_checked: dict[Path, tuple[float, int]] = {}  # destination -> (when, free bytes)
        self._logged_drop = 0.0
        self.dropped_queue_full = 0  # counted by the submitting thread
        self.dropped_over_budget = 0  # counted by the writer thread
        self._files: dict[tuple[Path, str, str, str], tuple[object, int]] = {}
        self._max_file_bytes = max_file_bytes
        self._flush_interval = flush_interval
        self._closed = threading.Event()
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def submit(self, destination: Path, endpoint: str, variant: str, record: dict, redact: bool = True) -> None:
        """Queue ``record``; with ``redact`` its payloads are scrubbed of personal data (on the
        writer's thread: the caller never waits for it) before it is written."""
        if self._closed.is_set():
            raise RuntimeError("the capture writer is closed")
        try:
            self._queue.put_nowait((destination, endpoint, variant, record, redact))
        except queue.Full:
            self.dropped_queue_full += 1
            self._log_drop(f"{self.budget.max_queued} records are waiting for the disk")

    @property
    def dropped(self) -> dict[str, int]:
        return {"QueueFull": self.dropped_queue_full, "OverBudget": self.dropped_over_budget}

    def _log_drop(self, why: str) -> None:
        now = time.monotonic()
        if now - self._logged_drop >= 60:
            self._logged_drop = now
            log = logging.getLogger("llmops.capture")
            log.error("capture is dropping records: %s (dropped: %s)", why, self.dropped)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 60) -> None:
        """Write every queued record, then close the files."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(queue.Full):  # the writer is stuck: the join below says so
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._failed(f"{self.pending()} records were still queued after {timeout:.0f}s")
            logging.getLogger("llmops.capture").error("capture: %s", self.last_error)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._flush_interval)
            except queue.Empty:
                continue
            batch = [item]
            while len(batch) < 10_000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(entry is None for entry in batch)
            for entry in batch:
                if entry is not None:
                    try:
                        self._write(*entry)
                    except Exception as exc:  # never let one record stop the thread that writes them all
                        self._failed(f"{type(exc).__name__}: {exc}")
            for key, (handle, _) in list(self._files.items()):
                try:
                    handle.flush()
                except OSError as exc:  # a full disk shows here with buffered files: count, reopen later
                    self._failed(f"{type(exc).__name__}: {exc}")
                    self._files.pop(key)
                    with contextlib.suppress(OSError):
                        handle.close()
            if stop:
                for handle, _ in self._files.values():
                    with contextlib.suppress(OSError):
                        handle.close()
                self._files.clear()
                return

    def _failed(self, error: str) -> None:
        self.failed += 1
        self.last_error = error

    def _write(self, destination: Path, endpoint: str, variant: str, record: dict, redact: bool = True) -> None:
        record = (
            redact_record(record) if redact else {**record, "eventMetadata": {**record["eventMetadata"], "pii": "raw"}}
        )
        moment = record["eventMetadata"]["inferenceTime"]
        hour = f"{moment[0:4]}/{moment[5:7]}/{moment[8:10]}/{moment[11:13]}"
        key = (destination, endpoint, variant, hour)
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")
        over = self._over_budget(destination, len(line))
        if over:
            self.dropped_over_budget += 1
            self._log_drop(over)
            return
        try:
            handle, size = self._files.get(key, (None, 0))
            if handle is None or size + len(line) > self._max_file_bytes:
                if handle is not None:
                    handle.close()
                self._close_other_hours(key)
                folder = destination / endpoint / variant / hour
                folder.mkdir(parents=True, exist_ok=True)
                now = datetime.now(UTC)
                name = f"{now:%M-%S}-{now.microsecond // 1000:03d}-{uuid.uuid4()}.jsonl"
                handle, size = open(folder / name, "ab"), 0  # noqa: SIM115 - kept open across batches
            handle.write(line)
            self._files[key] = (handle, size + len(line))
            self._used[destination] += len(line)
            self.written += 1
        except OSError as exc:  # a full or read-only disk must not take the gateway down; it is counted
            self._failed(f"{type(exc).__name__}: {exc}")

    def _over_budget(self, destination: Path, size: int) -> str | None:
        """Why a record of ``size`` bytes does not fit at ``destination``, or None."""
        if destination not in self._used:
            self._used[destination] = _folder_bytes(destination)
        if self._used[destination] + size > self.budget.max_bytes:
            return f"{destination} holds {self._used[destination]} bytes; the budget is {self.budget.max_bytes}"
        checked, free = self._free_checked.get(destination, (-1.0, 0))
        if time.monotonic() - checked > 1:  # a statfs a second is cheap; one a record is not
            probe = next((p for p in (destination, *destination.parents) if p.exists()), destination)
            free = shutil.disk_usage(probe).free
            self._free_checked[destination] = (time.monotonic(), free)
        if free - size < self.budget.min_free_bytes:
            return f"the disk of {destination} has {free} bytes free; capture leaves {self.budget.min_free_bytes}"
        return None

    def _close_other_hours(self, key: tuple) -> None:
        for other in [k for k in self._files if k[:3] == key[:3] and k[3] != key[3]]:
            self._files.pop(other)[0].close()


def _scrub_json(value, counts: Counter) -> object:
    if isinstance(value, str):
        scrubbed, found = scrub_text(value)
        counts.update(found)
        return scrubbed
    if isinstance(value, list):
        return [_scrub_json(item, counts) for item in value]
    if isinstance(value, dict):
        return {key: _scrub_json(item, counts) for key, item in value.items()}
    return value


def _redacted_side(side: dict, counts: Counter) -> dict:
    """A capture side with its payload scrubbed; untouched (byte for byte) when nothing was found."""
    found: Counter = Counter()
    if side["encoding"] == "BASE64":
        try:
            text = base64.b64decode(side["data"]).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return side  # binary: no text to scrub
        scrubbed, found = scrub_text(text)
        data = base64.b64encode(scrubbed.encode("utf-8")).decode("ascii") if found else side["data"]
    elif side["encoding"] == "JSON":
        try:
            parsed = json.loads(side["data"])
        except ValueError:
            scrubbed, found = scrub_text(side["data"])
            data = scrubbed
        else:
            scrubbed_value = _scrub_json(parsed, found)
            data = json.dumps(scrubbed_value, ensure_ascii=False, separators=(",", ":")) if found else side["data"]
    else:  # CSV
        data, found = scrub_text(side["data"])
    counts.update(found)
    return {**side, "data": data} if found else side


def redact_record(record: dict) -> dict:
    """The record with personal data scrubbed from its payloads (``serving.pii.scrub_text``: the
    curation step's scrubber) and ``eventMetadata.pii`` saying what was replaced."""
    counts: Counter = Counter()
    data = {name: _redacted_side(side, counts) for name, side in record["captureData"].items()}
    metadata = {**record["eventMetadata"], "pii": {"redacted": dict(sorted(counts.items()))}}
    return {**record, "captureData": data, "eventMetadata": metadata}


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                total += os.stat(os.path.join(root, name)).st_size
    return total


@dataclass(frozen=True)
class CapturedRecord:
    endpoint: str
    variant: str
    event_id: str
    inference_time: datetime
    request: str | None
    request_type: str | None
    response: str | None
    response_type: str | None
    inference_id: str | None = None
    latency_ms: float | None = None
    status_code: int | None = None
    shadow: bool = False
    source_event_id: str | None = None
    client: str | None = None
    guardrails: dict | None = None
    pii: dict | str | None = None  # {"redacted": {type: count}}, "raw", or None (a record from before)
    path: str = ""

    @property
    def blocked(self) -> str | None:
        """``"input"`` when a guardrail refused the request (no model saw it), ``"output"`` when it
        withheld the answer, else None."""
        return (self.guardrails or {}).get("blocked")

    def request_json(self):
        return _as_json(self.request)

    def response_json(self):
        return _as_json(self.response)


def _as_json(text: str | None):
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _decode(side: dict | None) -> tuple[str | None, str | None]:
    if not side:
        return None, None
    data = side.get("data")
    if data is None:
        return None, side.get("observedContentType")
    if side.get("encoding") == "BASE64":
        raw = base64.b64decode(data)
        try:
            data = raw.decode("utf-8")
        except UnicodeDecodeError:
            data = raw.decode("latin-1")
    return data, side.get("observedContentType")


def parse_time(text: str) -> datetime:
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_record(line: str, endpoint: str, variant: str, where: str = "") -> CapturedRecord:
    """One JSONL line of a capture file; ``endpoint`` and ``variant`` come from its path."""
    try:
        data = json.loads(line)
        capture = data["captureData"]
        metadata = data["eventMetadata"]
        request, request_type = _decode(capture.get("endpointInput"))
        response, response_type = _decode(capture.get("endpointOutput"))
        return CapturedRecord(
            endpoint=metadata.get("endpointName", endpoint),
            variant=metadata.get("variantName", variant),
            event_id=metadata["eventId"],
            inference_time=parse_time(metadata["inferenceTime"]),
            request=request,
            request_type=request_type,
            response=response,
            response_type=response_type,
            inference_id=metadata.get("inferenceId"),
            latency_ms=metadata.get("latencyMs"),
            status_code=metadata.get("statusCode"),
            shadow=bool(metadata.get("shadow", False)),
            source_event_id=metadata.get("sourceEventId"),
            client=metadata.get("clientName"),
            guardrails=metadata.get("guardrails") if isinstance(metadata.get("guardrails"), dict) else None,
            pii=metadata.get("pii"),
            path=where,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CaptureFormatError(f"{where}: not a capture record ({type(exc).__name__}: {exc})") from None


@dataclass
class CaptureScan:
    """What a read found: the records, and the lines it had to skip (with where and why)."""

    records: list[CapturedRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: int = 0


class _S3:
    """Listing and reading capture files under an ``s3://`` destination with boto3."""

    def __init__(self, destination: str, client=None):
        import boto3

        bucket, _, prefix = destination.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client or boto3.client("s3")

    def listing(self, endpoint: str | None) -> Iterator[tuple[str, str, str, str]]:
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root + (f"{endpoint}/" if endpoint else "")):
            for item in page.get("Contents", []):
                parts = item["Key"][len(root) :].split("/")
                if len(parts) == 7 and parts[-1].endswith(".jsonl"):
                    yield item["Key"], parts[0], parts[1], "/".join(parts[2:6])

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


def _hours_between(start: datetime | None, end: datetime | None) -> set[str] | None:
    if start is None or end is None or end - start > timedelta(days=31):
        return None
    hours, moment = set(), start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while moment <= end:
        hours.add(moment.strftime("%Y/%m/%d/%H"))
        moment += timedelta(hours=1)
    return hours


def _local_listing(root: Path, endpoint: str | None) -> Iterator[tuple[str, str, str, str]]:
    """(path, endpoint, variant, yyyy/mm/dd/hh) of every capture file under ``root``."""
    for path in sorted(root.glob(f"{endpoint or '*'}/*/*/*/*/*/*.jsonl")):
        parts = path.relative_to(root).parts
        yield str(path), parts[0], parts[1], "/".join(parts[2:6])


def read_capture(
    destination: str,
    endpoint: str | None = None,
    variants: Iterable[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    s3_client=None,
) -> CaptureScan:
    """Every record under ``destination`` (a folder, ``file://`` or ``s3://`` URI), optionally of
    one endpoint and some variants, with ``start <= inferenceTime < end``; sorted by time. A
    line cut short by a writer still writing is left for the next read; a malformed line is
    skipped and reported. ``s3_client``: a boto3 S3 client for ``s3://`` (default: boto3's)."""
    s3 = _S3(destination, s3_client) if destination.startswith("s3://") else None
    root = None if s3 else local_root(destination)
    wanted = set(variants) if variants is not None else None
    hours = _hours_between(start, end)
    scan = CaptureScan()
    if s3 is None and not root.is_dir():
        return scan
    listing = s3.listing(endpoint) if s3 else _local_listing(root, endpoint)
    for path, endpoint_name, variant, hour in listing:
        if (wanted is not None and variant not in wanted) or (hours is not None and hour not in hours):
            continue
        scan.files += 1
        if s3 is None:
            with open(path, "rb") as handle:
                content = handle.read()
        else:
            content = s3.read(path)
        lines = content.split(b"\n")
        for number, raw in enumerate(lines[:-1], start=1):  # the last piece follows the last newline
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = parse_record(raw.decode("utf-8"), endpoint_name, variant, where)
            except CaptureFormatError as exc:
                scan.skipped.append(str(exc))
                continue
            except UnicodeDecodeError as exc:
                scan.skipped.append(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if (start is None or record.inference_time >= start) and (end is None or record.inference_time < end):
                scan.records.append(record)
        # An unterminated last line is a writer mid-write (not a record yet), or a file cut short.
        if lines[-1].strip() and s3 is None and time.time() - os.path.getmtime(path) > 60:
            scan.skipped.append(f"{path}:{len(lines)}: an unterminated last line (the file was cut short)")
    scan.records.sort(key=lambda r: r.inference_time)
    return scan
