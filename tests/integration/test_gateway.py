"""The endpoint gateway as real processes on loopback: the SageMaker runtime wire protocol through
the unmodified boto3 client, weighted routing, shadow mirroring, data capture and the control
plane, with stand-in model servers (``tests.fakecontainer``) in place of models."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from botocore.exceptions import ClientError

from serving.capture import read_capture
from tests.gateways import free_port, running_fake, running_gateway, runtime, wait_in_service

pytestmark = [pytest.mark.integration]

SIGMAS = 4.5  # a binomial count this far from its mean fails a correct gateway about once in 150,000 runs
SLOW_SHADOW_DELAY = 2.0
STARTUP_TIMEOUT = 5
ECHOES = ("alpha", "beta", "gamma")


# -- helpers ------------------------------------------------------------------------------------


def payload(text: str = "hello") -> bytes:
    return json.dumps({"inputs": text}).encode()


def speaker(answer: dict) -> str:
    """The fake that wrote an answer (its ``FAKE_NAME``)."""
    return answer["generated_text"].split(" says: ")[0]


def invoke(client: httpx.Client, endpoint: str, text: str = "hello", **headers) -> httpx.Response:
    return client.post(
        f"/endpoints/{endpoint}/invocations",
        content=payload(text),
        headers={"content-type": "application/json", **headers},
    )


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def create_model(control: httpx.Client, name: str, container_url: str) -> None:
    ok(control.post("/control/models", json={"ModelName": name, "PrimaryContainer": {"ContainerUrl": container_url}}))


def config_body(name: str, production, shadow=None, capture: dict | None = None) -> dict:
    """``production``: (variant, model, weight) triples; ``shadow``: one (variant, model, weight)."""
    body = {
        "EndpointConfigName": name,
        "ProductionVariants": [
            {"VariantName": v, "ModelName": m, "InitialVariantWeight": w, "InstanceType": "ml.g5.xlarge"}
            for v, m, w in production
        ],
    }
    if shadow:
        v, m, w = shadow
        body["ShadowProductionVariants"] = [{"VariantName": v, "ModelName": m, "InitialVariantWeight": w}]
    if capture:
        body["DataCaptureConfig"] = capture
    return body


def deploy(control: httpx.Client, endpoint: str, production, shadow=None, capture=None, config: str | None = None):
    config = config or f"{endpoint}-config"
    ok(control.post("/control/endpoint-configs", json=config_body(config, production, shadow, capture)))
    ok(control.post("/control/endpoints", json={"EndpointName": endpoint, "EndpointConfigName": config}))
    described = wait_in_service(control, endpoint, timeout=30)
    assert described["EndpointStatus"] == "InService", described
    return described


def capture_config(destination, percentage: int) -> dict:
    return {
        "EnableCapture": True,
        "InitialSamplingPercentage": percentage,
        "DestinationS3Uri": str(destination),
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
    }


def metrics(control: httpx.Client, endpoint: str) -> dict:
    return ok(control.get(f"/control/endpoints/{endpoint}/metrics"))


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s")
        time.sleep(0.2)


def wait_settled(control: httpx.Client, endpoint: str, timeout: float = 30) -> dict:
    """The description once an update has finished (well or not)."""
    return wait_for(
        lambda: (d := ok(control.get(f"/control/endpoints/{endpoint}")))["EndpointStatus"] != "Updating" and d,
        timeout,
        f"endpoint {endpoint} still Updating",
    )


def binomial_bound(n: int, p: float) -> float:
    return SIGMAS * math.sqrt(n * p * (1 - p))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """Stand-in model servers shared by the module: echoes named after themselves, one that always
    fails, one that answers after SLOW_SHADOW_DELAY seconds."""
    logs = tmp_path_factory.mktemp("fakes")
    with ExitStack() as stack:
        urls = {name: stack.enter_context(running_fake("echo", logs, name=name)) for name in ECHOES}
        urls["failing"] = stack.enter_context(running_fake("error", logs))
        urls["slow"] = stack.enter_context(running_fake("slow", logs, delay=SLOW_SHADOW_DELAY))
        yield urls


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, fakes):
    """One gateway for the module, with a model per fake; yields (URL, a control client)."""
    state = tmp_path_factory.mktemp("shared") / "gateway"
    with (
        # Several shadow copies at once: the slow stand-in sleeps without holding a CPU.
        running_gateway(state, "--startup-timeout", str(STARTUP_TIMEOUT), "--shadow-workers", "8") as (url, _),
        httpx.Client(base_url=url, timeout=30) as control,
    ):
        for name, fake_url in fakes.items():
            create_model(control, name, fake_url)
        yield url, control


@pytest.fixture
def crashing_fake(tmp_path):
    """A fresh model server that dies (os._exit) on its first invocation."""
    with running_fake("crash", tmp_path) as url:
        yield url


# -- runtime: the SageMaker wire protocol through boto3 ------------------------------------------


def test_boto3_invoke_endpoint_names_and_pins_the_variant(gateway):
    url, control = gateway
    deploy(control, "runtime", [("alpha", "alpha", 1.0), ("beta", "beta", 1.0)])
    client = runtime(url)

    served = Counter()
    for number in range(20):
        response = client.invoke_endpoint(
            EndpointName="runtime", Body=payload(f"question {number}"), ContentType="application/json"
        )
        answer = json.loads(response["Body"].read())
        assert answer["generated_text"].endswith(f"says: question {number}")
        # The header names the variant whose server actually answered.
        assert speaker(answer) == response["InvokedProductionVariant"]
        assert response["ContentType"] == "application/json"
        served[response["InvokedProductionVariant"]] += 1
    assert set(served) <= {"alpha", "beta"} and sum(served.values()) == 20

    for _ in range(10):
        response = client.invoke_endpoint(
            EndpointName="runtime",
            Body=payload(),
            ContentType="application/json",
            Accept="application/json",
            TargetVariant="beta",
            CustomAttributes="trace-id=42,tenant=docs",
            InferenceId="inference-0001",
        )
        assert response["InvokedProductionVariant"] == "beta"
        assert speaker(json.loads(response["Body"].read())) == "beta"
        # Forwarded to the model server and back (the fake answers the attributes it was sent).
        assert response["CustomAttributes"] == "trace-id=42,tenant=docs"


def test_boto3_sees_validation_errors_for_unknown_endpoints_and_variants(gateway):
    url, control = gateway
    deploy(control, "validated", [("alpha", "alpha", 1.0)])
    client = runtime(url)

    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="no-such-endpoint", Body=payload(), ContentType="application/json")
    error = caught.value.response
    assert error["Error"]["Code"] == "ValidationError"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "no-such-endpoint" in error["Error"]["Message"] and "not found" in error["Error"]["Message"]

    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(
            EndpointName="validated", Body=payload(), ContentType="application/json", TargetVariant="omega"
        )
    error = caught.value.response
    assert error["Error"]["Code"] == "ValidationError"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "omega" in error["Error"]["Message"] and "alpha" in error["Error"]["Message"]  # says what exists


def test_model_errors_come_back_as_model_error_424_with_the_original_status(gateway):
    url, control = gateway
    deploy(control, "erroring", [("broken", "failing", 1.0)])
    deploy(control, "picky", [("alpha", "alpha", 1.0)])
    client = runtime(url)

    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="erroring", Body=payload(), ContentType="application/json")
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 500
    assert "the fake model failed" in error["OriginalMessage"]
    assert "broken" in error["Error"]["Message"]

    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="picky", Body=b"this is not JSON", ContentType="application/json")
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 400
    assert "not JSON" in error["OriginalMessage"]

    assert metrics(control, "erroring")["Variants"]["broken"]["Invocation5XXErrors"] == 1
    picky = metrics(control, "picky")["Variants"]["alpha"]
    assert picky["Invocation4XXErrors"] == 1 and picky["Invocation5XXErrors"] == 0


def test_a_payload_over_6_mb_is_refused(gateway):
    url, control = gateway
    deploy(control, "bounded", [("alpha", "alpha", 1.0)])
    limit = 6 * 1024 * 1024
    wrapper = len(json.dumps({"inputs": ""}))
    at_limit = json.dumps({"inputs": "x" * (limit - wrapper)}).encode()
    assert len(at_limit) == limit
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post(
            "/endpoints/bounded/invocations", content=at_limit + b" ", headers={"content-type": "application/json"}
        )
        assert response.status_code in (400, 413), response.text
        assert response.headers["x-amzn-errortype"].split(":")[0] == "ValidationError"
        assert str(limit) in response.json()["message"]
        # The limit itself is still accepted.
        response = client.post(
            "/endpoints/bounded/invocations", content=at_limit, headers={"content-type": "application/json"}
        )
        assert response.status_code == 200
    assert metrics(control, "bounded")["Variants"]["alpha"]["Invocations"] == 1  # the refused one never reached it

    with pytest.raises(ClientError) as caught:
        runtime(url).invoke_endpoint(EndpointName="bounded", Body=at_limit + b" ", ContentType="application/json")
    assert caught.value.response["Error"]["Code"] == "ValidationError"


# -- routing --------------------------------------------------------------------------------------


def test_traffic_splits_by_weight_and_follows_a_weight_update(gateway):
    url, control = gateway
    deploy(control, "split", [("alpha", "alpha", 3.0), ("beta", "beta", 1.0)])
    requests = 400

    def one(number: int) -> str:
        response = invoke(client, "split", f"q{number}")
        answer = ok(response)
        assert speaker(answer) == response.headers["x-amzn-invoked-production-variant"]
        return speaker(answer)

    with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        served = Counter(pool.map(one, range(requests)))
        assert set(served) == {"alpha", "beta"}
        expected = requests * 0.75
        assert abs(served["alpha"] - expected) <= binomial_bound(requests, 0.75), served

        updated_at = time.time()
        ok(
            control.post(
                "/control/endpoints/split/weights",
                json={
                    "DesiredWeightsAndCapacities": [
                        {"VariantName": "alpha", "DesiredWeight": 0},
                        {"VariantName": "beta", "DesiredWeight": 1},
                    ]
                },
            )
        )
        described = ok(control.get("/control/endpoints/split"))
        assert {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]} == {
            "alpha": 0.0,
            "beta": 1.0,
        }
        assert Counter(pool.map(one, range(100))) == {"beta": 100}
        # A pinned request still reaches a variant without traffic.
        assert speaker(ok(invoke(client, "split", **{"X-Amzn-SageMaker-Target-Variant": "alpha"}))) == "alpha"

    totals = metrics(control, "split")["Variants"]
    assert totals["alpha"]["Invocations"] == served["alpha"] + 1
    assert totals["beta"]["Invocations"] == served["beta"] + 100
    window = ok(control.get("/control/endpoints/split/metrics", params={"since": updated_at}))
    assert window["Since"] == updated_at
    assert window["Variants"]["alpha"]["Invocations"] == 1 and window["Variants"]["beta"]["Invocations"] == 100

    unknown = control.post(
        "/control/endpoints/split/weights",
        json={"DesiredWeightsAndCapacities": [{"VariantName": "omega", "DesiredWeight": 1}]},
    )
    assert unknown.status_code == 400 and "omega" in unknown.text
    no_traffic = control.post(
        "/control/endpoints/split/weights",
        json={"DesiredWeightsAndCapacities": [{"VariantName": "beta", "DesiredWeight": 0}]},
    )
    assert no_traffic.status_code == 400
    missing = control.post(
        "/control/endpoints/no-such-endpoint/weights",
        json={"DesiredWeightsAndCapacities": [{"VariantName": "beta", "DesiredWeight": 1}]},
    )
    assert missing.status_code == 404


# -- shadow ---------------------------------------------------------------------------------------


def test_a_slow_shadow_never_delays_the_caller(gateway):
    url, control = gateway
    deploy(control, "shadowed-slow", [("alpha", "alpha", 1.0)], shadow=("slow", "slow", 1.0))
    client = runtime(url)
    calls = 20
    latencies = []
    for number in range(calls):
        started = time.perf_counter()
        response = client.invoke_endpoint(
            EndpointName="shadowed-slow", Body=payload(f"q{number}"), ContentType="application/json"
        )
        answer = json.loads(response["Body"].read())
        latencies.append(time.perf_counter() - started)
        assert response["InvokedProductionVariant"] == "alpha" and speaker(answer) == "alpha"
    # Had a caller waited for the shadow, its call would have taken at least one shadow answer.
    # (No tighter bound: on a loaded machine one call may take a good part of a second.)
    assert max(latencies) < SLOW_SHADOW_DELAY, latencies

    # Every request was mirrored (the shadow's weight equals the production weight), and the
    # shadow's answers arrive in the background.
    shadow = wait_for(
        lambda: (
            (m := metrics(control, "shadowed-slow")["ShadowVariants"].get("slow", {})).get("Invocations") == calls and m
        ),
        timeout=calls * SLOW_SHADOW_DELAY / 4 + 20,
        what="the shadow did not see every mirrored request",
    )
    assert shadow["Invocation5XXErrors"] == 0 and shadow["Invocation4XXErrors"] == 0
    assert shadow["ModelLatency"]["p50"] >= SLOW_SHADOW_DELAY * 1000
    assert "ShadowDropped" not in shadow
    production = metrics(control, "shadowed-slow")["Variants"]["alpha"]
    assert production["Invocations"] == calls and production["ModelLatency"]["max"] < SLOW_SHADOW_DELAY * 1000


def test_a_crashing_shadow_never_reaches_the_caller(gateway, crashing_fake):
    url, control = gateway
    create_model(control, "crashing", crashing_fake)
    deploy(control, "crashing-champion", [("doomed", "crashing", 1.0)])
    deploy(control, "shadowed-crash", [("beta", "beta", 1.0)], shadow=("crashing", "crashing", 1.0))
    client = runtime(url)

    # A model server that dies while answering: the caller gets a ModelError, the gateway lives on.
    with pytest.raises(ClientError) as caught:
        client.invoke_endpoint(EndpointName="crashing-champion", Body=payload(), ContentType="application/json")
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError" and error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 502 and "doomed" in error["Error"]["Message"]
    assert error["ResponseMetadata"]["HTTPHeaders"]["x-amzn-invoked-production-variant"] == "doomed"
    calls = 50
    for number in range(calls):
        response = client.invoke_endpoint(
            EndpointName="shadowed-crash", Body=payload(f"q{number}"), ContentType="application/json"
        )
        assert response["InvokedProductionVariant"] == "beta"
        assert json.loads(response["Body"].read())["generated_text"] == f"beta says: q{number}"

    shadow = wait_for(
        lambda: (
            (m := metrics(control, "shadowed-crash")["ShadowVariants"].get("crashing", {})).get("Invocations") == calls
            and m
        ),
        timeout=30,
        what="the shadow did not see every mirrored request",
    )
    assert shadow["Invocation5XXErrors"] == calls
    with pytest.raises(httpx.HTTPError):  # it really died
        httpx.get(f"{crashing_fake}/ping", timeout=2)
    champion = metrics(control, "shadowed-crash")["Variants"]["beta"]
    assert champion["Invocations"] == calls
    assert champion["Invocation4XXErrors"] == 0 and champion["Invocation5XXErrors"] == 0


# -- data capture ---------------------------------------------------------------------------------


def test_capture_writes_every_sampled_request_and_its_shadow_by_shutdown(tmp_path, fakes):
    destination = tmp_path / "capture"
    requests = 300
    sampled_requests = 1000
    sent = {}
    with (
        running_gateway(tmp_path / "gateway") as (url, _),
        httpx.Client(base_url=url, timeout=30) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        create_model(client, "alpha", fakes["alpha"])
        create_model(client, "beta", fakes["beta"])
        deploy(
            client,
            "captured",
            [("alpha", "alpha", 1.0)],
            shadow=("beta", "beta", 1.0),
            capture=capture_config(destination, 100),
        )
        deploy(client, "sampled", [("alpha", "alpha", 1.0)], capture=capture_config(f"file://{destination}", 30))

        def send(number: int) -> None:
            inference_id = f"inference-{number:04d}"
            response = invoke(
                client, "captured", f"capture {number}", **{"X-Amzn-SageMaker-Inference-Id": inference_id}
            )
            assert speaker(ok(response)) == "alpha"
            sent[inference_id] = f"capture {number}"

        for number in range(100):  # one after another
            send(number)
        list(pool.map(send, range(100, requests)))  # and concurrently
        list(pool.map(lambda n: ok(invoke(client, "sampled", f"sampled {n}")), range(sampled_requests)))
    # The gateway is stopped (SIGTERM): everything it accepted must be on disk now.

    scan = read_capture(str(destination), endpoint="captured")
    assert scan.skipped == []
    production = [r for r in scan.records if not r.shadow]
    shadow = [r for r in scan.records if r.shadow]
    assert len(production) == requests
    event_ids = {r.event_id for r in production}
    assert len(event_ids) == requests
    for record in production:
        assert record.endpoint == "captured" and record.variant == "alpha"
        assert record.status_code == 200 and record.latency_ms is not None and record.latency_ms > 0
        assert record.request_json() == {"inputs": sent[record.inference_id]}
        assert record.response_json()["generated_text"] == f"alpha says: {sent[record.inference_id]}"
        assert record.request_type == "application/json" and record.response_type == "application/json"
    assert {r.inference_id for r in production} == set(sent)

    assert len(shadow) == requests  # the shadow's weight equals the production weight: all mirrored
    by_event = {r.event_id: r for r in production}
    for record in shadow:
        assert record.variant == "beta" and record.status_code == 200
        assert record.source_event_id in event_ids
        source = by_event[record.source_event_id]
        assert record.request == source.request and record.inference_id == source.inference_id
        assert record.response_json()["generated_text"] == f"beta says: {sent[source.inference_id]}"
    assert len({r.source_event_id for r in shadow}) == requests
    assert not event_ids & {r.event_id for r in shadow}

    captured = len(read_capture(str(destination), endpoint="sampled").records)
    assert abs(captured - sampled_requests * 0.3) <= binomial_bound(sampled_requests, 0.3), captured


# -- control plane --------------------------------------------------------------------------------


def test_control_plane_validates_and_keeps_configs_immutable(gateway):
    _, control = gateway
    body = config_body("immutable", [("alpha", "alpha", 1.0)])
    first = ok(control.post("/control/endpoint-configs", json=body))
    assert ok(control.post("/control/endpoint-configs", json=body)) == first  # the same again: idempotent
    changed = config_body("immutable", [("alpha", "alpha", 2.0)])
    conflict = control.post("/control/endpoint-configs", json=changed)
    assert conflict.status_code == 409 and "immutable" in conflict.json()["error"]
    assert ok(control.get("/control/endpoint-configs/immutable"))["ProductionVariants"][0]["InitialVariantWeight"] == 1

    model = {"ModelName": "alpha", "PrimaryContainer": {"ContainerUrl": "http://127.0.0.1:9"}}
    assert control.post("/control/models", json=model).status_code == 409  # models are immutable too

    outside = control.post(
        "/control/models", json={"ModelName": "ghost", "PrimaryContainer": {"ModelDataUrl": "/no/such/folder"}}
    )
    assert outside.status_code == 400 and "/no/such/folder is outside the store" in outside.json()["error"]
    absent = f"{os.environ['LLMOPS_HOME']}/no/such/folder"  # in the test gateway's store, but not there
    missing = control.post("/control/models", json={"ModelName": "ghost", "PrimaryContainer": {"ModelDataUrl": absent}})
    assert missing.status_code == 400 and f"no model data at {absent}" in missing.json()["error"]
    both = {"ContainerUrl": "http://127.0.0.1:9", "ModelDataUrl": "/tmp"}
    response = control.post("/control/models", json={"ModelName": "both", "PrimaryContainer": both})
    assert response.status_code == 400 and "exactly one" in response.json()["error"]

    unknown = control.post("/control/endpoint-configs", json=config_body("orphan", [("a", "no-such-model", 1.0)]))
    assert unknown.status_code == 400 and "no-such-model" in unknown.json()["error"]
    assert control.get("/control/endpoint-configs/orphan").status_code == 404

    for bad, field in [
        ({"EndpointConfigName": "no-variants"}, "ProductionVariants"),
        (config_body("bad_name", [("alpha", "alpha", 1.0)]), "EndpointConfigName"),
        (config_body("negative", [("alpha", "alpha", -1.0)]), "InitialVariantWeight"),
    ]:
        response = control.post("/control/endpoint-configs", json=bad)
        assert response.status_code == 400 and field in response.json()["error"], (field, response.text)
    response = control.post("/control/models", json={"ModelName": "no-container"})
    assert response.status_code == 400 and "PrimaryContainer" in response.json()["error"]
    response = control.post("/control/models", content=b"{not json")
    assert response.status_code == 400 and "invalid ModelSpec" in response.json()["error"]

    assert control.get("/control/endpoints/no-such-endpoint").status_code == 404
    assert control.get("/control/endpoints/no-such-endpoint/metrics").status_code == 404
    assert control.get("/control/models/no-such-model").status_code == 404
    response = control.post("/control/endpoints", json={"EndpointName": "e", "EndpointConfigName": "no-such-config"})
    assert response.status_code == 404
    assert (
        control.put("/control/endpoints/no-such-endpoint", json={"EndpointConfigName": "immutable"}).status_code == 404
    )


def test_an_update_to_a_config_that_cannot_start_keeps_the_old_one_serving(gateway, tmp_path):
    """Two kinds of broken model at once: a server that never answers (a closed port) and a model
    folder that holds no model (serving.app exits); each endpoint keeps its old config serving."""
    url, control = gateway
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.txt").write_text("no weights here")
    create_model(control, "nowhere", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    ok(
        control.post(
            "/control/models", json={"ModelName": "empty", "PrimaryContainer": {"ModelDataUrl": str(not_a_model)}}
        )
    )
    broken = {"steady": ("nowhere", "/ping"), "sturdy": ("empty", "holds no adapter_config.json")}
    for endpoint, (model, _) in broken.items():
        deploy(control, endpoint, [("alpha", "alpha", 1.0)], config=f"{endpoint}-1")
        ok(control.post("/control/endpoint-configs", json=config_body(f"{endpoint}-2", [(model, model, 1.0)])))

    started = time.monotonic()
    for endpoint in broken:
        ok(control.put(f"/control/endpoints/{endpoint}", json={"EndpointConfigName": f"{endpoint}-2"}))
        assert ok(control.get(f"/control/endpoints/{endpoint}"))["EndpointStatus"] == "Updating"
    again = control.put("/control/endpoints/steady", json={"EndpointConfigName": "steady-2"})
    assert again.status_code == 400 and "Updating" in again.json()["error"]  # one update at a time
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(5):  # still served while the updates try
            for endpoint in broken:
                assert speaker(ok(invoke(client, endpoint))) == "alpha"
        for endpoint, (model, why) in broken.items():
            described = wait_settled(control, endpoint, timeout=STARTUP_TIMEOUT + 30)
            assert described["EndpointStatus"] == "InService", described
            assert described["EndpointConfigName"] == f"{endpoint}-1"
            assert model in described["FailureReason"] and why in described["FailureReason"], described
            assert [v["VariantName"] for v in described["ProductionVariants"]] == ["alpha"]
            for _ in range(5):
                assert speaker(ok(invoke(client, endpoint))) == "alpha"
        assert time.monotonic() - started >= STARTUP_TIMEOUT - 1  # the closed port was given its time


def test_a_new_endpoint_that_cannot_start_fails_and_can_be_deleted(gateway):
    url, control = gateway
    create_model(control, "unreachable", f"http://127.0.0.1:{free_port()}")
    ok(control.post("/control/endpoint-configs", json=config_body("doomed-1", [("only", "unreachable", 1.0)])))
    ok(control.post("/control/endpoints", json={"EndpointName": "doomed", "EndpointConfigName": "doomed-1"}))
    described = wait_in_service(control, "doomed", timeout=STARTUP_TIMEOUT + 20)
    assert described["EndpointStatus"] == "Failed" and "unreachable" in described["FailureReason"]

    with pytest.raises(ClientError) as caught:
        runtime(url).invoke_endpoint(EndpointName="doomed", Body=payload(), ContentType="application/json")
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert "Failed" in caught.value.response["Error"]["Message"]
    again = control.post("/control/endpoints", json={"EndpointName": "doomed", "EndpointConfigName": "doomed-1"})
    assert again.status_code == 409
    assert control.put("/control/endpoints/doomed", json={"EndpointConfigName": "doomed-1"}).status_code == 400

    ok(control.delete("/control/endpoints/doomed"))
    assert control.get("/control/endpoints/doomed").status_code == 404
    assert control.delete("/control/endpoints/doomed").status_code == 404


def test_an_update_switches_traffic_without_a_failed_request(gateway):
    url, control = gateway
    deploy(control, "switching", [("blue", "alpha", 1.0)], config="switching-1")
    ok(control.post("/control/endpoint-configs", json=config_body("switching-2", [("green", "gamma", 1.0)])))

    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = invoke(client, "switching")
                    outcomes.append((response.status_code, response.headers.get("x-amzn-invoked-production-variant")))
                except httpx.HTTPError as exc:
                    outcomes.append((0, repr(exc)))

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait_for(lambda: len(outcomes) >= 20, 10, "no traffic")
        ok(control.put("/control/endpoints/switching", json={"EndpointConfigName": "switching-2"}))
        described = wait_settled(control, "switching")
        settled = len(outcomes)
        wait_for(lambda: len(outcomes) >= settled + 20, 10, "no traffic after the update")
    finally:
        stop.set()
        sender.join(30)

    assert described["EndpointStatus"] == "InService" and "FailureReason" not in described
    assert described["EndpointConfigName"] == "switching-2"
    assert [status for status, _ in outcomes if status != 200] == []
    served = [variant for _, variant in outcomes]
    switched = served.index("green")
    assert switched > 0 and set(served[:switched]) == {"blue"} and set(served[switched:]) == {"green"}
    # One sender: at most the one request already routed when the switch settled ends on blue.
    assert served[settled + 1 :] == ["green"] * (len(served) - settled - 1)


def test_endpoints_come_back_after_a_gateway_restart(tmp_path, fakes):
    state = tmp_path / "gateway"
    weights = {"alpha": 0.0, "beta": 2.0}
    with running_gateway(state) as (url, _), httpx.Client(base_url=url, timeout=30) as control:
        create_model(control, "alpha", fakes["alpha"])
        create_model(control, "beta", fakes["beta"])
        deploy(control, "durable", [("alpha", "alpha", 1.0), ("beta", "beta", 1.0)])
        ok(
            control.post(
                "/control/endpoints/durable/weights",
                json={
                    "DesiredWeightsAndCapacities": [{"VariantName": v, "DesiredWeight": w} for v, w in weights.items()]
                },
            )
        )
        before = ok(control.get("/control/endpoints/durable"))

    with running_gateway(state) as (url, _), httpx.Client(base_url=url, timeout=30) as control:
        described = wait_in_service(control, "durable", timeout=30)
        assert described["EndpointStatus"] == "InService" and "FailureReason" not in described
        assert described["EndpointConfigName"] == before["EndpointConfigName"]
        assert {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]} == weights
        assert ok(control.get("/control/models/beta"))["PrimaryContainer"]["ContainerUrl"] == fakes["beta"]
        assert ok(control.get("/control/endpoint-configs/durable-config"))["EndpointConfigName"] == "durable-config"
        # A deployment that runs again after the restart re-creates the same things: all idempotent.
        create_model(control, "alpha", fakes["alpha"])
        body = config_body("durable-config", [("alpha", "alpha", 1.0), ("beta", "beta", 1.0)])
        ok(control.post("/control/endpoint-configs", json=body))
        ok(control.post("/control/endpoints", json={"EndpointName": "durable", "EndpointConfigName": "durable-config"}))
        listed = ok(control.get("/control/endpoints"))["Endpoints"]
        assert [e["EndpointName"] for e in listed] == ["durable"]
        client = runtime(url)
        for _ in range(20):
            response = client.invoke_endpoint(EndpointName="durable", Body=payload(), ContentType="application/json")
            assert response["InvokedProductionVariant"] == "beta"
        response = client.invoke_endpoint(
            EndpointName="durable", Body=payload(), ContentType="application/json", TargetVariant="alpha"
        )
        assert speaker(json.loads(response["Body"].read())) == "alpha"


# -- shutdown ---------------------------------------------------------------------------------------


def model_server_pid(gateway_log) -> int | None:
    """The pid of the first model server the gateway started, from its log."""
    try:
        text = gateway_log.read_text()
    except OSError:
        return None
    match = re.search(r"model server pid (\d+)", text)
    return int(match.group(1)) if match else None


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stopping_the_gateway_while_a_model_server_starts_leaves_no_process_behind(tmp_path):
    # A folder that is no model but looks like one (a config.json): serving.app takes seconds to
    # import torch and transformers before it fails, so it is still starting when the gateway is
    # told to stop.
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    state = tmp_path / "gateway"
    pid = None
    try:
        with running_gateway(state) as (url, _), httpx.Client(base_url=url, timeout=30) as control:
            ok(
                control.post(
                    "/control/models",
                    json={"ModelName": "loading", "PrimaryContainer": {"ModelDataUrl": str(not_a_model)}},
                )
            )
            ok(control.post("/control/endpoint-configs", json=config_body("loading-1", [("only", "loading", 1.0)])))
            ok(control.post("/control/endpoints", json={"EndpointName": "loading", "EndpointConfigName": "loading-1"}))
            pid = wait_for(lambda: model_server_pid(tmp_path / "gateway.log"), 15, "no model server started")
            assert running(pid)
            assert ok(control.get("/control/endpoints/loading"))["EndpointStatus"] == "Creating"
        # The gateway has exited (SIGTERM): the model server it was starting must be gone too.
        assert not running(pid), f"model server {pid} outlived the gateway"
    finally:
        if pid is not None and running(pid):
            os.killpg(pid, signal.SIGKILL)  # its own session: its pid is its group's


def test_a_model_server_left_behind_by_a_killed_gateway_is_stopped_at_the_next_start(tmp_path):
    import subprocess
    import sys

    state = tmp_path / "gateway"
    (state / "servers").mkdir(parents=True)
    # Stands in for a model server whose gateway was SIGKILLed: same command-line marker, own session.
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "serving.app"], start_new_session=True
    )
    (state / "servers" / "ep-v1-m.pid").write_text(str(orphan.pid))
    try:
        with running_gateway(state):
            assert orphan.wait(timeout=30) == -signal.SIGKILL
        assert not (state / "servers" / "ep-v1-m.pid").exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()


def _wait_refused(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/ping", timeout=2)
        except httpx.ConnectError:
            return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} still accepts connections after {timeout}s")


def test_a_model_that_is_too_slow_or_gone_is_a_model_error_that_says_which(tmp_path):
    with (
        running_fake("slow", tmp_path, delay=3.0, name="slow") as slow_url,
        running_fake("crash", tmp_path, name="doomed") as doomed_url,
        running_gateway(tmp_path / "gateway", "--invoke-timeout", "1") as (url, _),
        httpx.Client(base_url=url, timeout=30) as control,
    ):
        create_model(control, "slow", slow_url)
        create_model(control, "doomed", doomed_url)
        deploy(control, "sluggish", [("tortoise", "slow", 1.0)])
        deploy(control, "dying", [("mayfly", "doomed", 1.0)])
        client = runtime(url)
        for endpoint, expected in (
            ("sluggish", "the model of variant tortoise did not answer within 1s"),
            ("dying", "the model server of variant mayfly is not reachable (ServerDisconnectedError)"),
            ("dying", "the model server of variant mayfly is not reachable (ClientConnectorError)"),
        ):
            if "ClientConnectorError" in expected:
                # Until the crashed process is gone, a connection may still be accepted and then
                # reset (ClientOSError): wait until its port refuses them.
                _wait_refused(doomed_url)
            with pytest.raises(ClientError) as caught:
                client.invoke_endpoint(EndpointName=endpoint, Body=payload(), ContentType="application/json")
            error = caught.value.response
            assert error["Error"]["Code"] == "ModelError" and error["OriginalStatusCode"] == 502
            assert expected in error["OriginalMessage"], error["OriginalMessage"]
        assert metrics(control, "sluggish")["Variants"]["tortoise"]["Invocation5XXErrors"] == 1
