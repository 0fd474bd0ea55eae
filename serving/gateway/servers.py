"""The model servers behind the variants: a ``serving.app`` process per variant, started, watched
and stopped by the gateway (or a server already running at a ``ContainerUrl``), and where their
models may come from."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from serving.access import ModelStore, SourceRefused
from serving.endpoints import ModelSpec
from serving.gateway.errors import ControlError

log = logging.getLogger("llmops.gateway")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def default_model_store() -> list[str]:
    """``LLMOPS_GATEWAY_MODEL_STORE`` (comma-separated roots), else the store of the local settings
    (``$LLMOPS_HOME/store``, ``LLMOPS_HOME`` defaulting to ``<repo>/.llmops``)."""
    configured = [r.strip() for r in os.environ.get("LLMOPS_GATEWAY_MODEL_STORE", "").split(",") if r.strip()]
    if configured:
        return configured
    return [str(Path(os.environ.get("LLMOPS_HOME") or PROJECT_ROOT / ".llmops") / "store")]


# What a model server inherits from the gateway's environment: the system's basics, the model
# libraries' own settings and the project's, and nothing else. An allowlist, so that cloud
# credentials (AWS_*), the gateway's keys and whatever else the operator's shell holds stay out.
INHERITED_NAMES = frozenset(
    ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONUNBUFFERED")
)
INHERITED_PREFIXES = (
    "LC_",
    "HF_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "TORCH_",
    "PYTORCH_",
    "CUDA_",
    "NVIDIA_",
    "NEURON_",
    "LLMOPS_",
)
WITHHELD_PREFIXES = ("LLMOPS_GATEWAY_",)  # the gateway's own settings and keys


def model_server_environment(
    parent: dict[str, str], model: dict[str, str], limits: dict[str, str], fixed: dict[str, str]
) -> dict[str, str]:
    """A model server's environment: the allowlisted part of the gateway's (``parent``), the model's
    own ``Environment``, the operator's caps over it, then what the gateway sets (``fixed``)."""
    inherited = {
        name: value
        for name, value in parent.items()
        if (name in INHERITED_NAMES or name.startswith(INHERITED_PREFIXES)) and not name.startswith(WITHHELD_PREFIXES)
    }
    environment = {**inherited, **model, **limits, **fixed}
    environment.pop("SAGEMAKER_BIND_TO_PORT", None)  # the server listens on the socket it is handed
    return environment


def default_capture_roots() -> list[str]:
    """``LLMOPS_GATEWAY_CAPTURE_ROOT`` (comma-separated folders), else ``$LLMOPS_HOME/capture``, where
    the local settings capture (``serving.capture_uri``)."""
    configured = [r.strip() for r in os.environ.get("LLMOPS_GATEWAY_CAPTURE_ROOT", "").split(",") if r.strip()]
    if configured:
        return configured
    return [str(Path(os.environ.get("LLMOPS_HOME") or PROJECT_ROOT / ".llmops") / "capture")]


def _bound_socket() -> socket.socket:
    """A loopback socket on a port the kernel picks, bound but not listening: the model server
    inherits it and listens once its model is loaded. A port merely found free and handed over by
    number can be taken by any other process (an outgoing connection, too) while the model loads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def reap_orphans(state_dir: Path) -> None:
    """Model servers a previous gateway started and could not stop (it was killed): stop them."""
    for pid_file in (state_dir / "servers").glob("*.pid"):
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
            self._launch(model_dir)
        await self._wait_healthy(client)

    def _launch(self, model_dir: Path) -> None:
        with _bound_socket() as sock:  # the server has its own copy once started
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            env = model_server_environment(
                dict(os.environ),
                self.model.PrimaryContainer.Environment,
                self.limits_env,  # the operator's caps win over a model's own
                {
                    "SM_MODEL_DIR": str(model_dir),
                    "LLMOPS_SERVING_FD": str(sock.fileno()),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
                },
            )
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
