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
