"""The local gateway (``serving.gateway``) as a serving backend: its control API, with SageMaker's
operation names, and the SageMaker runtime client pointed at it, so replayed requests go through
``invoke_endpoint`` exactly as they would on AWS.
"""

from __future__ import annotations

from llmops.backends.endpoints.base import DeploymentError, DeploymentRejected
from llmops.contracts import VariantWindow
from serving.guardrails import TAG


class LocalGatewayBackend:
    """The local gateway's control API, with SageMaker's operation names. ``api_key`` (see
    ``llmops.backends.endpoints.credentials``) goes with every call, the control API's and the
    runtime client's, as ``x-api-key``; ``guardrails`` tags the endpoint configs it creates with
    that guardrail mode."""

    metrics_poll_seconds = 0.5  # its metrics are live

    def __init__(
        self,
        url: str,
        timeout: float = 30,
        region: str | None = None,
        api_key: str | None = None,
        guardrails: str | None = None,
        conn_id: str = "llmops_gateway",
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.region = region or "us-east-1"
        self._api_key = api_key or None
        self.guardrails = guardrails
        self.conn_id = conn_id

    def __repr__(self) -> str:  # never the key
        return f"LocalGatewayBackend({self.url!r}, api_key={'set' if self._api_key else 'none'})"

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self._api_key} if self._api_key else {}

    def _call(self, method: str, path: str, body: dict | None = None, missing_ok: bool = False):
        import httpx

        try:
            response = httpx.request(
                method, f"{self.url}{path}", json=body, headers=self._headers(), timeout=self.timeout
            )
        except httpx.HTTPError as exc:
            raise DeploymentError(
                f"the endpoint gateway at {self.url} is not reachable ({type(exc).__name__}: {exc});"
                " start it with `make up`"
            ) from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            try:
                answer = response.json()
                message = answer.get("error") or answer.get("message") or response.text
            except (ValueError, AttributeError):
                message = response.text
            if response.status_code == 401:
                raise DeploymentRejected(
                    f"{method} {path}: the gateway at {self.url} refused the API key ({message}); make the password"
                    f" of the Airflow connection {self.conn_id} (or LLMOPS_GATEWAY_API_KEY) a key it accepts"
                )
            kind = DeploymentRejected if 400 <= response.status_code < 500 else DeploymentError
            raise kind(f"{method} {path}: {message}")
        return response.json()

    def create_model(self, request: dict) -> dict:
        return self._call("POST", "/control/models", request)

    def describe_model(self, name: str) -> dict | None:
        return self._call("GET", f"/control/models/{name}", missing_ok=True)

    def create_endpoint_config(self, request: dict) -> dict:
        if self.guardrails:
            tags = [t for t in request.get("Tags", []) if t.get("Key") != TAG]
            request = {**request, "Tags": [*tags, {"Key": TAG, "Value": self.guardrails}]}
        return self._call("POST", "/control/endpoint-configs", request)

    def describe_endpoint(self, name: str) -> dict | None:
        return self._call("GET", f"/control/endpoints/{name}", missing_ok=True)

    def create_endpoint(self, name: str, config: str) -> dict:
        return self._call("POST", "/control/endpoints", {"EndpointName": name, "EndpointConfigName": config})

    def update_endpoint(self, name: str, config: str) -> dict:
        return self._call("PUT", f"/control/endpoints/{name}", {"EndpointConfigName": config})

    def delete_endpoint(self, name: str) -> None:
        self._call("DELETE", f"/control/endpoints/{name}", missing_ok=True)

    def update_endpoint_weights(self, name: str, weights: dict[str, float]) -> dict:
        body = {"DesiredWeightsAndCapacities": [{"VariantName": v, "DesiredWeight": w} for v, w in weights.items()]}
        return self._call("POST", f"/control/endpoints/{name}/weights", body)

    def variant_windows(self, name: str, since: float, shadow: bool = False) -> dict[str, VariantWindow]:
        """What each production (or shadow) variant did with the requests that started after ``since``."""
        metrics = self._call("GET", f"/control/endpoints/{name}/metrics?since={since}")
        windows = {}
        for variant, summary in metrics["ShadowVariants" if shadow else "Variants"].items():
            latency = summary["ModelLatency"]
            windows[variant] = VariantWindow(
                invocations=summary["Invocations"],
                errors=summary["Invocation4XXErrors"] + summary["Invocation5XXErrors"],
                p95_ms=latency.get("p95"),
                p99_ms=latency.get("p99"),
            )
        return windows

    def runtime(self):
        """A boto3 ``sagemaker-runtime`` client pointed at the gateway. The gateway checks no
        signature; it checks the API key, which a handler adds to every request (``x-api-key``:
        SigV4 takes the ``Authorization`` header)."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "sagemaker-runtime",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id="llmops-local",
            aws_secret_access_key="llmops-local",
            config=Config(retries={"max_attempts": 2, "mode": "standard"}, read_timeout=120),
        )
        if self._api_key:
            key = self._api_key

            def send_key(request, **_):
                request.headers["x-api-key"] = key

            client.meta.events.register("before-sign.sagemaker-runtime.*", send_key)
        return client
