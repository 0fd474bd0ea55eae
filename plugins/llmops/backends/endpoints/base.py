"""The endpoint contract both serving backends speak: SageMaker's vocabulary, names and waits.

A serving backend (``llmops.backends.endpoints.gateway.LocalGatewayBackend`` for the local
gateway, ``llmops.backends.endpoints.sagemaker.SageMakerEndpointBackend`` for a SageMaker
real-time endpoint) has the operations ``create_model``, ``describe_model``,
``create_endpoint_config``, ``create_endpoint``/``update_endpoint``/``delete_endpoint``,
``describe_endpoint``, ``update_endpoint_weights`` and ``variant_windows`` (per-variant metrics).
This module builds their requests and waits on their state; it knows neither backend.

Names: a model version ``N`` of registered model ``M`` becomes the SageMaker model ``<endpoint>-vN``
serving as variant ``vN``. Endpoint configs are immutable and named after the Airflow run and
phase, so a retried task reuses the config it created.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from llmops.config import Settings
from llmops.prompts import PromptCatalogError, load_registered

IN_SERVICE = "InService"


class DeploymentError(RuntimeError):
    """The endpoint could not be brought to the state asked for; the message says why."""


class DeploymentRejected(DeploymentError):
    """The endpoint's control plane refused the request (bad model data, unknown name, conflict):
    asking again cannot help."""


def variant_name(version: str | int) -> str:
    return f"v{version}"


def model_resource_name(endpoint: str, version: str | int) -> str:
    return f"{endpoint[:50]}-v{version}"


def config_name(endpoint: str, phase: str, run_key: str) -> str:
    digest = hashlib.sha256(f"{endpoint}/{phase}/{run_key}".encode()).hexdigest()[:10]
    return f"{endpoint[:40]}-{phase}-{digest}"


def model_request(
    endpoint: str, version: str | int, artifact_uri: str, environment: dict[str, str], base_model: str = ""
) -> dict:
    """A ``CreateModel`` body for one registered model version (its training artifact). The base
    model's name travels in the environment: the local gateway reads it from the adapter, a
    SageMaker backend mounts the staged copy of it."""
    environment = {**environment, "LLMOPS_BASE_MODEL_NAME": base_model} if base_model else dict(environment)
    return {
        "ModelName": model_resource_name(endpoint, version),
        "PrimaryContainer": {"ModelDataUrl": artifact_uri, "Environment": environment},
    }


def capture_config(settings: Settings) -> dict:
    return {
        "EnableCapture": True,
        "InitialSamplingPercentage": settings.serving.sampling_percentage,
        "DestinationS3Uri": settings.serving.capture_uri,
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
    }


def endpoint_config_request(
    name: str,
    endpoint: str,
    production: dict[str, float],
    shadow: str | None,
    capture: dict | None,
) -> dict:
    """A ``CreateEndpointConfig`` body: production variants ``{version: weight}``, at most one
    shadow version, data capture."""
    request = {
        "EndpointConfigName": name,
        "ProductionVariants": [
            {
                "VariantName": variant_name(version),
                "ModelName": model_resource_name(endpoint, version),
                "InitialVariantWeight": weight,
                "InitialInstanceCount": 1,
            }
            for version, weight in production.items()
        ],
    }
    if shadow is not None:
        request["ShadowProductionVariants"] = [
            {
                "VariantName": variant_name(shadow),
                "ModelName": model_resource_name(endpoint, shadow),
                "InitialVariantWeight": 1.0,
                "InitialInstanceCount": 1,
            }
        ]
    if capture is not None:
        request["DataCaptureConfig"] = capture
    return request


def wait_in_service(backend, endpoint: str, config: str, timeout: float, poll: float = 1.0) -> dict:
    """Wait until ``endpoint`` is InService on ``config``. An update that failed leaves the endpoint
    InService on its previous config, with a FailureReason: that is an error here, not a success."""
    deadline = time.monotonic() + timeout
    while True:
        described = backend.describe_endpoint(endpoint)
        if described is None:
            raise DeploymentError(f"endpoint {endpoint} does not exist")
        status = described["EndpointStatus"]
        if status == IN_SERVICE and described["EndpointConfigName"] == config:
            return described
        if status == "Failed" or status == IN_SERVICE:  # settled on another config: the update did not happen
            why = described.get("FailureReason") or "the update was not applied"
            raise DeploymentError(
                f"endpoint {endpoint} did not move to config {config}: {why} (it serves"
                f" {described['EndpointConfigName']}, status {status})"
            )
        if time.monotonic() > deadline:
            raise DeploymentError(f"endpoint {endpoint} still {status} after {timeout:.0f}s (waiting for {config})")
        time.sleep(poll)


def wait_settled(
    backend, endpoint: str, timeout: float, poll: float = 1.0, sleep: Callable[[float], None] = time.sleep
) -> dict | None:
    """The endpoint's description once no create, update or delete is in progress (None: no endpoint)."""
    deadline = time.monotonic() + timeout
    while True:
        described = backend.describe_endpoint(endpoint)
        if described is None or described["EndpointStatus"] not in ("Creating", "Updating", "Deleting"):
            return described
        if time.monotonic() > deadline:
            raise DeploymentError(f"endpoint {endpoint} still {described['EndpointStatus']} after {timeout:.0f}s")
        sleep(poll)


def apply_config(settings: Settings, backend, config_request: dict) -> dict:
    """Create the config (idempotent) and move the endpoint to it, creating the endpoint if needed
    (or re-creating one that failed); returns the endpoint's description once it serves it. A
    create or update already in progress (a retried task's) is waited out first."""
    endpoint = settings.serving.endpoint_name
    name = config_request["EndpointConfigName"]
    timeout = settings.serving.deploy_timeout_minutes * 60
    backend.create_endpoint_config(config_request)
    described = wait_settled(backend, endpoint, timeout)
    if described is not None and described["EndpointStatus"] == "Failed":
        backend.delete_endpoint(endpoint)
        described = None
    if described is None:
        backend.create_endpoint(endpoint, name)
    elif described["EndpointConfigName"] != name:
        backend.update_endpoint(endpoint, name)
    return wait_in_service(backend, endpoint, name, timeout)


def serve_alone(settings: Settings, backend, version: dict, phase: str, run_key: str) -> str:
    """Move the endpoint to a config where ``version`` takes all traffic; returns the config's name."""
    ensure_models(settings, backend, [version])
    name = config_name(settings.serving.endpoint_name, phase, run_key)
    request = endpoint_config_request(
        name, settings.serving.endpoint_name, {version["version"]: 1.0}, None, capture_config(settings)
    )
    apply_config(settings, backend, request)
    return name


def ensure_models(settings: Settings, backend, versions: list[dict]) -> None:
    """``CreateModel`` for each version ({"version", "artifact_uri"}) not defined yet."""
    environment = None
    for version in versions:
        name = model_resource_name(settings.serving.endpoint_name, version["version"])
        if backend.describe_model(name) is not None:
            continue  # defined at its first deploy; a model, like its environment, does not change
        environment = serving_environment(settings) if environment is None else environment
        backend.create_model(
            model_request(
                settings.serving.endpoint_name,
                version["version"],
                version["artifact_uri"],
                environment,
                version.get("base_model", ""),
            )
        )


def serving_environment(settings: Settings) -> dict[str, str]:
    """The model server's environment: request batching, and the prompt template's system message
    for plain-text inputs."""

    environment = {
        "LLMOPS_MAX_BATCH_SIZE": str(settings.serving.max_batch_size),
        "LLMOPS_BATCH_WAIT_MS": f"{settings.serving.batch_wait_ms:g}",
    }
    try:
        template = load_registered(settings.mlflow.tracking_uri, settings.data.template)
    except PromptCatalogError:
        return environment
    system, _ = template.render_instruction("-")
    return {**environment, "LLMOPS_SYSTEM_PROMPT": system} if system else environment
