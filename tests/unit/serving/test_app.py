"""The inference server's HTTP contract, with a stand-in model: what is a 4xx and what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serving.app import MAX_BODY_BYTES, create_app
from serving.model import Prepared


class FakeModel:
    adapters = ("default", "concise")

    def __init__(self):
        self.calls = []

    def prepare(self, inputs, max_new_tokens, temperature, top_p, stop, adapter):
        self.calls.append((inputs, max_new_tokens, temperature, top_p, stop, adapter))
        if isinstance(inputs, str) and inputs.startswith("too long"):
            raise ValueError("the prompt is 5000 tokens; it exceeds the model's context of 2048 tokens")
        return Prepared((1, 2, 3), max_new_tokens, temperature, top_p, tuple(stop), adapter or "default")

    def generate_batch(self, requests):
        return [
            {
                "generated_text": "ok",
                "prompt_tokens": len(r.ids),
                "completion_tokens": 1,
                "finish_reason": "stop",
                "adapter": r.adapter,
            }
            for r in requests
        ]


@pytest.fixture
def served():
    model = FakeModel()
    with TestClient(create_app(loader=lambda: model)) as client:
        yield client, model


def test_ping_answers_once_loaded(served):
    client, _ = served
    response = client.get("/ping")
    assert response.status_code == 200 and response.json()["adapters"] == ["default", "concise"]
    assert response.json()["batching"] == {"max_batch_size": 8, "batches": 0, "requests": 0}


def test_text_and_chat_inputs_with_parameters_reach_the_model(served):
    client, model = served
    response = client.post("/invocations", json={"inputs": "What is zip?", "parameters": {"max_new_tokens": 5}})
    assert response.status_code == 200 and response.json()["generated_text"] == "ok"
    assert response.json()["batch_size"] == 1 and response.json()["latency_ms"] >= 0
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is zip?"}]
    body = {"inputs": chat, "parameters": {"temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"]}, "adapter": "concise"}
    assert client.post("/invocations", json=body).status_code == 200
    assert model.calls[0] == ("What is zip?", 5, 0.0, 1.0, [], None)
    assert model.calls[1] == (chat, 128, 0.7, 0.9, ["\n\n"], "concise")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, '"inputs"'),
        (json.dumps({"parameters": {}}).encode(), 400, '"inputs"'),
        (json.dumps({"inputs": ""}).encode(), 400, "inputs"),
        (json.dumps({"inputs": "q", "parameters": {"max_new_tokens": 0}}).encode(), 400, "max_new_tokens"),
        (json.dumps({"inputs": "q", "parameters": {"temperature": 5}}).encode(), 400, "temperature"),
        (json.dumps({"inputs": "q", "parameters": {"top_p": 0}}).encode(), 400, "top_p"),
        (json.dumps({"inputs": "q", "parameters": {"beams": 4}}).encode(), 400, "beams"),
        (json.dumps({"inputs": [{"role": "robot", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({"inputs": "q", "adapter": "nope"}).encode(), 404, "unknown adapter 'nope'"),
        (json.dumps({"inputs": "too long prompt"}).encode(), 413, "exceeds the model's context"),
        (b'{"inputs": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "bytes; at most"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(served, body, status, message):
    client, _ = served
    response = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_batching_settings_come_from_the_environment_and_bad_ones_are_named(monkeypatch):
    monkeypatch.setenv("LLMOPS_MAX_BATCH_SIZE", "2")
    with TestClient(create_app(loader=FakeModel)) as client:
        assert client.get("/ping").json()["batching"]["max_batch_size"] == 2
    monkeypatch.setenv("LLMOPS_MAX_BATCH_SIZE", "eight")
    with pytest.raises(ValueError, match="LLMOPS_MAX_BATCH_SIZE='eight' is not a int"):
        create_app(loader=FakeModel)
    monkeypatch.setenv("LLMOPS_MAX_BATCH_SIZE", "0")
    with (
        pytest.raises(ValueError, match="max_batch_size must be between 1 and 256"),
        TestClient(create_app(loader=FakeModel)),
    ):
        pass


def test_operator_caps_on_new_and_prompt_tokens(monkeypatch):
    monkeypatch.setenv("LLMOPS_MAX_NEW_TOKENS", "16")
    monkeypatch.setenv("LLMOPS_MAX_INPUT_TOKENS", "2")  # FakeModel's prompts are 3 tokens
    model = FakeModel()
    with TestClient(create_app(loader=lambda: model)) as client:
        over = client.post("/invocations", json={"inputs": "q", "parameters": {"max_new_tokens": 17}})
        assert over.status_code == 400
        assert over.json()["error"] == (
            "parameters.max_new_tokens is 17; this server answers at most 16 tokens (LLMOPS_MAX_NEW_TOKENS)"
        )
        long_prompt = client.post("/invocations", json={"inputs": "q", "parameters": {"max_new_tokens": 16}})
        assert long_prompt.status_code == 413
        assert (
            long_prompt.json()["error"]
            == "the prompt is 3 tokens; this server accepts at most 2 (LLMOPS_MAX_INPUT_TOKENS)"
        )
    # Without a cap on prompts, a request that asks for nothing gets the cap, not the default 128.
    monkeypatch.delenv("LLMOPS_MAX_INPUT_TOKENS")
    model = FakeModel()
    with TestClient(create_app(loader=lambda: model)) as client:
        assert client.post("/invocations", json={"inputs": "q"}).status_code == 200
        assert (
            client.post("/invocations", json={"inputs": "q", "parameters": {"max_new_tokens": 16}}).status_code == 200
        )
    assert [call[1] for call in model.calls] == [16, 16]
    for bad in ("0x", "4096"):
        monkeypatch.setenv("LLMOPS_MAX_NEW_TOKENS", bad)
        with pytest.raises(ValueError, match="LLMOPS_MAX_NEW_TOKENS"):
            create_app(loader=FakeModel)


def test_a_body_over_the_cap_is_refused_before_it_is_held(served):
    """Announced too large, or streamed past the cap without a length: 413 either way, and the
    model never sees it."""
    client, model = served

    def chunks():
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536

    streamed = client.post("/invocations", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and f"over {MAX_BODY_BYTES} bytes" in streamed.json()["error"]
    announced = client.post(
        "/invocations",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": str(MAX_BODY_BYTES + 1)},
    )
    assert announced.status_code == 413, announced.text
    assert model.calls == []


def test_the_model_server_listens_on_loopback_unless_its_image_says_otherwise(monkeypatch):
    import serving.app as app_module

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: seen.update(options))
    monkeypatch.delenv("LLMOPS_SERVING_FD", raising=False)
    monkeypatch.delenv("LLMOPS_SERVING_HOST", raising=False)
    app_module.main()
    assert seen["host"] == "127.0.0.1"
    monkeypatch.setenv("LLMOPS_SERVING_HOST", "0.0.0.0")
    app_module.main()
    assert seen["host"] == "0.0.0.0"
    dockerfile = (Path(__file__).resolve().parents[3] / "Dockerfile").read_text()
    assert "ENV LLMOPS_SERVING_HOST=0.0.0.0" in dockerfile  # the serving image, where SageMaker reaches it
