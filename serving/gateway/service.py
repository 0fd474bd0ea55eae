"""``Gateway``: the control plane, admission and the request pipeline wired together over the same
endpoints, with their life cycle (start, restore, drain and stop) and the gateway's metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving import guardrails
from serving.access import ApiKeys, CaptureRoots, ModelStore, RateLimiter
from serving.capture import CaptureBudget
from serving.gateway.admission import Admission
from serving.gateway.control import ControlPlane
from serving.gateway.errors import OccasionalWarnings
from serving.gateway.pipeline import Pipeline
from serving.gateway.servers import default_capture_roots, default_model_store
from serving.gateway.state import Limits


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
        capture_roots: CaptureRoots | None = None,
        capture_budget: CaptureBudget | None = None,
    ):
        self.limits = limits or Limits()
        self.guardrails = guardrails.check_mode(guardrails_mode, "--guardrails")
        self.store = store or ModelStore(default_model_store())
        self.capture_roots = capture_roots or CaptureRoots(default_capture_roots())
        self._tasks: set[asyncio.Task] = set()
        warnings = OccasionalWarnings()
        self.control = ControlPlane(
            Path(state_dir),
            startup_timeout,
            invoke_timeout,
            self.store,
            self.limits,
            self.guardrails,
            self._spawn,
            self.capture_roots,
        )
        self.admission = Admission(api_keys, rate_limiter, self.limits, self.control.endpoints, warnings)
        self.pipeline = Pipeline(
            self.control.endpoints,
            self.limits,
            self.admission.refusals,
            warnings,
            invoke_timeout,
            self._spawn,
            shadow_workers,
            shadow_queue,
            capture_budget or CaptureBudget(),
        )

    async def start(self) -> None:
        self.control.open()
        await self.pipeline.start()
        await self.control.restore()

    async def stop(self, drain_seconds: float = 10) -> None:
        """Finish mirrored requests (up to ``drain_seconds``), write every captured record, stop
        the model servers this gateway started."""
        await self.pipeline.drain_shadow(drain_seconds)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.pipeline.writer.close)
        await self.control.stop_servers()
        await self.control.close()
        await self.pipeline.upstream.close()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def metrics(self, name: str, since: float | None = None) -> dict:
        return self.pipeline.metrics(self.control.endpoint(name), since)

    def gateway_metrics(self) -> dict:
        """Refusals of the whole gateway since it started, and how it is guarded."""
        admission = self.admission
        return {
            "Refused": admission.refusals.summary(),
            "Endpoints": {name: e.refusals.summary() for name, e in sorted(self.control.endpoints.items())},
            "Authentication": (
                {"Clients": admission.api_keys.clients, "Roles": admission.api_keys.roles}
                if admission.api_keys
                else "off"
            ),
            "RateLimit": (
                {"RequestsPerSecond": admission.rate_limiter.rate, "Burst": admission.rate_limiter.burst}
                if admission.rate_limiter
                else "off"
            ),
            "Limits": {
                "MaxBodyBytes": self.limits.max_body_bytes,
                "MaxNewTokens": self.limits.max_new_tokens,
                "MaxInputTokens": self.limits.max_input_tokens,
            },
            "Guardrails": self.guardrails,
            "ModelStore": self.store.roots,
            "CaptureRoots": self.capture_roots.roots,
        }
