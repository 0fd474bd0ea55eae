"""Small, realistic raw datasets for tests, built in code so each test states its defect."""

from __future__ import annotations

import json
from pathlib import Path


def good_records(n: int = 40) -> list[dict]:
    """Distinct, realistic-looking instruction records (no PII, short)."""
    topics = [
        "lists",
        "dictionaries",
        "generators",
        "decorators",
        "context managers",
        "f-strings",
        "sets",
        "tuples",
        "classes",
        "exceptions",
    ]
    records = []
    for i in range(n):
        topic = topics[i % len(topics)]
        records.append(
            {
                "id": f"rec-{i:03d}",
                "instruction": f"Explain {topic} in Python, case {i}.",
                "context": "" if i % 3 else f"Assume Python 3.{10 + i % 3}.",
                "response": f"In Python, {topic} are a core feature. Example number {i} shows how they behave "
                f"when used in a small program with {i + 2} steps.",
                "source": "tests/fixtures",
            }
        )
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def dataset_manifest(
    files: dict[str, tuple[str, bytes]], name: str = "python-docs-instruct", version: str = "0" * 64
) -> dict:
    """A manifest of the shape ``llmops.data.stages.publish`` writes, as ``select_dataset`` returns
    it (read back with its sorted keys, then ``uri`` and ``manifest_uri``), for split files a test
    wrote itself: ``files`` maps each split to (URI, the file's bytes)."""
    import hashlib

    folder = files["train"][0].rsplit("/", 1)[0]
    counts = {split: payload.count(b"\n") for split, (_, payload) in files.items()}
    stored = {
        "source_uris": ["tests/fixtures"],
        "validation": {
            "success": True,
            "suite": "curated_dataset",
            "evaluated_expectations": 12,
            "failed_expectations": 0,
            "result_uri": f"{folder}/validation/result.json",
            "data_docs_uri": f"{folder}/validation/data_docs/index.html",
        },
        "stages": {"format": {"template": "instruction@1"}},
        "config": {"dataset_name": name},
        "lineage": {"git_sha": "test", "run_uri": f"{folder}/run"},
        "records": {"read": sum(counts.values()), "published": sum(counts.values()), "dropped": 0},
        "dropped": {"by_reason": {}, "records": []},
        "name": name,
        "version": version,
        "content_sha256": version,
        "created_at": "2026-01-01T00:00:00.000000+00:00",
        "counts": counts,
        "files": {
            split: {"uri": uri, "sha256": hashlib.sha256(payload).hexdigest()}
            for split, (uri, payload) in files.items()
        },
    }
    return {**json.loads(json.dumps(stored, sort_keys=True)), "uri": folder, "manifest_uri": f"{folder}/manifest.json"}
