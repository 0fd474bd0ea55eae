"""What the control plane and the request path share: an endpoint, the routing its requests
follow, the limits of a request; and ``gateway.json``, the file the control plane's state is
saved in (in ``--state-dir``) and restored from at start-up."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from serving.app import MAX_INPUT_TOKENS, MAX_NEW_TOKENS
from serving.capture import local_root
from serving.endpoints import EndpointConfigSpec, ModelSpec, shadow_share
from serving.gateway.servers import VariantServer
from serving.metrics import RefusalCounters, VariantMetrics

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker's real-time limit
STATE_FILE = "gateway.json"


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
    capture_redact: bool  # scrub personal data from what is captured (the config's llmops:capture-pii)
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
        capture_redact=config.capture_pii == "redact",
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


@dataclass
class SavedState:
    """``gateway.json`` as read back: the endpoints as saved (name, config, weights, pending config)."""

    models: list[ModelSpec] = field(default_factory=list)
    configs: list[EndpointConfigSpec] = field(default_factory=list)
    endpoints: list[dict] = field(default_factory=list)


def save_state(
    path: Path, models: dict[str, ModelSpec], configs: dict[str, EndpointConfigSpec], endpoints: dict[str, Endpoint]
) -> None:
    state = {
        "models": [m.model_dump() for m in models.values()],
        "endpoint_configs": [c.model_dump() for c in configs.values()],
        "endpoints": [
            {
                "EndpointName": e.name,
                "EndpointConfigName": e.routing.config.EndpointConfigName if e.routing else e.config_name,
                "Weights": e.routing.weights if e.routing else None,
                "PendingConfigName": e.pending_config,
            }
            for e in endpoints.values()
        ],
    }
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(state, indent=1))
    partial.replace(path)


def load_state(path: Path) -> SavedState:
    """What ``save_state`` wrote; nothing when there is no file yet."""
    if not path.is_file():
        return SavedState()
    state = json.loads(path.read_text())
    return SavedState(
        models=[ModelSpec.model_validate(data) for data in state.get("models", [])],
        configs=[EndpointConfigSpec.model_validate(data) for data in state.get("endpoint_configs", [])],
        endpoints=list(state.get("endpoints", [])),
    )
