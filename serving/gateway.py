"""The local endpoint gateway: the twin of a SageMaker real-time endpoint, on one machine.

    python -m serving.gateway --port 8090 --state-dir .llmops/gateway

**Runtime.** ``POST /endpoints/{name}/invocations`` speaks the SageMaker runtime wire protocol,
so the unmodified boto3 ``sagemaker-runtime`` client (``endpoint_url`` set to the gateway) can
``invoke_endpoint``. A request goes to a production variant drawn by weight, or to the one named
by ``TargetVariant``; the response names it in ``x-Amzn-Invoked-Production-Variant``. Errors come
back as SageMaker's: ``ValidationError`` (400) for a bad request, ``ModelError`` (424) when the
model server answered with an error or not at all.

**Shadow.** A copy of a share of the requests goes to the shadow variant after the caller has its
answer, through a bounded queue drained by a few workers: the caller never waits for the shadow
and never sees its errors (a full queue drops the copy and counts it).

**Capture.** With a ``DataCaptureConfig``, a sampled share of requests is written, response and
all, in SageMaker's Data Capture layout (see ``serving.capture``), production and shadow alike;
the shadow's record points at the production record it mirrors.

**Control.** ``/control/...`` takes the SageMaker API's request bodies: models, endpoint configs
(immutable), endpoints (create, update to another config, update weights, describe, delete) and
per-variant metrics. Every variant runs in its own model server process (``serving.app``), so a
crashing variant cannot take another down. The state is saved in ``--state-dir`` and restored at
start-up.

**Access** (``serving.access``). With API keys (``--api-keys-file``, ``LLMOPS_GATEWAY_API_KEYS_FILE``
or ``LLMOPS_GATEWAY_API_KEY``) every route but ``/ping`` needs one, as ``x-api-key`` or
``Authorization: Bearer``; a missing or unknown key is a 401 and reaches no model. Without keys the
gateway warns and serves anyone, unless ``--require-auth`` makes that a refusal to start.
``--rate-limit`` gives each client (key, or address without keys) a token bucket; a request over it
is a 429 ``ThrottlingException``. ``--max-body-bytes`` lowers SageMaker's 6 MB payload cap (413),
``--max-new-tokens`` caps what a request may ask for (400) and, with ``--max-input-tokens``, what
the model servers it starts accept. Refusals are counted (``GET /control/metrics``), never captured.

**Guardrails** (``serving.guardrails``): personal data and prompt injection in requests and
answers are flagged in the capture record and the metrics, or blocked (``--guardrails``, or the
endpoint config's tag ``llmops:guardrails``).

**Model store.** ``CreateModel`` takes a ``ModelDataUrl`` only under ``--model-store`` (default
``$LLMOPS_HOME/store``), and a ``ContainerUrl`` only on loopback unless ``--allow-remote-containers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from serving import guardrails
from serving.access import (
    AccessConfigError,
    ApiKeys,
    ModelStore,
    RateLimiter,
    SourceRefused,
    load_api_keys,
    presented_key,
)
from serving.capture import CaptureWriter, capture_record, local_root
from serving.endpoints import (
    EndpointConfigSpec,
    EndpointSpec,
    ModelSpec,
    RoutingError,
    UpdateEndpointSpec,
    UpdateWeightsSpec,
    choose_variant,
    shadow_share,
)
from serving.metrics import RefusalCounters, VariantMetrics

log = logging.getLogger("llmops.gateway")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker's real-time limit
DRAIN_BYTES = 64 * 1024 * 1024  # a refused request's body read (and dropped) so the caller reads the answer
CLIENT = "llmops.client"  # the ASGI scope key of the authenticated client's name
FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
VARIANT_HEADER = "x-Amzn-Invoked-Production-Variant"
# The capture record's eventId, so a caller can find its own request in the captured traffic.
EVENT_ID_HEADER = "x-llmops-event-id"


class ControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def aws_error(status: int, code: str, message: str, **extra) -> JSONResponse:
    """An error the AWS SDKs parse: ``x-amzn-ErrorType`` names it, the body says why."""
    return JSONResponse(
        {"__type": code, "message": message, **extra}, status_code=status, headers={"x-amzn-ErrorType": code}
    )


@dataclass(frozen=True)
class UpstreamAnswer:
    status_code: int
    content: bytes
    headers: Any  # case-insensitive, as received

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class UpstreamTimeout(Exception):
    pass


class UpstreamUnreachable(Exception):
    pass


class Upstream:
    """The client that carries invocations to model servers: aiohttp, which costs a fraction of
    httpx's async client per request; under concurrency that is most of the gateway's overhead.
    (Control calls, such as health checks, keep httpx.)"""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.session = None

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            # Idle connections close before the servers' (uvicorn: 5 s): aiohttp never retries a POST.
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            # No Accept-Encoding: answers pass through to callers and capture as they came.
            skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamAnswer:
        import aiohttp

        if self.session is None or self.session.closed:
            raise UpstreamUnreachable("the gateway's client is not running")
        try:
            async with self.session.post(url, data=body, headers=headers) as response:
                return UpstreamAnswer(response.status, await response.read(), response.headers)
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _bound_socket() -> socket.socket:
    """A loopback socket on a port the kernel picks, bound but not listening: the model server
    inherits it and listens once its model is loaded. A port merely found free and handed over by
    number can be taken by any other process (an outgoing connection, too) while the model loads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


class VariantServer:
    """One model server: a ``serving.app`` process this gateway started, or a server at a URL."""

    def __init__(
        self,
        key: str,
        model: ModelSpec,
        state_dir: Path,
        startup_timeout: float,
        store: ModelStore,
        limits_env: dict[str, str] | None = None,
    ):
        self.key = key
        self.model = model
        self.state_dir = state_dir
        self.startup_timeout = startup_timeout
        self.store = store
        self.limits_env = limits_env or {}
        self.process: subprocess.Popen | None = None
        self.inflight = 0  # requests sent to it and not answered yet
        container = model.PrimaryContainer
        self.url = container.ContainerUrl.rstrip("/") if container.ContainerUrl else ""
        self.log_path = state_dir / "logs" / f"{key}.log"

    def _model_dir(self) -> Path:
        source = self.model.PrimaryContainer.ModelDataUrl
        try:  # again: the model may predate the store's current roots, or a link may have changed
            path = self.store.check_model_data(self.model.ModelName, source)
        except SourceRefused as exc:
            raise ControlError(400, str(exc)) from None
        if path is not None:
            if path.is_dir():
                return path
            if not path.is_file():
                raise ControlError(400, f"model {self.model.ModelName}: no model data at {source}")
        # A model.tar.gz is copied next to the server, as SageMaker copies it to /opt/ml/model.
        target = self.state_dir / "models" / self.model.ModelName
        tarball = target / "model.tar.gz"
        if not tarball.is_file():
            target.mkdir(parents=True, exist_ok=True)
            partial = target / f".model.tar.gz.{uuid.uuid4().hex}"
            if path is not None:
                shutil.copyfile(path, partial)
            else:  # the store admits no other scheme than s3://
                import boto3

                bucket, _, key = source.removeprefix("s3://").partition("/")
                boto3.client("s3").download_file(bucket, key, str(partial))
            partial.replace(tarball)
        return target

    async def start(self, client: httpx.AsyncClient) -> None:
        container = self.model.PrimaryContainer
        if container.ContainerUrl:
            try:
                self.store.check_container_url(self.model.ModelName, container.ContainerUrl)
            except SourceRefused as exc:
                raise ControlError(400, str(exc)) from None
        if self.process is None and not container.ContainerUrl:
            model_dir = await asyncio.to_thread(self._model_dir)
            with _bound_socket() as sock:  # the server has its own copy once started
                self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
                env = {
                    **os.environ,
                    **self.model.PrimaryContainer.Environment,
                    **self.limits_env,  # the operator's caps win over a model's own
                    "SM_MODEL_DIR": str(model_dir),
                    "LLMOPS_SERVING_FD": str(sock.fileno()),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
                }
                for name in ("SAGEMAKER_BIND_TO_PORT", "LLMOPS_GATEWAY_API_KEY", "LLMOPS_GATEWAY_API_KEYS_FILE"):
                    env.pop(name, None)  # the gateway's own; a model server has no use for its keys
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "ab") as out:
                    self.process = subprocess.Popen(
                        [sys.executable, "-m", "serving.app"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=PROJECT_ROOT,
                        start_new_session=True,
                        pass_fds=(sock.fileno(),),
                    )
            self.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(str(self.process.pid))
            log.info("variant %s: model server pid %s on %s", self.key, self.process.pid, self.url)
        await self._wait_healthy(client)

    async def _wait_healthy(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ControlError(
                    500,
                    f"the model server of {self.key} exited with code {self.process.returncode}: {self.log_tail()}",
                )
            try:
                response = await client.get(f"{self.url}/ping", timeout=5)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        await self.stop()
        raise ControlError(
            500, f"the model server of {self.key} did not answer /ping within {self.startup_timeout:.0f}s"
        )

    def log_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "servers" / f"{self.key}.pid"

    async def retire(self, grace: float) -> None:
        """Stop once the requests already sent to it are answered (at most ``grace`` seconds)."""
        deadline = time.monotonic() + grace
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self, timeout: float = 15) -> None:
        process, self.process = self.process, None
        self.pid_file.unlink(missing_ok=True)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class Routing:
    """What one request needs, swapped as a whole when the endpoint changes (never mutated)."""

    config: EndpointConfigSpec
    weights: dict[str, float]
    servers: dict[str, VariantServer]
    shadow: str | None
    shadow_share: float
    capture_root: Path | None
    capture_input: bool
    capture_output: bool
    sampling: float
    guardrails: str  # off, flag or block


def make_routing(
    config: EndpointConfigSpec, weights: dict[str, float], servers: dict[str, VariantServer], guardrails_default: str
) -> Routing:
    shadow = config.ShadowProductionVariants[0] if config.ShadowProductionVariants else None
    capture = config.DataCaptureConfig
    enabled = capture is not None and capture.EnableCapture
    return Routing(
        config=config,
        weights=weights,
        servers=servers,
        shadow=shadow.VariantName if shadow else None,
        shadow_share=shadow_share(weights, shadow.InitialVariantWeight) if shadow else 0.0,
        capture_root=local_root(capture.DestinationS3Uri) if enabled else None,
        capture_input=enabled and capture.captures("Input"),
        capture_output=enabled and capture.captures("Output"),
        sampling=capture.InitialSamplingPercentage / 100 if enabled else 0.0,
        guardrails=config.guardrails or guardrails_default,
    )


@dataclass
class Endpoint:
    name: str
    config_name: str
    status: str = "Creating"
    failure_reason: str | None = None
    pending_config: str | None = None  # the config an update is moving to
    routing: Routing | None = None
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    modified: datetime = field(default_factory=lambda: datetime.now(UTC))
    metrics: dict[str, VariantMetrics] = field(default_factory=dict)
    shadow_metrics: dict[str, VariantMetrics] = field(default_factory=dict)
    refusals: RefusalCounters = field(default_factory=RefusalCounters)  # throttled, token caps, guardrails

    def variant_metrics(self, variant: str, shadow: bool = False) -> VariantMetrics:
        table = self.shadow_metrics if shadow else self.metrics
        if variant not in table:
            table[variant] = VariantMetrics()
        return table[variant]


@dataclass(frozen=True)
class Limits:
    """What one request may cost: its body, the new tokens it asks for, its prompt's tokens (the
    last two also passed to the model servers the gateway starts)."""

    max_body_bytes: int = MAX_PAYLOAD_BYTES
    max_new_tokens: int | None = None
    max_input_tokens: int | None = None

    def __post_init__(self):
        if not 1 <= self.max_body_bytes <= MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_body_bytes must be between 1 and {MAX_PAYLOAD_BYTES} (SageMaker's cap)")
        from serving.app import MAX_INPUT_TOKENS, MAX_NEW_TOKENS

        # The model servers refuse to start with a cap they cannot honour: say so here, once.
        for name, highest in (("max_new_tokens", MAX_NEW_TOKENS), ("max_input_tokens", MAX_INPUT_TOKENS)):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= highest:
                raise ValueError(f"{name} must be between 1 and {highest}, got {value}")

    @property
    def server_env(self) -> dict[str, str]:
        env = {}
        if self.max_new_tokens is not None:
            env["LLMOPS_MAX_NEW_TOKENS"] = str(self.max_new_tokens)
        if self.max_input_tokens is not None:
            env["LLMOPS_MAX_INPUT_TOKENS"] = str(self.max_input_tokens)
        return env


def _token_count(value) -> int | None:
    """``parameters.max_new_tokens`` as the model server reads it (pydantic's lax int: an int, an
    integral float or a string of one), so ``"5000"`` meets the cap as 5000 does; None where the
    model server would refuse the value itself."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:  # "5000.0"; a form the server refuses anyway ("5e3") may be counted too
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return None


def default_model_store() -> list[str]:
    """``LLMOPS_GATEWAY_MODEL_STORE`` (comma-separated roots), else the store of the local settings
    (``$LLMOPS_HOME/store``, ``LLMOPS_HOME`` defaulting to ``<repo>/.llmops``)."""
    configured = [r.strip() for r in os.environ.get("LLMOPS_GATEWAY_MODEL_STORE", "").split(",") if r.strip()]
    if configured:
        return configured
    return [str(Path(os.environ.get("LLMOPS_HOME") or PROJECT_ROOT / ".llmops") / "store")]


@dataclass
class Mirror:
    endpoint: Endpoint
    routing: Routing
    body: bytes
    headers: dict[str, str]
    source_event_id: str
    inference_id: str | None
    capture: bool
    client: str | None = None
    found_in: tuple = ()


class Gateway:
    def __init__(
        self,
        state_dir: Path,
        startup_timeout: float = 600,
        invoke_timeout: float = 60,
        shadow_workers: int = 1,
        shadow_queue: int = 1024,
        *,
        api_keys: ApiKeys | None = None,
        rate_limiter: RateLimiter | None = None,
        limits: Limits | None = None,
        guardrails_mode: str = "flag",
        store: ModelStore | None = None,
    ):
        self.state_dir = Path(state_dir)
        self.api_keys = api_keys if api_keys else None  # no keys: open
        self.rate_limiter = rate_limiter
        self.limits = limits or Limits()
        self.guardrails = guardrails.check_mode(guardrails_mode, "--guardrails")
        self.store = store or ModelStore(default_model_store())
        self.refusals = RefusalCounters()  # the gateway's: unauthenticated, throttled, too large
        self._last_warning: dict[str, float] = {}
        self.startup_timeout = startup_timeout
        self.invoke_timeout = invoke_timeout
        self.models: dict[str, ModelSpec] = {}
        self.configs: dict[str, EndpointConfigSpec] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.servers: dict[str, VariantServer] = {}
        self.writer = CaptureWriter()
        self._shadow_workers = shadow_workers
        self._shadow_queue_size = shadow_queue
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.client: httpx.AsyncClient | None = None
        self.upstream = Upstream(invoke_timeout)
        self.shadow_queue: asyncio.Queue[Mirror] | None = None

    # -- life cycle -------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "gateway.json"

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), timeout=self.invoke_timeout
        )
        await self.upstream.start()
        self.shadow_queue = asyncio.Queue(maxsize=self._shadow_queue_size)
        for _ in range(self._shadow_workers):
            self._spawn(self._shadow_worker())
        await self._restore()

    async def stop(self, drain_seconds: float = 10) -> None:
        """Finish mirrored requests (up to ``drain_seconds``), write every captured record, stop
        the model servers this gateway started."""
        if self.shadow_queue is not None:
            try:
                await asyncio.wait_for(self.shadow_queue.join(), drain_seconds)
            except TimeoutError:
                log.warning("%d shadow copies were not sent before shutdown", self.shadow_queue.qsize())
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.writer.close)
        await asyncio.gather(*(server.stop() for server in self.servers.values()))
        if self.client is not None:
            await self.client.aclose()
        await self.upstream.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _save(self) -> None:
        state = {
            "models": [m.model_dump() for m in self.models.values()],
            "endpoint_configs": [c.model_dump() for c in self.configs.values()],
            "endpoints": [
                {
                    "EndpointName": e.name,
                    "EndpointConfigName": e.routing.config.EndpointConfigName if e.routing else e.config_name,
                    "Weights": e.routing.weights if e.routing else None,
                    "PendingConfigName": e.pending_config,
                }
                for e in self.endpoints.values()
            ],
        }
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(json.dumps(state, indent=1))
        partial.replace(self.state_file)

    def _reap_orphans(self) -> None:
        """Model servers a previous gateway started and could not stop (it was killed): stop them."""
        for pid_file in (self.state_dir / "servers").glob("*.pid"):
            try:
                pid = int(pid_file.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                cmdline = b""
            if b"serving.app" in cmdline:
                log.warning("stopping model server pid %s left behind by a previous gateway", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            pid_file.unlink(missing_ok=True)

    async def _restore(self) -> None:
        self._reap_orphans()
        if not self.state_file.is_file():
            return
        state = json.loads(self.state_file.read_text())
        for data in state.get("models", []):
            model = ModelSpec.model_validate(data)
            self.models[model.ModelName] = model
        for data in state.get("endpoint_configs", []):
            config = EndpointConfigSpec.model_validate(data)
            self.configs[config.EndpointConfigName] = config
        for data in state.get("endpoints", []):
            endpoint = Endpoint(data["EndpointName"], data["EndpointConfigName"])
            self.endpoints[endpoint.name] = endpoint
            self._spawn(self._restore_endpoint(endpoint, data.get("Weights"), data.get("PendingConfigName")))

    async def _restore_endpoint(self, endpoint: Endpoint, weights: dict | None, pending: str | None) -> None:
        """Serve the endpoint's config again, then finish the update it was in (if any)."""
        await self._bring_up(endpoint, self.configs[endpoint.config_name], weights)
        if pending and pending in self.configs and endpoint.status == "InService":
            endpoint.status, endpoint.pending_config = "Updating", pending
            await self._bring_up(endpoint, self.configs[pending])

    # -- control ----------------------------------------------------------------------------------

    async def create_model(self, model: ModelSpec) -> dict:
        async with self._lock:
            existing = self.models.get(model.ModelName)
            if existing is not None and existing != model:
                raise ControlError(409, f"model {model.ModelName} exists with another definition")
            await asyncio.to_thread(self._check_source, model)
            self.models[model.ModelName] = model
            self._save()
        return {"ModelArn": arn("model", model.ModelName)}

    def _check_source(self, model: ModelSpec) -> None:
        """``ControlError`` 400 unless the model comes from the store (or a loopback server)."""
        container, name = model.PrimaryContainer, model.ModelName
        try:
            self.store.check_environment(name, container.Environment)
            if container.ContainerUrl:
                self.store.check_container_url(name, container.ContainerUrl)
                return
            source = container.ModelDataUrl
            path = self.store.check_model_data(name, source)
        except SourceRefused as exc:
            log.warning("refused CreateModel: %s", exc)
            raise ControlError(400, str(exc)) from None
        if path is not None and not path.exists():
            raise ControlError(400, f"model {name}: no model data at {source}")

    async def create_endpoint_config(self, config: EndpointConfigSpec) -> dict:
        async with self._lock:
            existing = self.configs.get(config.EndpointConfigName)
            if existing is not None and existing != config:
                raise ControlError(
                    409,
                    f"endpoint config {config.EndpointConfigName} exists with other content (configs are immutable)",
                )
            missing = sorted({v.ModelName for v in config.variants} - set(self.models))
            if missing:
                raise ControlError(400, f"unknown model(s): {', '.join(missing)}; create them first")
            if config.DataCaptureConfig is not None:
                try:
                    local_root(config.DataCaptureConfig.DestinationS3Uri)
                except ValueError as exc:
                    raise ControlError(400, str(exc)) from None
            self.configs[config.EndpointConfigName] = config
            self._save()
        return {"EndpointConfigArn": arn("endpoint-config", config.EndpointConfigName)}

    def _config(self, name: str) -> EndpointConfigSpec:
        if name not in self.configs:
            raise ControlError(404, f"endpoint config {name} does not exist")
        return self.configs[name]

    def endpoint(self, name: str) -> Endpoint:
        if name not in self.endpoints:
            raise ControlError(404, f"endpoint {name} does not exist")
        return self.endpoints[name]

    async def create_endpoint(self, spec: EndpointSpec) -> dict:
        async with self._lock:
            config = self._config(spec.EndpointConfigName)
            existing = self.endpoints.get(spec.EndpointName)
            if existing is not None:
                if existing.config_name == spec.EndpointConfigName and existing.status != "Failed":
                    return {"EndpointArn": arn("endpoint", spec.EndpointName)}
                raise ControlError(409, f"endpoint {spec.EndpointName} exists (status {existing.status})")
            endpoint = Endpoint(spec.EndpointName, spec.EndpointConfigName)
            self.endpoints[endpoint.name] = endpoint
            self._save()
            self._spawn(self._bring_up(endpoint, config))
        return {"EndpointArn": arn("endpoint", spec.EndpointName)}

    async def update_endpoint(self, name: str, spec: UpdateEndpointSpec) -> dict:
        async with self._lock:
            endpoint = self.endpoint(name)
            config = self._config(spec.EndpointConfigName)
            if endpoint.status != "InService":
                raise ControlError(400, f"endpoint {name} is {endpoint.status}; it can be updated when InService")
            endpoint.status, endpoint.failure_reason = "Updating", None
            endpoint.pending_config = config.EndpointConfigName
            self._save()
            self._spawn(self._bring_up(endpoint, config))
        return {"EndpointArn": arn("endpoint", name)}

    async def _bring_up(self, endpoint: Endpoint, config: EndpointConfigSpec, weights: dict | None = None) -> None:
        """Start the config's variant servers (reusing running ones), then switch traffic to them
        at once. A failure keeps the previous config serving (or fails a new endpoint)."""
        started: list[VariantServer] = []
        servers: dict[str, VariantServer] = {}
        try:
            for variant in config.variants:
                key = f"{endpoint.name}-{variant.VariantName}-{variant.ModelName}"
                server = self.servers.get(key)
                if server is None or server.model != self.models[variant.ModelName]:
                    server = VariantServer(
                        key,
                        self.models[variant.ModelName],
                        self.state_dir,
                        self.startup_timeout,
                        self.store,
                        self.limits.server_env,
                    )
                    started.append(server)
                    await server.start(self.client)
                servers[variant.VariantName] = server
        except asyncio.CancelledError:  # the gateway is stopping: no half-started server may outlive it
            await asyncio.shield(asyncio.gather(*(s.stop() for s in started)))
            raise
        except Exception as exc:  # any start failure becomes the endpoint's FailureReason
            await asyncio.gather(*(s.stop() for s in started))
            reason = str(exc) if isinstance(exc, ControlError) else f"{type(exc).__name__}: {exc}"
            async with self._lock:
                endpoint.failure_reason, endpoint.pending_config = reason, None
                endpoint.status = "InService" if endpoint.routing is not None else "Failed"
                self._save()
                endpoint.modified = datetime.now(UTC)
            log.error("endpoint %s: %s", endpoint.name, reason)
            return
        async with self._lock:
            if weights is None or set(weights) != {v.VariantName for v in config.ProductionVariants}:
                weights = {v.VariantName: v.InitialVariantWeight for v in config.ProductionVariants}
            endpoint.routing = make_routing(config, dict(weights), servers, self.guardrails)
            endpoint.config_name, endpoint.pending_config = config.EndpointConfigName, None
            endpoint.status, endpoint.modified = "InService", datetime.now(UTC)
            for server in started:
                self.servers[server.key] = server
            retired = self._release_unused()
        await asyncio.gather(*(s.retire(self.invoke_timeout) for s in retired))

    def _release_unused(self) -> list[VariantServer]:
        """Forget the servers no endpoint routes to (the caller stops them, outside the lock)."""
        used = {id(s) for e in self.endpoints.values() if e.routing is not None for s in e.routing.servers.values()}
        retired = [s for s in self.servers.values() if id(s) not in used]
        for server in retired:
            del self.servers[server.key]
        self._save()
        return retired

    async def update_weights(self, name: str, spec: UpdateWeightsSpec) -> dict:
        async with self._lock:
            endpoint = self.endpoint(name)
            if endpoint.status != "InService" or endpoint.routing is None:
                raise ControlError(400, f"endpoint {name} is {endpoint.status}; weights change when InService")
            routing = endpoint.routing
            unknown = sorted({w.VariantName for w in spec.DesiredWeightsAndCapacities} - set(routing.weights))
            if unknown:
                raise ControlError(
                    400,
                    f"not production variants of {name}: {', '.join(unknown)} (variants: {', '.join(routing.weights)})",
                )
            weights = {**routing.weights, **{w.VariantName: w.DesiredWeight for w in spec.DesiredWeightsAndCapacities}}
            if sum(weights.values()) <= 0:
                raise ControlError(400, "at least one production variant needs a weight above 0")
            endpoint.routing = make_routing(routing.config, weights, routing.servers, self.guardrails)
            endpoint.modified = datetime.now(UTC)
            self._save()
        return {"EndpointArn": arn("endpoint", name)}

    async def delete_endpoint(self, name: str) -> None:
        async with self._lock:
            endpoint = self.endpoints.pop(name, None)
            if endpoint is None:
                raise ControlError(404, f"endpoint {name} does not exist")
            endpoint.routing = None
            retired = self._release_unused()
        await asyncio.gather(*(s.retire(self.invoke_timeout) for s in retired))

    def describe(self, name: str) -> dict:
        endpoint = self.endpoint(name)
        routing = endpoint.routing

        def variants(specs, weights=None):
            return [
                {
                    "VariantName": v.VariantName,
                    "ModelName": v.ModelName,
                    "CurrentWeight": (weights or {}).get(v.VariantName, v.InitialVariantWeight),
                    "DesiredWeight": (weights or {}).get(v.VariantName, v.InitialVariantWeight),
                    "CurrentInstanceCount": 1,
                    "DesiredInstanceCount": 1,
                    "Url": routing.servers[v.VariantName].url,
                }
                for v in specs
            ]

        described = {
            "EndpointName": endpoint.name,
            "EndpointArn": arn("endpoint", endpoint.name),
            "EndpointConfigName": endpoint.config_name,
            "EndpointStatus": endpoint.status,
            "CreationTime": endpoint.created.isoformat(),
            "LastModifiedTime": endpoint.modified.isoformat(),
            "ProductionVariants": variants(routing.config.ProductionVariants, routing.weights) if routing else [],
            "ShadowProductionVariants": variants(routing.config.ShadowProductionVariants) if routing else [],
        }
        if endpoint.failure_reason:
            described["FailureReason"] = endpoint.failure_reason
        if endpoint.pending_config:
            described["PendingDeploymentSummary"] = {
                "EndpointConfigName": endpoint.pending_config,
                "StartTime": endpoint.modified.isoformat(),
            }
        capture = routing.config.DataCaptureConfig if routing else None
        if capture is not None:
            described["DataCaptureConfig"] = {
                "EnableCapture": capture.EnableCapture,
                "CaptureStatus": "Started" if capture.EnableCapture else "Stopped",
                "CurrentSamplingPercentage": capture.InitialSamplingPercentage,
                "DestinationS3Uri": capture.DestinationS3Uri,
            }
        return described

    def metrics(self, name: str, since: float | None = None) -> dict:
        endpoint = self.endpoint(name)
        return {
            "EndpointName": name,
            "Since": since,
            "Variants": {variant: m.summary(since) for variant, m in endpoint.metrics.items()},
            "ShadowVariants": {variant: m.summary(since) for variant, m in endpoint.shadow_metrics.items()},
            "ShadowPending": self.shadow_queue.qsize() if self.shadow_queue else 0,
            # Since the gateway started: requests throttled or over a token cap, guardrail findings.
            "Guardrails": endpoint.routing.guardrails if endpoint.routing else None,
            "Refused": endpoint.refusals.summary(),
            "Capture": {
                "Running": self.writer.alive,  # False: the writer stopped, and records are piling up
                "Written": self.writer.written,
                "Failed": self.writer.failed,
                "Pending": self.writer.pending(),
                "LastError": self.writer.last_error,
            },
        }

    def gateway_metrics(self) -> dict:
        """Refusals of the whole gateway since it started, and how it is guarded."""
        return {
            "Refused": self.refusals.summary(),
            "Endpoints": {name: e.refusals.summary() for name, e in sorted(self.endpoints.items())},
            "Authentication": {"Clients": self.api_keys.clients} if self.api_keys else "off",
            "RateLimit": (
                {"RequestsPerSecond": self.rate_limiter.rate, "Burst": self.rate_limiter.burst}
                if self.rate_limiter
                else "off"
            ),
            "Limits": {
                "MaxBodyBytes": self.limits.max_body_bytes,
                "MaxNewTokens": self.limits.max_new_tokens,
                "MaxInputTokens": self.limits.max_input_tokens,
            },
            "Guardrails": self.guardrails,
            "ModelStore": self.store.roots,
        }

    # -- runtime ----------------------------------------------------------------------------------

    def warn_now_and_then(self, key: str, message: str, *args, every: float = 10.0) -> None:
        """A warning at most every ``every`` seconds per ``key``: refusals can come by the thousand."""
        now = time.monotonic()
        if now - self._last_warning.get(key, -every) >= every:
            if len(self._last_warning) > 10_000:
                self._last_warning.clear()
            self._last_warning[key] = now
            log.warning(message, *args)

    def admit(self, client: str, endpoint_name: str) -> Response | None:
        """A 429 ``ThrottlingException`` when ``client`` is over its rate limit, else None."""
        if self.rate_limiter is None:
            return None
        wait = self.rate_limiter.acquire(client)
        if not wait:
            return None
        limiter = self.rate_limiter
        self.refusals.add("Throttled")
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is not None:
            endpoint.refusals.add("Throttled")
        self.warn_now_and_then(
            f"throttled {client}", "throttling %s: over %g requests/s (burst %g)", client, limiter.rate, limiter.burst
        )
        response = aws_error(
            429,
            "ThrottlingException",
            f"Rate exceeded: {client} may send {limiter.rate:g} requests a second (burst {limiter.burst:g});"
            f" retry in {wait:.2f}s",
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response

    def _over_token_cap(self, endpoint: Endpoint, parsed) -> Response | None:
        cap = self.limits.max_new_tokens
        if cap is None or not isinstance(parsed, dict):
            return None
        parameters = parsed.get("parameters")
        asked = _token_count(parameters.get("max_new_tokens")) if isinstance(parameters, dict) else None
        if asked is not None and asked > cap:
            self.refusals.add("TokenLimit")
            endpoint.refusals.add("TokenLimit")
            return aws_error(
                400,
                "ValidationError",
                f"parameters.max_new_tokens is {asked}; endpoint {endpoint.name} answers at most {cap} new tokens"
                " a request",
            )
        return None

    async def invoke(self, name: str, body: bytes, headers, client: str | None = None) -> Response:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            return aws_error(400, "ValidationError", f"Endpoint {name} of account 000000000000 not found.")
        routing = endpoint.routing
        if routing is None:
            return aws_error(400, "ValidationError", f"Endpoint {name} is {endpoint.status}, not in service.")
        try:
            variant = choose_variant(routing.weights, headers.get("x-amzn-sagemaker-target-variant"))
        except RoutingError as exc:
            return aws_error(400, "ValidationError", str(exc))
        forward = {h: headers[h] for h in FORWARDED_HEADERS if h in headers}
        mode = routing.guardrails
        parsed = guardrails.NOT_JSON
        if mode != "off" or self.limits.max_new_tokens is not None:
            parsed = guardrails.parse_json(body)
        refused = self._over_token_cap(endpoint, parsed)
        if refused is not None:
            return refused
        inference_id = headers.get("x-amzn-sagemaker-inference-id")
        moment = datetime.now(UTC)
        event_id = str(uuid.uuid4())
        found_in = await guardrails.scan_payload_async(body, parsed) if mode != "off" else ()
        if found_in:
            endpoint.refusals.add("InputFlagged")
            endpoint.refusals.findings("input", found_in)
            if mode == "block" and guardrails.blocking(found_in):
                return self._block_input(
                    endpoint, routing, variant, body, forward, found_in, moment, event_id, inference_id, client
                )

        server = routing.servers[variant]
        started = time.perf_counter()
        model_response, failure = None, None
        server.inflight += 1
        try:
            model_response = await self.upstream.post(f"{server.url}/invocations", body, forward)
        except UpstreamTimeout:
            failure = f"the model of variant {variant} did not answer within {self.invoke_timeout:.0f}s"
        except UpstreamUnreachable as exc:
            failure = f"the model server of variant {variant} is not reachable ({exc})"
        finally:
            server.inflight -= 1
        latency_ms = (time.perf_counter() - started) * 1000
        status = model_response.status_code if model_response is not None else 502
        answered = model_response is not None and status < 400
        media = model_response.headers.get("content-type", "application/json") if answered else None
        found_out = await guardrails.scan_payload_async(model_response.content) if answered and mode != "off" else ()
        withheld = mode == "block" and bool(guardrails.blocking(found_out))
        if found_out:
            endpoint.refusals.add("OutputFlagged")
            endpoint.refusals.findings("output", found_out)
        # A withheld answer is the variant's failure: a model that leaks is not serving well.
        endpoint.variant_metrics(variant).observe(latency_ms, 424 if withheld else status, moment.timestamp())

        if withheld:
            endpoint.refusals.add("OutputBlocked")
            rules = guardrails.describe(guardrails.blocking(found_out))
            self.warn_now_and_then(
                f"output {name} {variant}", "endpoint %s: withheld an answer of variant %s (%s)", name, variant, rules
            )
            response = aws_error(
                424,
                "ModelError",
                f"The answer of variant {variant} was withheld by the gateway's output guardrails: {rules}.",
                OriginalStatusCode=status,
                OriginalMessage=f"withheld: the answer matched {rules}",
                ErrorCode="OUTPUT_BLOCKED_BY_GUARDRAILS",
            )
            response.headers[VARIANT_HEADER] = variant
        elif answered:
            response = Response(
                model_response.content,
                status_code=200,
                media_type=media,
                headers={VARIANT_HEADER: variant},
            )
            if "x-amzn-sagemaker-custom-attributes" in model_response.headers:
                response.headers["X-Amzn-SageMaker-Custom-Attributes"] = model_response.headers[
                    "x-amzn-sagemaker-custom-attributes"
                ]
        else:
            original = model_response.text[:2000] if model_response is not None else failure
            kind = "client" if 400 <= status < 500 else "server"
            response = aws_error(
                424,
                "ModelError",
                f"Received {kind} error ({status}) from variant {variant} with message {original!r}.",
                OriginalStatusCode=status,
                OriginalMessage=original,
                ErrorCode=f"{kind.upper()}_ERROR_FROM_MODEL",
            )
            response.headers[VARIANT_HEADER] = variant

        # Withheld answers are always captured: a sampled-out one would leave no trace of a leak.
        sampled = routing.capture_root is not None and (withheld or random.random() < routing.sampling)
        if sampled:
            self._capture(
                routing,
                endpoint=endpoint.name,
                variant=variant,
                request=body,
                request_type=forward.get("content-type"),
                # The operator sees what was withheld; the caller never did.
                response=model_response.content if withheld else bytes(response.body),
                response_type=media if withheld else response.headers.get("content-type"),
                status_code=424 if withheld else status,
                latency_ms=latency_ms,
                inference_time=moment,
                event_id=event_id,
                inference_id=inference_id,
                client=client,
                guardrails=guardrail_record(mode, found_in, found_out, "output" if withheld else None),
            )
        if routing.shadow is not None and random.random() < routing.shadow_share:
            mirror = Mirror(endpoint, routing, body, forward, event_id, inference_id, sampled, client, found_in)
            try:
                self.shadow_queue.put_nowait(mirror)
            except asyncio.QueueFull:
                endpoint.variant_metrics(routing.shadow, shadow=True).dropped += 1
        response.headers[EVENT_ID_HEADER] = event_id
        return response

    def _block_input(
        self,
        endpoint: Endpoint,
        routing: Routing,
        variant: str,
        body: bytes,
        forward: dict[str, str],
        found: tuple,
        moment: datetime,
        event_id: str,
        inference_id: str | None,
        client: str | None,
    ) -> Response:
        """Refuse a request an input guardrail stopped; it is captured (always: an operator must see
        every block) under the variant it was routed to, and reaches no model."""
        rules = guardrails.describe(guardrails.blocking(found))
        endpoint.refusals.add("InputBlocked")
        self.warn_now_and_then(
            f"input {endpoint.name}", "endpoint %s: blocked a request from %s (%s)", endpoint.name, client or "?", rules
        )
        response = aws_error(
            400, "ValidationError", f"The request was blocked by the gateway's input guardrails: {rules}."
        )
        if routing.capture_root is not None:
            self._capture(
                routing,
                endpoint=endpoint.name,
                variant=variant,
                request=body,
                request_type=forward.get("content-type"),
                response=bytes(response.body),
                response_type=response.headers.get("content-type"),
                status_code=400,
                latency_ms=0.0,
                inference_time=moment,
                event_id=event_id,
                inference_id=inference_id,
                client=client,
                guardrails=guardrail_record(routing.guardrails, found, (), "input"),
            )
        response.headers[EVENT_ID_HEADER] = event_id
        return response

    def _capture(self, routing: Routing, *, request: bytes, response: bytes, **fields) -> None:
        """Queue one capture record (``fields``: ``serving.capture.capture_record``'s), keeping the
        sides the config's capture options ask for."""
        types = routing.config.DataCaptureConfig.CaptureContentTypeHeader
        record = capture_record(
            request=request if routing.capture_input else None,
            response=response if routing.capture_output else None,
            json_types=tuple(types.JsonContentTypes),
            csv_types=tuple(types.CsvContentTypes),
            **fields,
        )
        self.writer.submit(routing.capture_root, fields["endpoint"], fields["variant"], record)

    async def _shadow_worker(self) -> None:
        while True:
            mirror = await self.shadow_queue.get()
            try:
                await self._send_to_shadow(mirror)
            except Exception:  # nothing a shadow does may reach a caller or stop this worker
                log.exception("shadow copy of %s failed", mirror.source_event_id)
            finally:
                self.shadow_queue.task_done()

    async def _send_to_shadow(self, mirror: Mirror) -> None:
        routing, variant = mirror.routing, mirror.routing.shadow
        server = routing.servers[variant]
        moment = datetime.now(UTC)
        started = time.perf_counter()
        server.inflight += 1
        try:
            answer = await self.upstream.post(f"{server.url}/invocations", mirror.body, mirror.headers)
            status, content, media = answer.status_code, answer.content, answer.headers.get("content-type")
        except (UpstreamTimeout, UpstreamUnreachable) as exc:
            status, content, media = 502, f"unreachable: {type(exc).__name__} {exc}".encode(), "text/plain"
        finally:
            server.inflight -= 1
        latency_ms = (time.perf_counter() - started) * 1000
        mirror.endpoint.variant_metrics(variant, shadow=True).observe(latency_ms, status, moment.timestamp())
        # A shadow's answer reaches no caller: its findings are recorded, never blocked.
        found = await guardrails.scan_payload_async(content) if routing.guardrails != "off" and status < 400 else ()
        if found:
            mirror.endpoint.refusals.add("ShadowOutputFlagged")
            mirror.endpoint.refusals.findings("shadow-output", found)
        if mirror.capture:
            self._capture(
                routing,
                endpoint=mirror.endpoint.name,
                variant=variant,
                request=mirror.body,
                request_type=mirror.headers.get("content-type"),
                response=content,
                response_type=media or "application/octet-stream",
                status_code=status,
                latency_ms=latency_ms,
                inference_time=moment,
                inference_id=mirror.inference_id,
                shadow=True,
                source_event_id=mirror.source_event_id,
                client=mirror.client,
                guardrails=guardrail_record(routing.guardrails, mirror.found_in, found, None),
            )


def guardrail_record(mode: str, found_in: tuple, found_out: tuple, blocked: str | None) -> dict | None:
    """A capture record's ``guardrails`` field: None when nothing was found."""
    if not found_in and not found_out:
        return None
    record: dict = {"mode": mode}
    if found_in:
        record["input"] = [f.to_dict() for f in found_in]
    if found_out:
        record["output"] = [f.to_dict() for f in found_out]
    if blocked:
        record["blocked"] = blocked
    return record


def arn(kind: str, name: str) -> str:
    return f"arn:aws:sagemaker:local:000000000000:{kind}/{name.lower()}"


def _body(model: type[BaseModel], data: bytes):
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ControlError(400, f"invalid {model.__name__}: {problems}") from None


async def _drain(receive, limit: int = DRAIN_BYTES) -> int:
    """Read and drop a request's body (up to ``limit`` bytes): a client still sending when the
    answer comes can miss it (a reset connection instead of a 401 or 413)."""
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return size


class Authentication:
    """ASGI middleware: with API keys, every route but ``/ping`` needs one. The client's name goes
    into the scope (``CLIENT``) for rate limits and capture."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send):
        keys = self.gateway.api_keys
        if keys is None or scope["type"] != "http" or scope["path"] == "/ping":
            return await self.app(scope, receive, send)
        presented = presented_key(scope["headers"])
        client = keys.identify(presented)
        if client is not None:
            scope[CLIENT] = client
            return await self.app(scope, receive, send)
        self.gateway.refusals.add("Unauthenticated")
        address = (scope.get("client") or ("?",))[0]
        if presented is None:
            code, message = (
                "MissingAuthenticationTokenException",
                "This gateway needs an API key: send it in the x-api-key header or as Authorization: Bearer <key>.",
            )
        else:
            code, message = "UnrecognizedClientException", "The API key in the request is not valid."
        self.gateway.warn_now_and_then(
            f"unauthenticated {address}", "refused %s %s from %s: %s", scope["method"], scope["path"], address, code
        )
        await _drain(receive, self.gateway.limits.max_body_bytes)  # no more than a caller with a key may send
        response = aws_error(401, code, message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="llmops-gateway"'
        await response(scope, receive, send)


class ClientGone(Exception):
    """The caller closed the connection before its request's body was whole."""


async def read_body(request: Request, limit: int) -> tuple[bytes | None, int]:
    """The body, or None when it is over ``limit`` bytes (then read and dropped); and its size.
    ``ClientGone`` when the caller left halfway: a partial body must never reach a model."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _drain(request.receive)
        return None, int(declared)
    chunks, size, more = [], 0, True
    while more:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            if more:
                size += await _drain(request.receive)
            return None, size
        chunks.append(chunk)
    return b"".join(chunks), size


def create_app(gateway: Gateway) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        yield
        await gateway.stop()

    app = FastAPI(title="llmops endpoint gateway", lifespan=lifespan)
    app.state.gateway = gateway
    app.add_middleware(Authentication, gateway=gateway)

    @app.exception_handler(ControlError)
    async def control_error(request, exc: ControlError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/ping")
    async def ping():
        return {"status": "ok", "endpoints": {name: e.status for name, e in gateway.endpoints.items()}}

    @app.post("/endpoints/{name}/invocations")
    async def invocations(name: str, request: Request):
        client = request.scope.get(CLIENT)
        throttled = gateway.admit(client or f"address {request.client.host if request.client else '?'}", name)
        if throttled is not None:
            await _drain(request.receive)
            return throttled
        limit = gateway.limits.max_body_bytes
        try:
            body, size = await read_body(request, limit)
        except ClientGone:
            return Response(status_code=400)  # nobody is left to read it
        if body is None:
            gateway.refusals.add("PayloadTooLarge")
            return aws_error(413, "ValidationError", f"the payload is {size} bytes; at most {limit} are accepted")
        return await gateway.invoke(name, body, request.headers, client)

    @app.get("/control/metrics")
    async def gateway_metrics():
        return gateway.gateway_metrics()

    @app.post("/control/models")
    async def create_model(request: Request):
        return await gateway.create_model(_body(ModelSpec, await request.body()))

    @app.get("/control/models/{name}")
    async def describe_model(name: str):
        if name not in gateway.models:
            raise ControlError(404, f"model {name} does not exist")
        return gateway.models[name].model_dump()

    @app.post("/control/endpoint-configs")
    async def create_endpoint_config(request: Request):
        return await gateway.create_endpoint_config(_body(EndpointConfigSpec, await request.body()))

    @app.get("/control/endpoint-configs/{name}")
    async def describe_endpoint_config(name: str):
        return gateway._config(name).model_dump()

    @app.get("/control/endpoints")
    async def list_endpoints():
        return {"Endpoints": [gateway.describe(name) for name in sorted(gateway.endpoints)]}

    @app.post("/control/endpoints")
    async def create_endpoint(request: Request):
        return await gateway.create_endpoint(_body(EndpointSpec, await request.body()))

    @app.get("/control/endpoints/{name}")
    async def describe_endpoint(name: str):
        return gateway.describe(name)

    @app.put("/control/endpoints/{name}")
    async def update_endpoint(name: str, request: Request):
        return await gateway.update_endpoint(name, _body(UpdateEndpointSpec, await request.body()))

    @app.post("/control/endpoints/{name}/weights")
    async def update_weights(name: str, request: Request):
        return await gateway.update_weights(name, _body(UpdateWeightsSpec, await request.body()))

    @app.delete("/control/endpoints/{name}")
    async def delete_endpoint(name: str):
        await gateway.delete_endpoint(name)
        return {"EndpointName": name, "deleted": True}

    @app.get("/control/endpoints/{name}/metrics")
    async def metrics(name: str, since: float | None = None):
        return gateway.metrics(name, since)

    return app


def _optional_int(value: str) -> int | None:
    return int(value) if value not in ("", "0") else None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=env("LLMOPS_GATEWAY_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("LLMOPS_GATEWAY_PORT", "8090")))
    parser.add_argument("--state-dir", default=env("LLMOPS_GATEWAY_STATE", ".llmops/gateway"))
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds a model server may take to load")
    parser.add_argument("--invoke-timeout", type=float, default=60, help="seconds a model may take to answer")
    parser.add_argument(
        "--shadow-workers",
        type=int,
        default=1,
        help="shadow copies in flight at once; one by default, so the shadow's latency compares like for like with"
        " the champion's answers the rollout replays one at a time (under heavy load more copies are dropped and"
        " counted)",
    )
    access = parser.add_argument_group("access")
    access.add_argument(
        "--api-keys-file",
        default=env("LLMOPS_GATEWAY_API_KEYS_FILE"),
        help="'<client-name> <key>' (or '<client-name> sha256:<hex>') a line; LLMOPS_GATEWAY_API_KEY adds the"
        " client 'default'. Without keys the gateway serves anyone",
    )
    access.add_argument(
        "--require-auth",
        action="store_true",
        default=env("LLMOPS_GATEWAY_REQUIRE_AUTH", "") == "1",
        help="refuse to start without API keys (LLMOPS_GATEWAY_REQUIRE_AUTH=1)",
    )
    access.add_argument(
        "--rate-limit",
        type=float,
        default=float(env("LLMOPS_GATEWAY_RATE_LIMIT", "0")),
        help="invocations a second per client (API key, or address without keys); 0: no limit",
    )
    access.add_argument("--rate-burst", type=float, default=None, help="invocations at once (default: the rate, >= 1)")
    access.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(env("LLMOPS_GATEWAY_MAX_BODY_BYTES", str(MAX_PAYLOAD_BYTES))),
        help=f"largest request payload (at most SageMaker's {MAX_PAYLOAD_BYTES})",
    )
    access.add_argument(
        "--max-new-tokens",
        type=_optional_int,
        default=_optional_int(env("LLMOPS_GATEWAY_MAX_NEW_TOKENS", "")),
        help="most new tokens a request may ask for (also the cap of the model servers it starts)",
    )
    access.add_argument(
        "--max-input-tokens",
        type=_optional_int,
        default=_optional_int(env("LLMOPS_GATEWAY_MAX_INPUT_TOKENS", "")),
        help="longest prompt, in tokens, the model servers it starts accept",
    )
    access.add_argument(
        "--guardrails",
        choices=guardrails.MODES,
        default=env("LLMOPS_GATEWAY_GUARDRAILS", "flag"),
        help="what PII and prompt-injection findings do, unless an endpoint config's llmops:guardrails tag says",
    )
    access.add_argument(
        "--model-store",
        action="append",
        default=None,
        help="a root models may load from (folder, file:// or s3://bucket/prefix); repeat for more. Default:"
        " LLMOPS_GATEWAY_MODEL_STORE (comma-separated), else $LLMOPS_HOME/store",
    )
    access.add_argument(
        "--allow-remote-containers",
        action="store_true",
        default=env("LLMOPS_GATEWAY_ALLOW_REMOTE_CONTAINERS", "") == "1",
        help="accept a ContainerUrl on another host (default: loopback only)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = load_api_keys(args.api_keys_file)
        limits = Limits(args.max_body_bytes, args.max_new_tokens, args.max_input_tokens)
        limiter = RateLimiter(args.rate_limit, args.rate_burst) if args.rate_limit > 0 else None
        store = ModelStore(args.model_store or default_model_store(), args.allow_remote_containers)
    except (AccessConfigError, ValueError) as exc:
        parser.error(str(exc))
    if not keys:
        if args.require_auth:
            parser.error(
                "--require-auth: no API keys (give --api-keys-file, LLMOPS_GATEWAY_API_KEYS_FILE or"
                " LLMOPS_GATEWAY_API_KEY)"
            )
        log.warning(
            "NO AUTHENTICATION: anyone who reaches %s:%s can create models and call endpoints; give API keys with"
            " --api-keys-file or LLMOPS_GATEWAY_API_KEY (and --require-auth to make them mandatory)",
            args.host,
            args.port,
        )
    else:
        log.info("API keys of %d client(s): %s", len(keys), ", ".join(keys.clients))
    log.info("models load from: %s; guardrails: %s", ", ".join(store.roots), args.guardrails)
    gateway = Gateway(
        Path(args.state_dir),
        args.startup_timeout,
        args.invoke_timeout,
        args.shadow_workers,
        api_keys=keys,
        rate_limiter=limiter,
        limits=limits,
        guardrails_mode=args.guardrails,
        store=store,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(
        create_app(gateway),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
