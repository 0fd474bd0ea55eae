"""Serving backends: where a rollout's endpoint lives, behind one interface (``base``).

- ``gateway``: the local gateway (``serving.gateway``), the embedded default;
- ``sagemaker``: a SageMaker real-time endpoint (production and shadow variants, data capture to S3).

``backend_for(settings)`` picks the one ``serving.backend`` names.
"""

from __future__ import annotations

from llmops.backends.endpoints.credentials import gateway_api_key
from llmops.backends.endpoints.gateway import LocalGatewayBackend
from llmops.backends.endpoints.sagemaker import SageMakerEndpointBackend
from llmops.config import Settings


def backend_for(settings: Settings):
    """The endpoint backend of ``serving.backend``: the local gateway, or SageMaker."""
    if settings.serving.backend == "sagemaker":
        return SageMakerEndpointBackend(settings)

    serving = settings.serving
    return LocalGatewayBackend(
        serving.gateway_url,
        region=settings.aws.region,
        api_key=gateway_api_key(serving.gateway_conn_id),
        guardrails=serving.guardrails,
        conn_id=serving.gateway_conn_id,
    )
