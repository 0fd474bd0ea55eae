"""Serving throughput: generated tokens per second of one model server (``serving.app``) with
request batching against the same server answering one request at a time, on the base model, with
8 clients each sending its next request as soon as the last is answered. The sides run one after
the other, each in its own server process, on the same prompts (in-domain questions of the bundled
corpus, greedy, up to 32 new tokens each)."""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import Figure, percentile

CONCURRENCY = 8
REQUESTS = 32  # per side
MAX_NEW_TOKENS = 32
TARGET_SPEEDUP = 3.0


def _drive(url: str, prompts: list[str]) -> dict:
    import httpx

    def call(client: httpx.Client, prompt: str) -> dict:
        started = time.perf_counter()
        response = client.post(
            f"{url}/invocations",
            json={"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS}},
            timeout=600,
        )
        response.raise_for_status()
        return {**response.json(), "seconds": time.perf_counter() - started}

    with httpx.Client() as client:
        call(client, prompts[0])  # warm-up: the first generation pays for lazy initialisation
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            answers = list(pool.map(lambda p: call(client, p), prompts))
        seconds = time.perf_counter() - started
    tokens = sum(a["completion_tokens"] for a in answers)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "rate": tokens / seconds,
        "p50": percentile([a["seconds"] for a in answers], 50),
        "mean_batch": sum(a["batch_size"] for a in answers) / len(answers),
    }


def run() -> list[Figure]:
    from devtools.traffic import bundled_records
    from llmops.config import load_settings
    from llmops.models import resolve_model
    from tests.gateways import running_model_server

    settings = load_settings("local")
    base = resolve_model(settings.models.base, settings.models.cache_dir)
    records = bundled_records(settings.data.template)
    prompts = [records[i * len(records) // REQUESTS]["prompt"] for i in range(REQUESTS)]
    sides = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        for name, size in (("one at a time", 1), ("batched", CONCURRENCY)):
            log = Path(tmp) / f"server-{size}.log"
            with running_model_server(base, log, LLMOPS_MAX_BATCH_SIZE=str(size)) as url:
                sides[name] = _drive(url, prompts)
    single, batched = sides["one at a time"], sides["batched"]
    speedup = batched["rate"] / single["rate"]

    def detail(side: dict) -> str:
        return (
            f"{side['tokens']} tokens in {side['seconds']:.1f} s; p50 latency {side['p50']:.2f} s;"
            f" mean batch {side['mean_batch']:.1f}"
        )

    return [
        Figure("serving", "one request at a time: tokens/s", single["rate"], "tok/s", detail=detail(single)),
        Figure("serving", f"batched (up to {CONCURRENCY}): tokens/s", batched["rate"], "tok/s", detail=detail(batched)),
        Figure(
            "serving",
            f"batching speedup, concurrency {CONCURRENCY}",
            speedup,
            "x",
            f">= {TARGET_SPEEDUP:g}x",
            speedup >= TARGET_SPEEDUP,
        ),
    ]
