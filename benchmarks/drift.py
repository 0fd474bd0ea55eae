"""Drift analysis of a window of 100,000 captured calls: reading the capture files (the
gateway's layout and format), turning them into traffic records, and every check against a
baseline of the bundled corpus with the real sentence encoder. The baseline is built first and
not counted: it is built once per model version, at registration."""

from __future__ import annotations

import json
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.common import Figure

RECORDS = 100_000
TARGET_S = 60.0


def _capture(folder: Path, prompts: list[str], start: datetime) -> None:
    """``RECORDS`` calls in the gateway's capture layout, spread over one hour."""
    from serving.capture import capture_record

    rng = random.Random(0)
    files: dict[Path, list[str]] = {}
    for index in range(RECORDS):
        moment = start + timedelta(seconds=index * 3600 / RECORDS)
        prompt = rng.choice(prompts)
        body = {"inputs": [{"role": "user", "content": prompt}], "parameters": {"max_new_tokens": 48}}
        answer = {"generated_text": "You can use the built-in function for that.", "finish_reason": "stop"}
        record = capture_record(
            endpoint="bench",
            variant="v1",
            request=json.dumps(body).encode(),
            request_type="application/json",
            response=json.dumps(answer).encode(),
            response_type="application/json",
            status_code=200,
            latency_ms=rng.uniform(200, 900),
            inference_time=moment,
        )
        path = folder / "bench" / "v1" / moment.strftime("%Y/%m/%d/%H") / f"{index // 20_000:03d}.jsonl"
        files.setdefault(path, []).append(json.dumps(record))
    for path, lines in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def run() -> list[Figure]:
    from devtools.traffic import bundled_records
    from llmops.config import load_settings
    from llmops.drift import monitor as monitoring
    from llmops.drift import statistics as drift
    from serving.capture import read_capture

    settings = load_settings("local")
    records = bundled_records(settings.data.template)
    embed = monitoring.make_embedder(settings)
    policy = settings.monitoring.drift_policy()
    started = time.perf_counter()
    profile = drift.build_profile(
        records[:1800], records[1800:], embed, dataset="bench", dataset_version="bench", encoder="minilm"
    )
    baseline_s = time.perf_counter() - started
    embed(["warm the encoder up"])
    start = datetime(2026, 1, 1, 10, tzinfo=UTC)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as folder:
        _capture(Path(folder), [r["prompt"] for r in records[1800:]], start)
        t0 = time.perf_counter()
        scan = read_capture(folder, "bench", start=start, end=start + timedelta(hours=1))
        calls = [monitoring.traffic_record(r) for r in scan.records if not r.shadow]
        t1 = time.perf_counter()
        report = drift.analyze(profile, calls, policy, embed, seed=1)
        t2 = time.perf_counter()
    if len(calls) != RECORDS:
        raise RuntimeError(f"read {len(calls)} calls, wrote {RECORDS}")
    total = t2 - t0
    return [
        Figure("drift", "read capture (100k calls)", t1 - t0, "s"),
        Figure(
            "drift",
            "analyze (every check)",
            t2 - t1,
            "s",
            detail=f"verdict {report.verdict}; "
            f"{policy.max_embedded} window prompts embedded, {policy.permutations} permutations",
        ),
        Figure("drift", "window of 100k calls, total", total, "s", f"<= {TARGET_S:g} s", total <= TARGET_S),
        Figure("drift", "baseline profile (once per version)", baseline_s, "s", detail="512 prompts embedded"),
    ]
