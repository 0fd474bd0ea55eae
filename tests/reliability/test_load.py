"""Load on the endpoint gateway: 10,000 requests at concurrency 32 through a real gateway process
on loopback, to an endpoint with a champion and a challenger production variant and a shadow that
answers every mirrored copy with an error. Nothing may fail on the production path, and after a
graceful stop the capture files (read with ``serving.capture.read_capture``, the reader drift
monitoring uses) must hold every request exactly once, as its caller saw it: each client inference
id once, unique event ids, every shadow record tied to a production record of its own. A second
case changes the weights three times while the load runs.

The variants are stand-in model servers (``tests.fakecontainer``) that answer in microseconds and
name themselves, so the gateway is what is loaded and the answer proves which server served it.
(The project's model server on the tiny model answers 20 to 140 requests a second on a shared
2-core machine, 29 a second through the gateway: 10,000 took over 6 minutes and measured the model.)

    .venv/bin/python -m pytest tests/reliability/test_load.py -q -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.common import percentile
from serving.capture import CaptureScan, read_capture
from tests.gateways import running_fake, running_gateway, wait_in_service

pytestmark = [pytest.mark.integration]

CONCURRENCY = 32
WEIGHTS = {"champion": 0.9, "challenger": 0.1}
SHADOW_WEIGHT = 0.25  # a quarter of the requests is mirrored while production weights sum to 1
SIGMAS = 4.5  # a binomial count this far from its mean fails a correct gateway about once in 150,000 runs
REQUEST_TIMEOUT = 60
LOAD_DEADLINE = 240  # seconds for all of a case's requests: a stalled gateway fails here, not at pytest's timeout
# The weight updates of the second case, each once a quarter of its requests is answered.
UPDATES = (
    {"champion": 0.0, "challenger": 1.0},
    {"champion": 1.0, "challenger": 0.0},
    {"champion": 0.5, "challenger": 0.5},
)


@dataclass(frozen=True)
class Outcome:
    """One request as its caller saw it; ``status`` 0: no HTTP answer (``error`` says why)."""

    inference_id: str
    text: str
    status: int
    variant: str | None
    body: bytes
    started: float
    ended: float
    error: str | None = None
    event_id: str | None = None  # the gateway's x-llmops-event-id header

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000


@dataclass(frozen=True)
class Run:
    outcomes: list[Outcome]
    seconds: float
    metrics: dict  # the gateway's, once the shadow had caught up
    destination: Path  # the capture files, complete: the gateway has stopped


# -- fixtures and the gateway ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict[str, str]:
    """Shared by the cases: echo servers for the production variants, and a shadow that answers
    every copy with a 500."""
    logs = tmp_path_factory.mktemp("load-servers")
    with ExitStack() as stack:
        urls = {name: stack.enter_context(running_fake("echo", logs, name=name)) for name in WEIGHTS}
        urls["shadow"] = stack.enter_context(running_fake("error", logs, name="shadow"))
        yield urls


def deploy(control: httpx.Client, servers: dict[str, str], endpoint: str, destination: Path) -> None:
    config = {
        "EndpointConfigName": f"{endpoint}-config",
        "ProductionVariants": [
            {"VariantName": name, "ModelName": name, "InitialVariantWeight": weight} for name, weight in WEIGHTS.items()
        ],
        "ShadowProductionVariants": [
            {"VariantName": "shadow", "ModelName": "shadow", "InitialVariantWeight": SHADOW_WEIGHT}
        ],
        "DataCaptureConfig": {
            "EnableCapture": True,
            "InitialSamplingPercentage": 100,
            "DestinationS3Uri": f"file://{destination}",
            "CaptureOptions": [{"CaptureMode": "InputAndOutput"}],
        },
    }
    calls = [("/control/models", {"ModelName": n, "PrimaryContainer": {"ContainerUrl": u}}) for n, u in servers.items()]
    calls += [
        ("/control/endpoint-configs", config),
        ("/control/endpoints", {"EndpointName": endpoint, "EndpointConfigName": f"{endpoint}-config"}),
    ]
    for path, body in calls:
        answer = control.post(path, json=body)
        assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text}"
    described = wait_in_service(control, endpoint, timeout=60)
    assert described["EndpointStatus"] == "InService", described


def settled_metrics(control: httpx.Client, endpoint: str, timeout: float = 60) -> dict:
    """The endpoint's metrics once the shadow queue is empty and the counts have not moved for a
    second (a copy taken off the queue is counted only when its answer arrives)."""
    deadline = time.monotonic() + timeout
    readings: list[tuple] = []
    while True:
        metrics = control.get(f"/control/endpoints/{endpoint}/metrics").json()
        shadow = metrics["ShadowVariants"].get("shadow", {})
        readings.append((metrics["ShadowPending"], shadow.get("Invocations", 0), shadow.get("ShadowDropped", 0)))
        if len(readings) >= 3 and readings[-1][0] == 0 and len(set(readings[-3:])) == 1:
            return metrics
        if time.monotonic() > deadline:
            raise TimeoutError(f"the shadow of {endpoint} was still busy after {timeout}s: {metrics}")
        time.sleep(0.5)


def load_through_gateway(
    tmp_path: Path,
    servers: dict[str, str],
    requests: int,
    meanwhile: Callable[[str, list[Outcome]], Awaitable[None]] | None = None,
) -> Run:
    """A fresh gateway, the endpoint ``loaded``, the load (and ``meanwhile(gateway URL, outcomes so
    far)`` alongside it); then the gateway is stopped as a service manager would (SIGTERM), and has
    to exit by itself, its captures flushed, rather than be killed when the wait runs out."""
    destination = tmp_path / "capture"
    with ExitStack() as stack:
        url, process = stack.enter_context(running_gateway(tmp_path / "gateway"))
        control = stack.enter_context(httpx.Client(base_url=url, timeout=30))
        deploy(control, servers, "loaded", destination)
        outcomes, seconds = asyncio.run(_load(url, "loaded", requests, meanwhile))
        metrics = settled_metrics(control, "loaded")
    assert process.returncode in (0, -signal.SIGTERM), f"the gateway ended with {process.returncode}, not by itself"
    return Run(outcomes, seconds, metrics, destination)


# -- the load -------------------------------------------------------------------------------------


async def _send(session, url: str, run: str, number: int) -> Outcome:
    import aiohttp

    inference_id = f"{run}-{number:05d}"
    text = f"Request {number}: how do I reverse a list in Python?"
    body = json.dumps({"inputs": text, "parameters": {"max_new_tokens": 8}})
    headers = {"Content-Type": "application/json", "X-Amzn-SageMaker-Inference-Id": inference_id}
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            content = await response.read()
            variant = response.headers.get("x-amzn-invoked-production-variant")
            event_id = response.headers.get("x-llmops-event-id")
            return Outcome(
                inference_id, text, response.status, variant, content, started, time.perf_counter(), None, event_id
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(inference_id, text, 0, None, b"", started, time.perf_counter(), f"{type(exc).__name__}: {exc}")


async def _load(url: str, endpoint: str, requests: int, meanwhile=None) -> tuple[list[Outcome], float]:
    """``requests`` invocations, CONCURRENCY at a time, each with its own inference id."""
    import aiohttp

    run = uuid.uuid4().hex[:8]
    # Idle connections close before the gateway's do (uvicorn: 5 s): a POST is never retried.
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, keepalive_timeout=4)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    outcomes: list[Outcome] = []
    numbers = iter(range(requests))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def sender() -> None:
            for number in numbers:
                outcomes.append(await _send(session, f"{url}/endpoints/{endpoint}/invocations", run, number))

        started = time.perf_counter()
        tasks = [sender() for _ in range(CONCURRENCY)] + ([meanwhile(url, outcomes)] if meanwhile else [])
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), LOAD_DEADLINE)
        except TimeoutError:
            raise AssertionError(f"{len(outcomes)} of {requests} requests answered after {LOAD_DEADLINE}s") from None
        seconds = time.perf_counter() - started
    return outcomes, seconds


# -- checks ---------------------------------------------------------------------------------------


def binomial_bound(n: int, p: float) -> float:
    return SIGMAS * math.sqrt(n * p * (1 - p))


def failures(outcomes: list[Outcome]) -> list[str]:
    """Requests that did not come back as a 200 from the variant the gateway named."""
    failed = []
    for o in outcomes:
        if o.status != 200 or o.variant not in WEIGHTS:
            failed.append(f"{o.inference_id}: {o.status} {o.error or o.body[:300].decode(errors='replace')}")
        elif json.loads(o.body)["generated_text"] != f"{o.variant} says: {o.text}":
            failed.append(f"{o.inference_id}: named {o.variant}, answered {o.body[:300].decode(errors='replace')}")
    return failed


def check_answers_and_metrics(run: Run, requests: int) -> Counter:
    """Every request answered by the variant the gateway named, and the gateway's metrics agree with
    what its callers saw. Returns the requests each variant served."""
    assert len(run.outcomes) == requests
    failed = failures(run.outcomes)
    assert failed == [], f"{len(failed)} of {requests} requests failed, e.g. {failed[:5]}"
    served = Counter(o.variant for o in run.outcomes)
    variants = run.metrics["Variants"]
    assert {v: variants.get(v, {}).get("Invocations", 0) for v in WEIGHTS} == {v: served[v] for v in WEIGHTS}
    assert all(variants[v]["Invocation4XXErrors"] + variants[v]["Invocation5XXErrors"] == 0 for v in served), variants
    assert run.metrics["Capture"]["Failed"] == 0, run.metrics["Capture"]
    return served


def scan_capture(run: Run, ledger) -> CaptureScan:
    """The run's capture files, read as drift monitoring reads them; the ledger counts the requests
    whose inference id is among the production records."""
    scan = read_capture(str(run.destination), endpoint="loaded")
    captured = {r.inference_id for r in scan.records if not r.shadow}
    ledger.account(expected=len(run.outcomes), delivered=len(captured & {o.inference_id for o in run.outcomes}))
    return scan


def check_capture(run: Run, scan: CaptureScan) -> None:
    """Every request captured once, as its caller saw it; every shadow record tied to a production
    record of its own; every copy the shadow was sent captured."""
    assert scan.skipped == [], scan.skipped[:5]
    production = [r for r in scan.records if not r.shadow]
    shadow = [r for r in scan.records if r.shadow]
    sent = {o.inference_id: o for o in run.outcomes}
    captured = Counter(r.inference_id for r in production)
    twice = sorted(i for i, n in captured.items() if n > 1)
    assert twice == [], f"{len(twice)} inference ids captured more than once, e.g. {twice[:5]}"
    missing = sorted(set(sent) - set(captured))
    assert missing == [], f"{len(missing)} of {len(sent)} requests never captured, e.g. {missing[:5]}"
    assert len(production) == len(sent), f"{len(production)} production records for {len(sent)} requests"
    events = Counter(r.event_id for r in scan.records)
    repeated = [e for e, n in events.items() if n > 1]
    assert repeated == [], f"{len(repeated)} event ids on more than one record, e.g. {repeated[:5]}"
    for record in production:
        outcome, where = sent[record.inference_id], f"{record.inference_id} ({record.path})"
        assert (record.variant, record.status_code) == (outcome.variant, 200), f"{where}: {record} for {outcome}"
        assert record.event_id == outcome.event_id, (
            f"{where}: event {record.event_id}, caller was told {outcome.event_id}"
        )
        assert record.request_json()["inputs"] == outcome.text, f"{where}: another request captured: {record.request}"
        assert record.response == outcome.body.decode(), (
            f"{where}: captured {record.response!r}, caller got {outcome.body!r}"
        )

    by_event = {r.event_id: r for r in production}
    orphans = [r.event_id for r in shadow if r.source_event_id not in by_event]
    assert orphans == [], f"{len(orphans)} shadow records point at no production record, e.g. {orphans[:5]}"
    copies = Counter(r.source_event_id for r in shadow)
    doubled = [e for e, n in copies.items() if n > 1]
    assert doubled == [], f"{len(doubled)} production records have more than one shadow record, e.g. {doubled[:5]}"
    for record in shadow:
        source = by_event[record.source_event_id]
        assert (record.variant, record.status_code) == ("shadow", 500), f"{record.path}: {record}"
        assert (record.inference_id, record.request) == (source.inference_id, source.request), (
            f"{record.path}: the shadow's copy of {source.inference_id} carries {record.inference_id}: {record.request}"
        )

    stats = run.metrics["ShadowVariants"].get("shadow", {})
    sent_copies, dropped = stats.get("Invocations", 0), stats.get("ShadowDropped", 0)
    # Every copy was sent (and then captured) or dropped on a full queue (and counted): none vanished.
    assert len(shadow) == sent_copies, f"{len(shadow)} shadow records for {sent_copies} copies sent"
    assert stats.get("Invocation5XXErrors", 0) == sent_copies  # the shadow did fail, every copy
    mirrored = sent_copies + dropped
    assert abs(mirrored - len(sent) * SHADOW_WEIGHT) <= binomial_bound(len(sent), SHADOW_WEIGHT), mirrored


def report(ledger, run: Run) -> None:
    latencies = [o.latency_ms for o in run.outcomes]
    stats = run.metrics["ShadowVariants"].get("shadow", {})
    for name, value in (
        ("p50_ms", percentile(latencies, 50)),
        ("p95_ms", percentile(latencies, 95)),
        ("p99_ms", percentile(latencies, 99)),
        ("max_ms", max(latencies)),
        ("req_per_s", len(run.outcomes) / run.seconds),
        ("errors", len(failures(run.outcomes))),
        ("shadow_sent", stats.get("Invocations", 0)),
        ("shadow_dropped", stats.get("ShadowDropped", 0)),
    ):
        ledger.figure(name, value)


# -- cases ----------------------------------------------------------------------------------------


@pytest.mark.reliability("load")
def test_10000_requests_at_concurrency_32_no_error_each_captured_once(tmp_path, servers, ledger):
    requests = 10_000
    run = load_through_gateway(tmp_path, servers, requests)
    report(ledger, run)
    scan = scan_capture(run, ledger)

    served = check_answers_and_metrics(run, requests)
    check_capture(run, scan)
    p = WEIGHTS["challenger"]
    assert abs(served["challenger"] - requests * p) <= binomial_bound(requests, p), served


@pytest.mark.reliability("load")
def test_weights_changed_three_times_under_load_no_error_each_captured_once(tmp_path, servers, ledger):
    requests = 3_000
    updates: list[tuple[float, float, dict[str, float]]] = []  # (sent, answered, weights)

    async def change_weights(url: str, outcomes: list[Outcome]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as control:
            for number, weights in enumerate(UPDATES, start=1):
                while len(outcomes) < requests * number // (len(UPDATES) + 1):
                    await asyncio.sleep(0.01)
                body = {
                    "DesiredWeightsAndCapacities": [{"VariantName": v, "DesiredWeight": w} for v, w in weights.items()]
                }
                sent = time.perf_counter()
                answer = await control.post("/control/endpoints/loaded/weights", json=body)
                assert answer.status_code == 200, answer.text
                updates.append((sent, time.perf_counter(), weights))

    run = load_through_gateway(tmp_path, servers, requests, change_weights)
    report(ledger, run)
    scan = scan_capture(run, ledger)

    check_answers_and_metrics(run, requests)
    check_capture(run, scan)
    assert len(updates) == len(UPDATES)
    # A request that began after an update was answered and ended before the next was sent was
    # routed by that update's weights alone.
    for (_, answered, weights), following in zip(updates, [*[u[0] for u in updates[1:]], math.inf], strict=True):
        within = Counter(o.variant for o in run.outcomes if o.started > answered and o.ended < following)
        assert sum(within.values()) >= 100, f"too few requests between updates to judge {weights}: {within}"
        for variant, weight in weights.items():
            if weight == 0:
                assert within[variant] == 0, f"{variant} served {within[variant]} requests at weight 0: {within}"
            else:
                n, share = sum(within.values()), weight / sum(weights.values())
                assert abs(within[variant] - n * share) <= binomial_bound(n, share), (weights, within)
