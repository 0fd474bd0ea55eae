"""The drift monitor's store and capture on S3 (through moto): baselines are written and read
back there, SageMaker's own capture files are read from there, and the report lands there."""

from __future__ import annotations

import json
import zlib

import boto3
import numpy as np
import pytest
from moto import mock_aws

from llmops import storage
from llmops.drift import monitor as monitoring
from tests.datagen import dataset_manifest

BUCKET = "llmops-drift"


def embed(texts):
    """A hashing bag-of-words embedding: enough to tell vocabularies apart, no model."""
    vectors = np.zeros((len(texts), 32), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            vectors[row, zlib.crc32(word.encode()) % 32] += 1.0
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


@pytest.fixture
def aws(monkeypatch):
    from llmops.config import load_settings

    monkeypatch.setenv("LLMOPS_S3_BUCKET", BUCKET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        settings = load_settings("aws")
        settings = settings.model_copy(
            update={"monitoring": settings.monitoring.model_copy(update={"baseline_sample": 40})}
        )
        yield settings, {"client": client}


def manifest(settings, options) -> dict:
    topics = ["lists", "dicts", "sets", "tuples", "generators", "decorators", "classes", "strings"]
    records = [
        {"prompt": f"Explain {topics[i % 8]} in Python, example {i}.", "response": f"{topics[i % 8]} hold values."}
        for i in range(80)
    ]
    uri = storage.join(settings.datasets_uri(), "python-docs-instruct", "abc123")
    files = {}
    for split, part in (("train", records[:60]), ("validation", records[60:]), ("test", [])):
        files[split] = (storage.join(uri, f"{split}.jsonl"), storage.jsonl_bytes(part))
        storage.write_bytes(files[split][0], files[split][1], options)
    return dataset_manifest(files, name="python-docs-instruct", version="abc123")


def test_a_baseline_is_built_once_on_s3_and_read_back(aws):
    settings, options = aws
    built = monitoring.ensure_baseline(settings, manifest(settings, options), options, embed=embed)
    assert built["created"] and built["uri"].startswith(f"s3://{BUCKET}/llmops/baselines/python-docs-instruct/abc123/")
    assert built["summary"]["records"] == 60 and built["summary"]["embedded_prompts"] == 40

    def no_embed(texts):
        raise AssertionError("an existing baseline is not rebuilt")

    again = monitoring.ensure_baseline(settings, manifest(settings, options), options, embed=no_embed)
    assert again == {**built, "created": False}
    profile = monitoring.load_baseline(built["uri"], options)
    assert profile.embeddings.shape == (40, 32) and profile.records == 60


def test_sagemaker_capture_on_s3_is_analysed_and_the_report_lands_there(aws):
    settings, options = aws
    baseline = monitoring.ensure_baseline(settings, manifest(settings, options), options, embed=embed)
    champion = {"model_name": "m", "version": "3", "dataset_version": "abc123", "baseline_uri": baseline["uri"]}
    # SageMaker's own layout and format: <prefix>/<endpoint>/<variant>/yyyy/mm/dd/hh/<file>.jsonl,
    # a Hugging Face container's list answer, no gateway extras in eventMetadata.
    lines = []
    for i in range(60):
        request = {"inputs": f"What is the best recipe for pancakes number {i}?"}
        lines.append(
            {
                "captureData": {
                    "endpointInput": {
                        "observedContentType": "application/json",
                        "mode": "INPUT",
                        "data": json.dumps(request),
                        "encoding": "JSON",
                    },
                    "endpointOutput": {
                        "observedContentType": "application/json",
                        "mode": "OUTPUT",
                        "data": json.dumps([{"generated_text": "Mix flour and eggs."}]),
                        "encoding": "JSON",
                    },
                },
                "eventMetadata": {"eventId": f"e-{i}", "inferenceTime": f"2026-11-22T10:{i:02d}:00Z"},
                "eventVersion": "0",
            }
        )
    key = "llmops/capture/python-docs-assistant/AllTraffic/2026/11/22/10/00-00-000-x.jsonl"
    options["client"].put_object(Bucket=BUCKET, Key=key, Body="".join(json.dumps(x) + "\n" for x in lines).encode())
    window = monitoring.resolve_window(
        "python-docs-assistant", "2026-11-22T10:00:00Z", "2026-11-22T11:00:00Z", None, None, None
    )

    analysis = monitoring.analyze_window(
        settings, window, champion, settings.monitoring.drift_policy(), options, embed=embed, log=lambda _: None
    )

    assert analysis["records"] == 60 and analysis["verdict"] == "drift"
    assert analysis["folder"].startswith(f"s3://{BUCKET}/llmops/drift/python-docs-assistant/")
    report = storage.read_json(storage.join(analysis["folder"], "report.json"), options)
    assert report["sha256"] == analysis["sha256"]
    assert report["capture"]["variants"] == ["AllTraffic"]
    assert storage.exists(storage.join(analysis["folder"], "report.html"), options)
