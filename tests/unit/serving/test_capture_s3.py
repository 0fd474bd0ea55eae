"""The capture reader on S3 (through moto): SageMaker writes its capture files there."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import boto3
import pytest
from moto import mock_aws

from serving.capture import read_capture

LINE = {
    "captureData": {
        "endpointInput": {
            "observedContentType": "application/json",
            "mode": "INPUT",
            "data": '{"inputs": "hi"}',
            "encoding": "JSON",
        },
        "endpointOutput": {
            "observedContentType": "application/json",
            "mode": "OUTPUT",
            "data": '{"generated_text": "hello"}',
            "encoding": "JSON",
        },
    },
    "eventMetadata": {"eventId": "e-1", "inferenceTime": "2026-11-22T10:15:00Z"},
    "eventVersion": "0",
}


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="capture-bucket")
        yield client


def put(s3, key: str, *records: dict) -> None:
    s3.put_object(Bucket="capture-bucket", Key=key, Body="".join(json.dumps(r) + "\n" for r in records).encode())


def test_reads_sagemaker_capture_files_from_s3_by_endpoint_variant_and_window(s3):
    later = {**LINE, "eventMetadata": {"eventId": "e-2", "inferenceTime": "2026-11-22T11:05:00Z"}}
    put(s3, "monitoring/ep/AllTraffic/2026/11/22/10/15-00-000-a.jsonl", LINE)
    put(s3, "monitoring/ep/AllTraffic/2026/11/22/11/05-00-000-b.jsonl", later)
    put(
        s3,
        "monitoring/ep/Shadow/2026/11/22/10/15-00-000-c.jsonl",
        {**LINE, "eventMetadata": {"eventId": "e-3", "inferenceTime": "2026-11-22T10:15:01Z"}},
    )
    put(s3, "monitoring/other/AllTraffic/2026/11/22/10/15-00-000-d.jsonl", LINE)
    put(s3, "monitoring/ep/notes.txt", LINE)  # not a capture file

    scan = read_capture("s3://capture-bucket/monitoring", "ep", s3_client=s3)
    assert [(r.event_id, r.variant) for r in scan.records] == [
        ("e-1", "AllTraffic"),
        ("e-3", "Shadow"),
        ("e-2", "AllTraffic"),
    ]
    assert scan.records[0].request_json() == {"inputs": "hi"}
    assert scan.records[0].response_json() == {"generated_text": "hello"}
    assert scan.records[0].endpoint == "ep" and scan.records[0].latency_ms is None

    window = read_capture(
        "s3://capture-bucket/monitoring",
        "ep",
        ["AllTraffic"],
        start=datetime(2026, 11, 22, 10, tzinfo=UTC),
        end=datetime(2026, 11, 22, 11, tzinfo=UTC),
        s3_client=s3,
    )
    assert [r.event_id for r in window.records] == ["e-1"]
    assert len(read_capture("s3://capture-bucket/monitoring", s3_client=s3).records) == 4


def test_a_bad_line_on_s3_is_skipped_and_named(s3):
    s3.put_object(
        Bucket="capture-bucket",
        Key="ep/AllTraffic/2026/11/22/10/x.jsonl",
        Body=(json.dumps(LINE) + "\n{not json\n").encode(),
    )
    scan = read_capture("s3://capture-bucket", s3_client=s3)
    assert len(scan.records) == 1
    assert len(scan.skipped) == 1 and "x.jsonl:2" in scan.skipped[0]
