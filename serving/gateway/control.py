"""The control plane, in the SageMaker API's vocabulary: models, endpoint configs (immutable) and
endpoints (create, update to another config, update weights, describe, delete). It checks what it
is given, starts the variants' model servers, switches an endpoint's traffic at once when they
answer, and saves its state after every change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path

import httpx

from serving.access import CaptureRoots, ModelStore, SourceRefused
from serving.endpoints import EndpointConfigSpec, EndpointSpec, ModelSpec, UpdateEndpointSpec, UpdateWeightsSpec
from serving.gateway.errors import ControlError
from serving.gateway.servers import VariantServer, reap_orphans
from serving.gateway.state import STATE_FILE, Endpoint, Limits, load_state, make_routing, save_state

log = logging.getLogger("llmops.gateway")

Spawn = Callable[[Coroutine], asyncio.Task]


def arn(kind: str, name: str) -> str:
    return f"arn:aws:sagemaker:local:000000000000:{kind}/{name.lower()}"


class ControlPlane:
    """The registry of models, endpoint configs and endpoints, and the model servers they run on.
    ``spawn`` runs the background work (an endpoint coming up) in the gateway's tasks."""

    def __init__(
        self,
        state_dir: Path,
        startup_timeout: float,
        invoke_timeout: float,
        store: ModelStore,
        limits: Limits,
        guardrails_mode: str,
        spawn: Spawn,
        capture_roots: CaptureRoots,
    ):
        self.state_dir = state_dir
        self.startup_timeout = startup_timeout
        self.invoke_timeout = invoke_timeout
        self.store = store
        self.capture_roots = capture_roots
        self.limits = limits
        self.guardrails = guardrails_mode
        self._spawn = spawn
        self.models: dict[str, ModelSpec] = {}
        self.configs: dict[str, EndpointConfigSpec] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.servers: dict[str, VariantServer] = {}
        self._lock = asyncio.Lock()
        self.client: httpx.AsyncClient | None = None  # the model servers' health checks

    # -- life cycle -------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def open(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64), timeout=self.invoke_timeout
        )

    async def restore(self) -> None:
        """Stop the model servers a killed gateway left behind, then bring the saved endpoints up
        again (in the background)."""
        reap_orphans(self.state_dir)
        state = load_state(self.state_file)
        for model in state.models:
            self.models[model.ModelName] = model
        for config in state.configs:
            self.configs[config.EndpointConfigName] = config
        for data in state.endpoints:
            endpoint = Endpoint(data["EndpointName"], data["EndpointConfigName"])
            self.endpoints[endpoint.name] = endpoint
            self._spawn(self._restore_endpoint(endpoint, data.get("Weights"), data.get("PendingConfigName")))

    async def _restore_endpoint(self, endpoint: Endpoint, weights: dict | None, pending: str | None) -> None:
        """Serve the endpoint's config again, then finish the update it was in (if any)."""
        await self._bring_up(endpoint, self.configs[endpoint.config_name], weights)
        if pending and pending in self.configs and endpoint.status == "InService":
            endpoint.status, endpoint.pending_config = "Updating", pending
            await self._bring_up(endpoint, self.configs[pending])

    async def stop_servers(self) -> None:
        """Stop the model servers this gateway started."""
        await asyncio.gather(*(server.stop() for server in self.servers.values()))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def _save(self) -> None:
        save_state(self.state_file, self.models, self.configs, self.endpoints)

    # -- models and endpoint configs --------------------------------------------------------------

    async def create_model(self, model: ModelSpec) -> dict:
        async with self._lock:
            existing = self.models.get(model.ModelName)
            if existing is not None and existing != model:
                raise ControlError(409, f"model {model.ModelName} exists with another definition")
            await asyncio.to_thread(self._check_source, model)
            self.models[model.ModelName] = model
            self._save()
        return {"ModelArn": arn("model", model.ModelName)}

    def model(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise ControlError(404, f"model {name} does not exist")
        return self.models[name]

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
                    self.capture_roots.check(config.EndpointConfigName, config.DataCaptureConfig.DestinationS3Uri)
                except SourceRefused as exc:
                    raise ControlError(400, str(exc)) from None
            self.configs[config.EndpointConfigName] = config
            self._save()
        return {"EndpointConfigArn": arn("endpoint-config", config.EndpointConfigName)}

    def config(self, name: str) -> EndpointConfigSpec:
        if name not in self.configs:
            raise ControlError(404, f"endpoint config {name} does not exist")
        return self.configs[name]

    # -- endpoints --------------------------------------------------------------------------------

    def endpoint(self, name: str) -> Endpoint:
        if name not in self.endpoints:
            raise ControlError(404, f"endpoint {name} does not exist")
        return self.endpoints[name]

    async def create_endpoint(self, spec: EndpointSpec) -> dict:
        async with self._lock:
            config = self.config(spec.EndpointConfigName)
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
            config = self.config(spec.EndpointConfigName)
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
            if config.DataCaptureConfig is not None:  # a config restored from state, checked again
                try:
                    self.capture_roots.check(config.EndpointConfigName, config.DataCaptureConfig.DestinationS3Uri)
                except SourceRefused as exc:
                    raise ControlError(400, str(exc)) from None
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
