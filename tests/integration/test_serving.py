"""The inference server on a tiny model with two LoRA adapters, loaded from a folder and from a
``model.tar.gz`` the way SageMaker hands it over."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.model import ModelLoadError, load

pytestmark = [pytest.mark.integration, pytest.mark.model]


def save_adapter(tiny_model, folder, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    (folder / "training_config.json").write_text(json.dumps({"base_model": str(tiny_model)}))
    return folder


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    save_adapter(tiny_model, root, seed=1)
    save_adapter(tiny_model, root / "adapters" / "other", seed=2)
    return root


def test_serves_the_default_and_a_named_adapter(model_dir):
    loaded = load(model_dir)
    assert loaded.adapters == ("default", "other")
    with TestClient(create_app(loader=lambda: loaded)) as client:
        assert client.get("/ping").json()["adapters"] == ["default", "other"]
        body = {"inputs": "What does zip do?", "parameters": {"max_new_tokens": 6}}
        first = client.post("/invocations", json=body).json()
        other = client.post("/invocations", json={**body, "adapter": "other"}).json()
        again = client.post("/invocations", json=body).json()
    assert first["adapter"] == "default" and other["adapter"] == "other"
    assert 1 <= first["completion_tokens"] <= 6 and first["prompt_tokens"] > 5
    assert first["generated_text"] == again["generated_text"], "greedy decoding is deterministic"
    assert first["generated_text"] != other["generated_text"], "the adapter changes the model"


def test_loads_a_model_tarball_as_sagemaker_hands_it_over(model_dir, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    (tmp_path / "model.tar.gz").write_bytes(buffer.getvalue())
    loaded = load(tmp_path)
    assert loaded.adapters == ("default",)
    result = loaded.generate("hi", 3, 0.0, 1.0, [], None)
    assert result["completion_tokens"] <= 3


def test_a_folder_without_a_model_is_refused_with_what_is_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="holds no adapter_config.json, config.json or model.tar.gz"):
        load(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope")


def test_the_server_process_listens_on_the_sagemaker_port(model_dir, tiny_model):
    import os
    import subprocess
    import sys

    import requests

    from llmops.config import PROJECT_ROOT
    from tests.gateways import free_port, wait_http

    port = free_port()
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(model_dir),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "LLMOPS_SERVING_HOST": "127.0.0.1",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    server = subprocess.Popen([sys.executable, "-m", "serving.app"], env=env, cwd=PROJECT_ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", server, timeout=120)
        response = requests.post(f"{url}/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert response.status_code == 200 and response.json()["completion_tokens"] <= 2
        assert requests.post(f"{url}/invocations", data=b"nope", timeout=10).status_code == 400
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_server_process_serves_on_a_socket_it_inherits(model_dir, tiny_model):
    """As the gateway starts it: the port is bound before the process starts, so nothing else can
    take it while the model loads, and the server listens on it once loaded."""
    import os
    import socket
    import subprocess
    import sys

    import requests

    from llmops.config import PROJECT_ROOT
    from tests.gateways import wait_http

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        env = {
            **os.environ,
            "SM_MODEL_DIR": str(model_dir),
            "LLMOPS_SERVING_FD": str(sock.fileno()),
            "PORT": "1",  # ignored: the inherited socket wins
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.app"], env=env, cwd=PROJECT_ROOT, pass_fds=(sock.fileno(),)
        )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as intruder, pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))  # held by the server, loaded or not
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/ping", server, timeout=120)
        response = requests.post(f"{url}/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        assert response.status_code == 200 and response.json()["completion_tokens"] <= 2
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_inherited_descriptor_that_is_no_socket_is_refused_by_name(tmp_path):
    import os
    import subprocess
    import sys

    from llmops.config import PROJECT_ROOT

    env = {**os.environ, "SM_MODEL_DIR": str(tmp_path), "LLMOPS_SERVING_FD": "987", "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "serving.app"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "LLMOPS_SERVING_FD='987' is not an open socket" in done.stderr


def test_a_batch_answers_as_each_request_would_alone(model_dir):
    from serving.model import Batcher

    loaded = load(model_dir)
    prompts = ["hi", "What does zip do in Python?", "Explain list comprehensions, briefly, with an example.", "why"]
    limits = [3, 9, 6, 12]
    alone = [loaded.generate(p, n) for p, n in zip(prompts, limits, strict=True)]
    prepared = [loaded.prepare(p, n) for p, n in zip(prompts, limits, strict=True)]
    together = loaded.generate_batch(prepared)
    for one, batched, limit in zip(alone, together, limits, strict=True):
        assert batched["completion_tokens"] <= limit
        assert batched["generated_text"] == one["generated_text"], "left padding must not change a greedy answer"
        assert batched["prompt_tokens"] == one["prompt_tokens"]
    other = loaded.generate_batch([loaded.prepare(p, 6, adapter="other") for p in prompts[:2]])
    assert other[1]["generated_text"] == loaded.generate(prompts[1], 6, adapter="other")["generated_text"]

    batcher = Batcher(loaded, max_batch_size=8, max_wait_ms=200)
    try:
        futures = [batcher.submit(r) for r in prepared]
        answers = [f.result(timeout=120) for f in futures]
    finally:
        batcher.close()
    assert [a["batch_size"] for a in answers] == [4, 4, 4, 4]
    assert [a["generated_text"] for a in answers] == [a["generated_text"] for a in alone]
