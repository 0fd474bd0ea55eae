"""Running the endpoint gateway and stand-in model servers as real processes, for tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The gateway's access settings from the environment: a test gateway gets only the ones it names.
GATEWAY_POLICY_ENV = (
    "LLMOPS_GATEWAY_API_KEY",
    "LLMOPS_GATEWAY_API_KEYS_FILE",
    "LLMOPS_GATEWAY_REQUIRE_AUTH",
    "LLMOPS_GATEWAY_RATE_LIMIT",
    "LLMOPS_GATEWAY_MAX_BODY_BYTES",
    "LLMOPS_GATEWAY_MAX_NEW_TOKENS",
    "LLMOPS_GATEWAY_MAX_INPUT_TOKENS",
    "LLMOPS_GATEWAY_GUARDRAILS",
    "LLMOPS_GATEWAY_MODEL_STORE",
    "LLMOPS_GATEWAY_ALLOW_REMOTE_CONTAINERS",
    "LLMOPS_GATEWAY_CAPTURE_ROOT",
    "LLMOPS_GATEWAY_CAPTURE_MAX_BYTES",
    "LLMOPS_GATEWAY_CAPTURE_MIN_FREE_BYTES",
    "LLMOPS_GATEWAY_API_KEY_ROLE",
)


_PICK = random.SystemRandom()  # never the seeded global generator: two workers would pick alike


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port nothing is bound to, outside the kernel's ephemeral range.

    A port the kernel hands out (``bind(0)``, and every outgoing connection) and the test releases
    can be handed out again before the process it starts binds it: with a load test in the next
    worker, that happened. Ports outside the range are handed out by no one but this function."""
    low, high = _ephemeral_range()
    spans = [span for span in ((10_000, low), (high + 1, 65_536)) if span[1] - span[0] >= 1_000]
    for _ in range(200 if spans else 0):
        port = _PICK.randrange(*_PICK.choice(spans))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # the range covers nearly all
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def _env() -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in GATEWAY_POLICY_ENV}
    return {**inherited, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}


@contextmanager
def _process(
    command: list[str], health: str, log: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> Iterator[subprocess.Popen]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            env={**_env(), **(env or {})},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(health, process, timeout)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def running_gateway(
    state_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m serving.gateway`` on a free port, with the flags ``extra`` and the environment
    ``env`` on top of this process's (minus the gateway's access settings); yields (its URL, the
    process). Leaving the block stops it with SIGTERM, as a service manager would.

    Its model store and its capture root are the test session's state folder, where every test's
    ``tmp_path`` lies, unless ``extra`` names them (``--model-store``, ``--capture-root``)."""
    port = free_port()
    command = [sys.executable, "-m", "serving.gateway", "--port", str(port), "--state-dir", str(state_dir), *extra]
    if "--model-store" not in extra and not (env or {}).get("LLMOPS_GATEWAY_MODEL_STORE"):
        command += ["--model-store", os.environ.get("LLMOPS_HOME") or str(ROOT / ".llmops")]
    if "--capture-root" not in extra and not (env or {}).get("LLMOPS_GATEWAY_CAPTURE_ROOT"):
        command += ["--capture-root", os.environ.get("LLMOPS_HOME") or str(ROOT / ".llmops")]
    log = state_dir.parent / f"{state_dir.name}.log"
    with _process(command, f"http://127.0.0.1:{port}/ping", log, env) as process:
        yield f"http://127.0.0.1:{port}", process


@contextmanager
def running_model_server(model_dir: Path, log: Path, **env: str) -> Iterator[str]:
    """``python -m serving.app`` serving ``model_dir`` on a free port, with extra environment
    (``LLMOPS_MAX_BATCH_SIZE=...``); yields its URL."""
    port = free_port()
    env = {"SM_MODEL_DIR": str(model_dir), "PORT": str(port), "LLMOPS_SERVING_HOST": "127.0.0.1", **env}
    with _process([sys.executable, "-m", "serving.app"], f"http://127.0.0.1:{port}/ping", log, env, timeout=300):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def running_fake(mode: str, log_dir: Path, delay: float = 0.0, name: str | None = None) -> Iterator[str]:
    """A stand-in model server (``tests.fakecontainer``); yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "tests.fakecontainer", str(port), mode, str(delay)]
    os.environ["FAKE_NAME"] = name or mode
    try:
        with _process(command, f"http://127.0.0.1:{port}/ping", log_dir / f"fake-{port}.log"):
            yield f"http://127.0.0.1:{port}"
    finally:
        os.environ.pop("FAKE_NAME", None)


def wait_in_service(control: httpx.Client, endpoint: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = control.get(f"/control/endpoints/{endpoint}").json()
        if described["EndpointStatus"] in ("InService", "Failed"):
            return described
        time.sleep(0.2)
    raise TimeoutError(f"endpoint {endpoint} not in service after {timeout}s")


def runtime(url: str, read_timeout: float | None = None, attempts: int = 1):
    """The stock boto3 runtime client pointed at the gateway; no retries by default, so every error
    shows (any AWS credentials: the gateway checks API keys, not signatures)."""
    import boto3
    from botocore.config import Config

    timeouts = {} if read_timeout is None else {"read_timeout": read_timeout}
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",  # pragma: allowlist secret
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}, **timeouts),
    )
