"""Data capture in SageMaker's layout: the gateway's writer, and the reader that reads the
writer's files and SageMaker's own (written here by hand, byte for byte as SageMaker does)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from serving.capture import (
    CaptureBudget,
    CaptureFormatError,
    CaptureWriter,
    capture_record,
    encode_payload,
    local_root,
    parse_record,
    read_capture,
)

MOMENT = datetime(2026, 11, 22, 10, 15, 30, 123456, tzinfo=UTC)
FILE_NAME = re.compile(r"^\d{2}-\d{2}-\d{3}-[0-9a-f-]{36}\.jsonl$")


@pytest.fixture
def writer():
    w = CaptureWriter(flush_interval=0.01)
    yield w
    w.close()


def record(
    endpoint: str = "ep",
    variant: str = "champion",
    at: datetime = MOMENT,
    event_id: str | None = None,
    **fields,
) -> dict:
    values = {
        "request": b'{"inputs": "hi"}',
        "request_type": "application/json",
        "response": b'{"generated_text": "hello"}',
        "response_type": "application/json",
        "status_code": 200,
        "latency_ms": 12.3456,
        **fields,
    }
    return capture_record(endpoint=endpoint, variant=variant, inference_time=at, event_id=event_id, **values)


def write(tmp_path: Path, records: list[tuple[str, str, dict]], **options) -> CaptureWriter:
    w = CaptureWriter(flush_interval=0.01, **options)
    for endpoint, variant, rec in records:
        w.submit(tmp_path, endpoint, variant, rec)
    w.close()
    return w


def sagemaker_file(root: Path, lines: list[str], hour: str = "2022/02/14/17", variant: str = "AllTraffic") -> Path:
    folder = root / "my-endpoint" / variant / hour
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "25-49-123-0f8fad5b-d9cb-469f-a165-70867728950e.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# SageMaker's own lines, as its Data Capture writes them.
SM_CSV = (
    '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":"69,0,153.7",'
    '"encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8","mode":"OUTPUT",'
    '"data":"0.0254","encoding":"CSV"}},"eventMetadata":{"eventId":"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",'
    '"inferenceTime":"2022-02-14T17:25:49Z"},"eventVersion":"0"}'
)
SM_JSON = (
    '{"captureData":{"endpointInput":{"observedContentType":"application/json","mode":"INPUT",'
    '"data":"{\\"inputs\\": \\"What is 2+2?\\"}","encoding":"JSON"},"endpointOutput":{"observedContentType":'
    '"application/json","mode":"OUTPUT","data":"[{\\"generated_text\\": \\"4\\"}]","encoding":"JSON"}},'
    '"eventMetadata":{"eventId":"bbbbbbbb-bbbb-cccc-dddd-eeeeeeeeeeee","inferenceTime":"2022-02-14T17:25:50Z"},'
    '"eventVersion":"0"}'
)
SM_BASE64 = (
    '{"captureData":{"endpointInput":{"observedContentType":"application/x-npy","mode":"INPUT",'
    f'"data":"{base64.b64encode(b"numpy payload").decode()}","encoding":"BASE64"}},"endpointOutput":'
    '{"observedContentType":"application/x-npy","mode":"OUTPUT",'
    f'"data":"{base64.b64encode(bytes([0x93, 0x4E, 0xFF, 0x00])).decode()}","encoding":"BASE64"}}}},'
    '"eventMetadata":{"eventId":"cccccccc-bbbb-cccc-dddd-eeeeeeeeeeee","inferenceTime":"2022-02-14T17:25:51Z"},'
    '"eventVersion":"0"}'
)
SM_INFERENCE_ID = (
    '{"captureData":{"endpointInput":{"observedContentType":"text/csv","mode":"INPUT","data":"1,2,3",'
    '"encoding":"CSV"},"endpointOutput":{"observedContentType":"text/csv; charset=utf-8","mode":"OUTPUT",'
    '"data":"0.5","encoding":"CSV"}},"eventMetadata":{"eventId":"dddddddd-bbbb-cccc-dddd-eeeeeeeeeeee",'
    '"inferenceId":"customer-42","inferenceTime":"2022-02-14T17:25:52.345Z"},"eventVersion":"0"}'
)


# -- writer -> reader ---------------------------------------------------------------------------


def test_records_land_in_sagemakers_folder_layout(tmp_path):
    write(tmp_path, [("ep", "champion", record()), ("ep", "challenger", record(variant="challenger"))])
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert [f.relative_to(tmp_path).parent.as_posix() for f in files] == [
        "ep/challenger/2026/11/22/10",
        "ep/champion/2026/11/22/10",
    ]
    assert all(FILE_NAME.match(f.name) for f in files)


def test_the_hour_folder_is_the_utc_hour_of_the_inference(tmp_path):
    local = timezone(timedelta(hours=5, minutes=30))
    write(tmp_path, [("ep", "v", record(at=datetime(2026, 1, 1, 3, 10, tzinfo=local)))])
    (path,) = tmp_path.rglob("*.jsonl")
    assert path.parent.relative_to(tmp_path).as_posix() == "ep/v/2025/12/31/21"
    line = json.loads(path.read_text())
    assert line["eventMetadata"]["inferenceTime"] == "2025-12-31T21:40:00.000Z"


def test_every_field_survives_a_round_trip(tmp_path):
    production = record(event_id="e-1", inference_id="inf-1", latency_ms=12.3456, status_code=200)
    shadow = record(
        variant="shadow",
        event_id="e-2",
        inference_id="inf-1",
        status_code=503,
        latency_ms=99.0,
        shadow=True,
        source_event_id="e-1",
        at=MOMENT + timedelta(seconds=1),
    )
    write(tmp_path, [("ep", "champion", production), ("ep", "shadow", shadow)])

    scan = read_capture(str(tmp_path))
    assert scan.skipped == []
    assert scan.files == 2
    first, second = scan.records
    assert (first.endpoint, first.variant, first.event_id, first.inference_id) == ("ep", "champion", "e-1", "inf-1")
    assert first.inference_time == MOMENT.replace(microsecond=123000)
    assert first.latency_ms == pytest.approx(12.346)
    assert first.status_code == 200
    assert first.shadow is False and first.source_event_id is None
    assert first.request_json() == {"inputs": "hi"}
    assert first.response_json() == {"generated_text": "hello"}
    assert (first.request_type, first.response_type) == ("application/json", "application/json")
    assert first.path.endswith(":1") and "/ep/champion/2026/11/22/10/" in first.path

    assert (second.variant, second.event_id, second.status_code, second.latency_ms) == ("shadow", "e-2", 503, 99.0)
    assert second.shadow is True
    assert second.source_event_id == "e-1"


def test_the_client_and_guardrail_findings_survive_a_round_trip(tmp_path):
    findings = {"mode": "block", "input": [{"rule": "injection.role_markers", "count": 2}], "blocked": "input"}
    refused = record(event_id="e-1", status_code=400, client="notebook", guardrails=findings)
    plain = record(event_id="e-2", at=MOMENT + timedelta(seconds=1))
    assert refused["eventMetadata"]["clientName"] == "notebook"
    assert "guardrails" not in plain["eventMetadata"] and "clientName" not in plain["eventMetadata"]
    write(tmp_path, [("ep", "v", refused), ("ep", "v", plain)])
    first, second = read_capture(str(tmp_path)).records
    assert (first.client, first.guardrails, first.blocked) == ("notebook", findings, "input")
    assert (second.client, second.guardrails, second.blocked) == (None, None, None)


def test_a_generated_event_id_is_a_fresh_uuid():
    first, second = record(), record()
    ids = {first["eventMetadata"]["eventId"], second["eventMetadata"]["eventId"]}
    assert len(ids) == 2
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", i) for i in ids)


def test_a_side_left_out_is_absent_from_the_record_and_none_when_read(tmp_path):
    input_only = record(response=None, response_type=None, event_id="in")
    output_only = record(request=None, request_type=None, event_id="out", at=MOMENT + timedelta(seconds=1))
    assert set(input_only["captureData"]) == {"endpointInput"}
    assert set(output_only["captureData"]) == {"endpointOutput"}
    write(tmp_path, [("ep", "v", input_only), ("ep", "v", output_only)])
    a, b = read_capture(str(tmp_path)).records
    assert a.request_json() == {"inputs": "hi"} and a.response is None and a.response_type is None
    assert b.request is None and b.response_json() == {"generated_text": "hello"}


def test_close_writes_everything_submitted_before_it(tmp_path):
    w = CaptureWriter(flush_interval=0.01)
    ids = [f"event-{i:05d}" for i in range(5_000)]
    for i, event_id in enumerate(ids):
        at = MOMENT + timedelta(milliseconds=i)
        w.submit(tmp_path, "ep", "champion" if i % 3 else "challenger", record(event_id=event_id, at=at))
    w.close()

    assert w.written == 5_000 and w.failed == 0
    scan = read_capture(str(tmp_path))
    assert scan.skipped == []
    read_ids = [r.event_id for r in scan.records]
    assert len(read_ids) == len(set(read_ids)) == 5_000
    assert set(read_ids) == set(ids)


def test_a_closed_writer_refuses_records_and_closes_once(tmp_path):
    w = CaptureWriter(flush_interval=0.01)
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(tmp_path, "ep", "v", record())


def test_submit_does_not_wait_for_the_disk(writer, tmp_path):
    writer.submit(tmp_path, "ep", "v", record(event_id="x"))
    assert writer.pending() in (0, 1)
    deadline = time.monotonic() + 5
    while writer.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.written == 1
    # flushed after the batch: readable before close
    assert [r.event_id for r in read_capture(str(tmp_path)).records] == ["x"]


def test_a_file_rolls_over_past_max_file_bytes_and_nothing_is_lost(tmp_path):
    line_bytes = len(json.dumps(record(event_id="e-000"), separators=(",", ":")).encode()) + 1
    records = [("ep", "v", record(event_id=f"e-{i:03d}", at=MOMENT + timedelta(seconds=i))) for i in range(40)]
    write(tmp_path, records, max_file_bytes=5 * line_bytes)

    files = list(tmp_path.rglob("*.jsonl"))
    assert len(files) >= 8
    assert all(f.stat().st_size <= 5 * line_bytes for f in files)
    scan = read_capture(str(tmp_path))
    assert [r.event_id for r in scan.records] == [f"e-{i:03d}" for i in range(40)]


def test_records_of_different_hours_go_to_their_own_folders(tmp_path):
    hours = [MOMENT, MOMENT + timedelta(hours=1), MOMENT + timedelta(hours=25)]
    write(tmp_path, [("ep", "v", record(event_id=str(i), at=at)) for i, at in enumerate(hours)])
    folders = sorted(p.parent.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jsonl"))
    assert folders == ["ep/v/2026/11/22/10", "ep/v/2026/11/22/11", "ep/v/2026/11/23/11"]
    assert [r.event_id for r in read_capture(str(tmp_path)).records] == ["0", "1", "2"]


def test_a_file_uri_destination_reads_like_a_folder(tmp_path):
    write(tmp_path, [("ep", "v", record(event_id="x"))])
    assert [r.event_id for r in read_capture(f"file://{tmp_path}").records] == ["x"]


# -- encodings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_stored_as_text_with_encoding_json(content_type):
    side = capture_record(
        endpoint="ep",
        variant="v",
        request='{"inputs": "héllo"}'.encode(),
        request_type=content_type,
        response=None,
        response_type=None,
        status_code=200,
        latency_ms=1,
        inference_time=MOMENT,
    )["captureData"]["endpointInput"]
    assert side == {
        "observedContentType": content_type,
        "mode": "INPUT",
        "data": '{"inputs": "héllo"}',
        "encoding": "JSON",
    }


def test_csv_content_types_are_stored_as_text_with_encoding_csv(tmp_path):
    rec = record(request=b"69,0,153.7", request_type="text/csv", response=b"0.0254", response_type="text/csv")
    assert rec["captureData"]["endpointInput"]["encoding"] == "CSV"
    assert rec["captureData"]["endpointInput"]["data"] == "69,0,153.7"
    write(tmp_path, [("ep", "v", rec)])
    (read,) = read_capture(str(tmp_path)).records
    assert (read.request, read.response) == ("69,0,153.7", "0.0254")
    assert read.request_json() is None  # CSV text, not JSON


def test_other_content_types_are_stored_as_base64_and_decoded_back(tmp_path):
    payload = bytes([0x00, 0x80, 0xFF, 0xFE, 0x41])
    rec = record(
        request=payload, request_type="application/octet-stream", response=b"plain", response_type="text/plain"
    )
    side = rec["captureData"]["endpointInput"]
    assert side["encoding"] == "BASE64"
    assert base64.b64decode(side["data"]) == payload
    assert rec["captureData"]["endpointOutput"]["encoding"] == "BASE64"

    write(tmp_path, [("ep", "v", rec)])
    (read,) = read_capture(str(tmp_path)).records
    assert read.request.encode("latin-1") == payload
    assert read.request_type == "application/octet-stream"
    assert read.response == "plain"


def test_a_json_typed_body_that_is_not_utf8_falls_back_to_base64():
    encoded = encode_payload(b"\xff\xfe{}", "application/json")
    assert encoded == {"data": base64.b64encode(b"\xff\xfe{}").decode(), "encoding": "BASE64"}


def test_the_configured_content_types_decide_the_encoding():
    jsonlines = ("application/jsonlines",)
    assert encode_payload(b'{"a":1}', "application/jsonlines", json_types=jsonlines)["encoding"] == "JSON"
    assert encode_payload(b'{"a":1}', "application/json", json_types=jsonlines)["encoding"] == "BASE64"
    assert encode_payload(b"a,b", "text/x-csv", csv_types=("text/x-csv",))["encoding"] == "CSV"
    assert encode_payload(b"", None)["encoding"] == "BASE64"


def test_configured_content_types_match_whatever_their_case():
    assert encode_payload(b'{"a":1}', "application/json", json_types=("Application/JSON",))["encoding"] == "JSON"
    assert encode_payload(b"a,b", "text/csv", csv_types=("Text/CSV",))["encoding"] == "CSV"


# -- reading SageMaker's own files --------------------------------------------------------------


def test_the_reader_parses_sagemakers_own_capture_files(tmp_path):
    path = sagemaker_file(tmp_path, [SM_CSV, SM_JSON, SM_BASE64, SM_INFERENCE_ID])

    scan = read_capture(str(tmp_path))
    assert scan.skipped == []
    assert scan.files == 1
    csv, js, b64, with_id = scan.records

    assert (csv.endpoint, csv.variant) == ("my-endpoint", "AllTraffic")
    assert csv.event_id == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    assert csv.inference_time == datetime(2022, 2, 14, 17, 25, 49, tzinfo=UTC)
    assert (csv.request, csv.request_type) == ("69,0,153.7", "text/csv")
    assert (csv.response, csv.response_type) == ("0.0254", "text/csv; charset=utf-8")
    assert csv.latency_ms is None and csv.status_code is None
    assert csv.shadow is False and csv.source_event_id is None and csv.inference_id is None
    assert csv.path == f"{path}:1"

    assert js.request_json() == {"inputs": "What is 2+2?"}
    assert js.response_json() == [{"generated_text": "4"}]

    assert b64.request == "numpy payload"
    assert b64.response.encode("latin-1") == bytes([0x93, 0x4E, 0xFF, 0x00])
    assert b64.request_type == "application/x-npy"

    assert with_id.inference_id == "customer-42"
    assert with_id.inference_time == datetime(2022, 2, 14, 17, 25, 52, 345000, tzinfo=UTC)
    assert all((r.endpoint, r.variant) == ("my-endpoint", "AllTraffic") for r in scan.records)


def test_parse_record_takes_endpoint_and_variant_from_the_path_when_absent():
    parsed = parse_record(SM_CSV, "from-path", "Variant1", where="f.jsonl:3")
    assert (parsed.endpoint, parsed.variant, parsed.path) == ("from-path", "Variant1", "f.jsonl:3")


@pytest.mark.parametrize(
    "line",
    ["not json", "[1, 2]", '"text"', "{}", '{"captureData": {}}', '{"captureData": {}, "eventMetadata": {}}'],
)
def test_parse_record_rejects_what_is_not_a_capture_record(line):
    with pytest.raises(CaptureFormatError, match="f.jsonl:7: not a capture record"):
        parse_record(line, "ep", "v", where="f.jsonl:7")


def test_records_are_sorted_by_inference_time_across_files(tmp_path):
    sagemaker_file(tmp_path, [SM_JSON], variant="B")
    sagemaker_file(tmp_path, [SM_CSV], variant="A")
    sagemaker_file(tmp_path, [SM_INFERENCE_ID], variant="C")
    scan = read_capture(str(tmp_path))
    assert [r.variant for r in scan.records] == ["A", "B", "C"]


# -- filters ------------------------------------------------------------------------------------


def test_filters_by_endpoint_and_variants(tmp_path):
    write(
        tmp_path,
        [
            ("ep", "champion", record(event_id="1")),
            ("ep", "challenger", record(event_id="2")),
            ("ep", "shadow", record(event_id="3")),
            ("other", "champion", record(event_id="4")),
        ],
    )
    assert {r.event_id for r in read_capture(str(tmp_path)).records} == {"1", "2", "3", "4"}
    assert {r.event_id for r in read_capture(str(tmp_path), endpoint="ep").records} == {"1", "2", "3"}
    assert {r.event_id for r in read_capture(str(tmp_path), endpoint="other").records} == {"4"}
    picked = read_capture(str(tmp_path), endpoint="ep", variants=["champion", "shadow"])
    assert {r.event_id for r in picked.records} == {"1", "3"}
    assert picked.files == 2
    assert read_capture(str(tmp_path), endpoint="ep", variants=[]).records == []
    assert read_capture(str(tmp_path), endpoint="missing").records == []


def test_a_time_window_keeps_start_and_excludes_end(tmp_path):
    times = {
        "before": MOMENT - timedelta(hours=2),
        "at-start": MOMENT,
        "inside": MOMENT + timedelta(minutes=30),
        "at-end": MOMENT + timedelta(hours=1),
        "after": MOMENT + timedelta(hours=3),
    }
    write(tmp_path, [("ep", "v", record(event_id=name, at=at)) for name, at in times.items()])
    start, end = times["at-start"].replace(microsecond=123000), times["at-end"].replace(microsecond=123000)

    scan = read_capture(str(tmp_path), start=start, end=end)
    assert [r.event_id for r in scan.records] == ["at-start", "inside"]
    assert scan.files == 2  # only the hour folders 10 and 11 are opened, of the four

    assert [r.event_id for r in read_capture(str(tmp_path), start=start).records] == [
        "at-start",
        "inside",
        "at-end",
        "after",
    ]
    assert [r.event_id for r in read_capture(str(tmp_path), end=end).records] == ["before", "at-start", "inside"]


def test_a_window_excludes_records_in_the_same_hour_folder_but_outside_it(tmp_path):
    base = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    write(tmp_path, [("ep", "v", record(event_id=f"m{m}", at=base + timedelta(minutes=m))) for m in (5, 20, 40)])
    scan = read_capture(str(tmp_path), start=base + timedelta(minutes=10), end=base + timedelta(minutes=30))
    assert [r.event_id for r in scan.records] == ["m20"]


def test_a_window_given_in_another_timezone_finds_the_utc_hour_folders(tmp_path):
    write(tmp_path, [("ep", "v", record(event_id="x", at=datetime(2026, 11, 22, 10, 30, tzinfo=UTC)))])
    plus_two = timezone(timedelta(hours=2))
    scan = read_capture(
        str(tmp_path),
        start=datetime(2026, 11, 22, 12, 15, tzinfo=plus_two),
        end=datetime(2026, 11, 22, 12, 45, tzinfo=plus_two),
    )
    assert [r.event_id for r in scan.records] == ["x"]


def test_a_sagemaker_file_in_another_hour_folder_is_outside_the_window(tmp_path):
    sagemaker_file(tmp_path, [SM_CSV], hour="2022/02/14/17")
    sagemaker_file(tmp_path, [SM_INFERENCE_ID.replace("T17:", "T18:")], hour="2022/02/14/18")
    scan = read_capture(
        str(tmp_path),
        endpoint="my-endpoint",
        start=datetime(2022, 2, 14, 17, 0, tzinfo=UTC),
        end=datetime(2022, 2, 14, 18, 0, tzinfo=UTC),
    )
    assert [r.event_id for r in scan.records] == ["aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]


# -- damaged and missing files ------------------------------------------------------------------


def test_a_malformed_line_is_skipped_and_reported_while_the_others_read(tmp_path):
    path = sagemaker_file(tmp_path, [SM_CSV, "{this is not json", SM_JSON, "", '{"eventVersion": "0"}'])
    scan = read_capture(str(tmp_path))
    assert [r.event_id[:8] for r in scan.records] == ["aaaaaaaa", "bbbbbbbb"]
    assert len(scan.skipped) == 2
    assert scan.skipped[0].startswith(f"{path}:2: not a capture record")
    assert scan.skipped[1].startswith(f"{path}:5: not a capture record")


def test_a_line_that_is_not_utf8_is_skipped_and_the_others_read(tmp_path):
    path = sagemaker_file(tmp_path, [SM_CSV])
    with open(path, "ab") as handle:
        handle.write(b'{"captureData": "\xff\xfe"}\n' + SM_JSON.encode() + b"\n")
    scan = read_capture(str(tmp_path))
    assert [r.event_id[:8] for r in scan.records] == ["aaaaaaaa", "bbbbbbbb"]
    assert len(scan.skipped) == 1


def test_a_line_that_is_not_utf8_is_reported_with_its_file_and_line(tmp_path):
    path = sagemaker_file(tmp_path, [SM_CSV])
    with open(path, "ab") as handle:
        handle.write(b'{"captureData": "\xff\xfe"}\n')
    (skipped,) = read_capture(str(tmp_path)).skipped
    assert skipped.startswith(f"{path}:2")


def test_an_unterminated_last_line_is_not_a_record(tmp_path):
    path = sagemaker_file(tmp_path, [SM_CSV])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(SM_JSON)  # a writer mid-write: the newline is not there yet
    scan = read_capture(str(tmp_path))
    assert [r.event_id[:8] for r in scan.records] == ["aaaaaaaa"]
    assert scan.skipped == []  # fresh: left for the next read, not reported

    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n")
    assert [r.event_id[:8] for r in read_capture(str(tmp_path)).records] == ["aaaaaaaa", "bbbbbbbb"]


def test_an_old_unterminated_last_line_is_reported_as_cut_short(tmp_path):
    path = sagemaker_file(tmp_path, [SM_CSV])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(SM_JSON[:40])
    old = time.time() - 3600
    os.utime(path, (old, old))
    scan = read_capture(str(tmp_path))
    assert len(scan.records) == 1
    assert scan.skipped == [f"{path}:2: an unterminated last line (the file was cut short)"]


def test_a_missing_destination_is_an_empty_scan(tmp_path):
    for destination in (str(tmp_path / "nothing-here"), f"file://{tmp_path}/nothing-here"):
        scan = read_capture(destination)
        assert (scan.records, scan.skipped, scan.files) == ([], [], 0)


def test_files_outside_the_layout_are_ignored(tmp_path):
    (tmp_path / "ep" / "v").mkdir(parents=True)
    (tmp_path / "ep" / "v" / "stray.jsonl").write_text(SM_CSV + "\n")
    sagemaker_file(tmp_path, [SM_CSV]).with_suffix(".json").write_text(SM_CSV + "\n")
    scan = read_capture(str(tmp_path))
    assert len(scan.records) == 1 and scan.files == 1


# -- destinations -------------------------------------------------------------------------------


def test_local_root_takes_a_folder_or_a_file_uri(tmp_path):
    assert local_root(str(tmp_path)) == tmp_path
    assert local_root(f"file://{tmp_path}") == tmp_path
    assert local_root("relative/capture") == Path("relative/capture")


@pytest.mark.parametrize("destination", ["s3://bucket/capture", "gs://bucket/x", "http://host/x"])
def test_local_root_rejects_remote_destinations(destination):
    with pytest.raises(ValueError, match="folder or a file:// URI"):
        local_root(destination)


# -- budgets: bounded queue, bounded disk --------------------------------------------------------


def test_a_destination_over_its_budget_drops_records_counted_and_never_waits(tmp_path, caplog):
    one = len(json.dumps(record(), separators=(",", ":")).encode()) + 1
    (tmp_path / "ep").mkdir()
    (tmp_path / "ep" / "earlier.jsonl").write_bytes(b"x" * one)  # what an earlier run left counts too
    w = write(
        tmp_path, [("ep", "champion", record(event_id=str(n))) for n in range(5)], budget=CaptureBudget(3 * one, 0)
    )
    assert (w.written, w.dropped) == (2, {"QueueFull": 0, "OverBudget": 3})
    assert "capture is dropping records" in caplog.text and "the budget is" in caplog.text


def test_capture_leaves_the_disk_its_free_space(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    w = write(tmp_path, [("ep", "champion", record())], budget=CaptureBudget(min_free_bytes=free + 10**9))
    assert (w.written, w.dropped["OverBudget"]) == (0, 1)
    assert not list(tmp_path.rglob("*.jsonl"))


def test_a_full_queue_drops_and_counts_instead_of_growing(tmp_path, monkeypatch):
    w = CaptureWriter(flush_interval=0.01, budget=CaptureBudget(max_queued=3))
    writing, release = threading.Event(), threading.Event()

    def stuck(*_):  # a disk that does not answer
        writing.set()
        release.wait(10)

    monkeypatch.setattr(w, "_write", stuck)
    w.submit(tmp_path, "ep", "champion", record(event_id="first"))
    assert writing.wait(5)  # the writer holds the first record
    for n in range(10):
        w.submit(tmp_path, "ep", "champion", record(event_id=str(n)))
    assert (w.pending(), w.dropped["QueueFull"]) == (3, 7)
    release.set()
    w.close()


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="sizes must be positive"):
        CaptureBudget(max_bytes=0)
