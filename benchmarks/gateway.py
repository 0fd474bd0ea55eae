"""Gateway overhead: the latency a call through the endpoint gateway adds to the same call made
straight to the variant's server (a stand-in that answers at once, so only the gateway's work
shows), at concurrency 1 and 16, and what a shadow variant adds to the caller. Calls are
interleaved (direct, gateway, shadowed gateway), so a busy moment hits every side alike."""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import Figure, percentile

CALLS = {1: 2000, 16: 4000}
TARGET_P99_MS = 2.0
TARGET_SHADOW_P99_MS = 0.5
BODY = json.dumps({"inputs": "What does zip do?", "parameters": {"max_new_tokens": 8}}).encode()


def _deploy(control, endpoint: str, production: str, shadow: str | None) -> None:
    from tests.gateways import wait_in_service

    config = {
        "EndpointConfigName": f"{endpoint}-config",
        "ProductionVariants": [{"VariantName": "main", "ModelName": production, "InitialVariantWeight": 1.0}],
    }
    if shadow:
        config["ShadowProductionVariants"] = [
            {"VariantName": "shadow", "ModelName": shadow, "InitialVariantWeight": 1.0}
        ]
    for path, body in (
        ("/control/endpoint-configs", config),
        ("/control/endpoints", {"EndpointName": endpoint, "EndpointConfigName": f"{endpoint}-config"}),
    ):
        response = control.post(path, json=body)
        response.raise_for_status()
    described = wait_in_service(control, endpoint, timeout=60)
    if described["EndpointStatus"] != "InService":
        raise RuntimeError(f"{endpoint}: {described}")


def _timed(client, url: str) -> float:
    started = time.perf_counter()
    response = client.post(url, content=BODY, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
    return elapsed * 1000


def _measure(urls: dict[str, str], concurrency: int, calls: int) -> dict[str, list[float]]:
    import httpx

    latencies: dict[str, list[float]] = {name: [] for name in urls}
    limits = httpx.Limits(max_connections=concurrency * len(urls), max_keepalive_connections=concurrency * len(urls))
    with httpx.Client(timeout=30, limits=limits) as client:
        for url in urls.values():  # warm-up: connections open, code paths hot
            for _ in range(50):
                _timed(client, url)

        def one(index: int) -> tuple[str, float]:
            name = list(urls)[index % len(urls)]
            return name, _timed(client, urls[name])

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for name, ms in pool.map(one, range(calls * len(urls))):
                latencies[name].append(ms)
    return latencies


def run() -> list[Figure]:
    import httpx

    from tests.gateways import running_fake, running_gateway

    figures = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        with (
            running_fake("echo", root / "logs", name="main") as main_url,
            running_fake("echo", root / "logs", name="shadow") as shadow_url,
            running_gateway(root / "gateway") as (url, _),
            httpx.Client(base_url=url, timeout=30) as control,
        ):
            for name, container in (("main", main_url), ("shadow", shadow_url)):
                control.post(
                    "/control/models", json={"ModelName": name, "PrimaryContainer": {"ContainerUrl": container}}
                ).raise_for_status()
            _deploy(control, "plain", "main", None)
            _deploy(control, "shadowed", "main", "shadow")
            urls = {
                "direct": f"{main_url}/invocations",
                "gateway": f"{url}/endpoints/plain/invocations",
                "shadowed": f"{url}/endpoints/shadowed/invocations",
            }
            for concurrency, calls in CALLS.items():
                lat = _measure(urls, concurrency, calls)
                p = {name: (percentile(v, 50), percentile(v, 99)) for name, v in lat.items()}
                added50, added99 = p["gateway"][0] - p["direct"][0], p["gateway"][1] - p["direct"][1]
                shadow99 = p["shadowed"][1] - p["gateway"][1]
                detail = (
                    f"{calls} calls per side; direct p50/p99 {p['direct'][0]:.2f}/{p['direct'][1]:.2f} ms, "
                    f"gateway {p['gateway'][0]:.2f}/{p['gateway'][1]:.2f} ms, "
                    f"with shadow {p['shadowed'][0]:.2f}/{p['shadowed'][1]:.2f} ms"
                )
                figures += [
                    Figure("gateway", f"added p50, concurrency {concurrency}", added50, "ms", detail=detail),
                    Figure(
                        "gateway",
                        f"added p99, concurrency {concurrency}",
                        added99,
                        "ms",
                        f"<= {TARGET_P99_MS:g} ms",
                        added99 <= TARGET_P99_MS,
                    ),
                    Figure(
                        "gateway",
                        f"shadow's added p99, concurrency {concurrency}",
                        shadow99,
                        "ms",
                        f"<= {TARGET_SHADOW_P99_MS:g} ms",
                        shadow99 <= TARGET_SHADOW_P99_MS,
                    ),
                ]
    return figures
