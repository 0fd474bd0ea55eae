"""Deploying registered model versions to an endpoint, and what ``llm_rollout`` does at each step.

The endpoint is reached through a backend with SageMaker's vocabulary (``create_model``,
``create_endpoint_config``, ``create_endpoint``/``update_endpoint``,
``update_endpoint_weights``, ``describe_endpoint``, per-variant metrics); ``LocalGatewayBackend``
drives the local gateway (``serving.gateway``) over its control API. Requests are replayed
through the SageMaker runtime API with boto3 (``invoke_endpoint``), so the same code calls a
SageMaker endpoint. Decisions come from the pure functions of ``llmops.rollout``.

Names: a model version ``N`` of registered model ``M`` becomes the SageMaker model ``<endpoint>-vN``
serving as variant ``vN``. Endpoint configs are immutable and named after the Airflow run and
phase, so a retried task reuses the config it created.

Each phase keeps what it did in the run's partition of the store
(``runs/llm_rollout/<run>/phases/<task>.json``). Once a run has promoted or rolled back, a task of
it cleared and run again returns that and touches nothing: without it, clearing a finished run's
``deploy_shadow`` would put the endpoint back in shadow, and an old run's ``promote`` would move
``champion`` back to its version.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from llmops import storage
from llmops.config import Settings
from llmops.rollout import VariantWindow
from llmops.tracking import CHALLENGER, CHAMPION

IN_SERVICE = "InService"


class DeploymentError(RuntimeError):
    """The endpoint could not be brought to the state asked for; the message says why."""


class DeploymentRejected(DeploymentError):
    """The endpoint's control plane refused the request (bad model data, unknown name, conflict):
    asking again cannot help."""


# -- names and requests (pure) ------------------------------------------------------------------


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


# -- the local gateway backend ------------------------------------------------------------------


class LocalGatewayBackend:
    """The local gateway's control API, with SageMaker's operation names. ``api_key`` (see
    ``llmops.backends.gateway_credentials``) goes with every call, the control API's and the
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
            from serving.guardrails import TAG

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


def backend_for(settings: Settings):
    """The endpoint backend of ``serving.backend``: the local gateway, or SageMaker."""
    if settings.serving.backend == "sagemaker":
        from llmops.backends.sagemaker_endpoint import SageMakerEndpointBackend

        return SageMakerEndpointBackend(settings)
    from llmops.backends.gateway_credentials import gateway_api_key

    serving = settings.serving
    return LocalGatewayBackend(
        serving.gateway_url,
        region=settings.aws.region,
        api_key=gateway_api_key(serving.gateway_conn_id),
        guardrails=serving.guardrails,
        conn_id=serving.gateway_conn_id,
    )


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
    from llmops.prompts import PromptCatalogError, load_registered

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


# -- what to roll out ---------------------------------------------------------------------------


def _version_info(version) -> dict:
    artifact = version.tags.get("training.artifact_uri")
    if not artifact:
        raise DeploymentError(f"model version {version.version} has no training.artifact_uri tag: it cannot be served")
    return {
        "version": str(version.version),
        "artifact_uri": artifact,
        "run_id": version.run_id,
        "base_model": version.tags.get("base_model", ""),
    }


def plan_rollout(
    settings: Settings, requested_version: str | None, run_key: str | None = None, log: Callable[[str], None] = print
) -> dict:
    """What this rollout does: ``first_deploy`` (no champion yet), ``rollout`` (shadow, A/B,
    promote or roll back) or ``nothing`` (with the reason). With the run's key, a finished
    rollout's plan is the one it made (see ``finished_phase``)."""
    if run_key is not None and (done := finished_phase(settings, run_key, "plan_rollout", log)) is not None:
        return done
    plan = _plan(settings, requested_version)
    return record_phase(settings, run_key, "plan_rollout", plan) if run_key is not None else plan


def _plan(settings: Settings, requested_version: str | None) -> dict:
    from mlflow.exceptions import MlflowException

    from llmops.tracking import client

    mlflow_client = client(settings.mlflow.tracking_uri)
    name = settings.finetune.model_name

    def by_alias(alias: str):
        try:
            return mlflow_client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    champion = by_alias(CHAMPION)
    if requested_version:
        try:
            candidate = mlflow_client.get_model_version(name, str(requested_version))
        except MlflowException:
            raise DeploymentRejected(f"{name} has no version {requested_version}") from None
    else:
        candidate = by_alias(CHALLENGER)
    plan = {
        "model_name": name,
        "endpoint": settings.serving.endpoint_name,
        "champion": _version_info(champion) if champion is not None else None,
        "candidate": None,
    }
    if candidate is None:
        return {**plan, "action": "nothing", "reason": f"{name} has no {CHALLENGER} and no version was asked for"}
    plan["candidate"] = _version_info(candidate)
    if champion is not None and str(champion.version) == str(candidate.version):
        return {**plan, "action": "nothing", "reason": f"version {candidate.version} already is the {CHAMPION}"}
    if champion is None:
        return {
            **plan,
            "action": "first_deploy",
            "reason": f"no {CHAMPION} yet: version {candidate.version} becomes it",
        }
    return {
        **plan,
        "action": "rollout",
        "reason": f"version {candidate.version} challenges {CHAMPION} version {champion.version}",
    }


# -- replayed traffic ---------------------------------------------------------------------------


def catalog_items(settings: Settings) -> list[dict]:
    """The evaluation catalog's items as chat requests (system and user turn, with references)."""
    from llmops.prompts import load_eval_catalog, load_registered

    catalog = load_eval_catalog()
    template = load_registered(settings.mlflow.tracking_uri, catalog.template)
    items = []
    for item in catalog.items:
        system, prompt = template.render_instruction(item.instruction, item.context)
        items.append(
            {
                "id": f"catalog:{item.id}",
                "system": system,
                "prompt": prompt,
                "reference": item.reference,
                "kind": item.kind,
            }
        )
    return items


def request_prompt(payload) -> tuple[str, str]:
    """(system, user prompt) of an invocation body: plain text, or the last user turn of a chat."""
    if not isinstance(payload, dict):
        return "", ""
    inputs = payload.get("inputs")
    if isinstance(inputs, str):
        return "", inputs
    if isinstance(inputs, list):
        system = next((m.get("content", "") for m in inputs if isinstance(m, dict) and m.get("role") == "system"), "")
        users = [m.get("content", "") for m in inputs if isinstance(m, dict) and m.get("role") == "user"]
        return system, users[-1] if users else ""
    return "", ""


def replay_items(settings: Settings, count: int, lookback_hours: float, now: datetime | None = None) -> list[dict]:
    """Up to ``count`` distinct prompts to replay (``replay`` cycles through them): prompts captured
    on the endpoint's production variants in the last ``lookback_hours`` (newest first), topped up
    from the evaluation catalog."""
    from serving.capture import read_capture

    now = now or datetime.now(UTC)
    start = datetime.fromtimestamp(now.timestamp() - lookback_hours * 3600, UTC)
    scan = read_capture(settings.serving.capture_uri, settings.serving.endpoint_name, start=start, end=now)
    items, seen = [], set()
    for record in reversed(scan.records):
        if record.shadow or not (record.status_code is None or 200 <= record.status_code < 300):
            continue
        system, prompt = request_prompt(record.request_json())
        if prompt and prompt not in seen:
            seen.add(prompt)
            items.append(
                {
                    "id": f"captured:{record.event_id}",
                    "system": system,
                    "prompt": prompt,
                    "reference": "",
                    "kind": "open",
                }
            )
        if len(items) >= count:
            return items
    catalog = [i for i in catalog_items(settings) if i["prompt"] not in seen]
    return items + catalog[: count - len(items)]


def invocation_body(item: dict, max_new_tokens: int) -> bytes:
    messages = ([{"role": "system", "content": item["system"]}] if item.get("system") else []) + [
        {"role": "user", "content": item["prompt"]}
    ]
    return json.dumps(
        {"inputs": messages, "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}
    ).encode()


def replay(
    settings: Settings,
    backend,
    items: list[dict],
    minimum: int,
    maximum: int | None = None,
    until: Callable[[list[dict]], bool] | None = None,
    tag: str = "replay",
) -> list[dict]:
    """Send ``items`` (cycled) through the endpoint with ``invoke_endpoint``, routed by weight: at
    least ``minimum`` requests, then on until ``until(results)`` holds or ``maximum`` is reached.
    Returns one result per request: item, invoked variant, status."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not items or minimum <= 0:
        return []
    runtime = backend.runtime()
    endpoint = settings.serving.endpoint_name
    maximum = max(minimum, maximum or minimum)

    def send(index: int) -> dict:
        item = items[index % len(items)]
        try:
            response = runtime.invoke_endpoint(
                EndpointName=endpoint,
                Body=invocation_body(item, settings.serving.replay_max_new_tokens),
                ContentType="application/json",
                Accept="application/json",
                InferenceId=f"{tag}-{index}"[:64],
            )
            response["Body"].read()
            return {"item": item["id"], "variant": response.get("InvokedProductionVariant"), "status": 200}
        except ClientError as exc:
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            return {
                "item": item["id"],
                "variant": headers.get("x-amzn-invoked-production-variant"),
                "status": exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500),
                "error": str(exc)[:300],
            }
        except BotoCoreError as exc:
            return {"item": item["id"], "variant": None, "status": 503, "error": str(exc)[:300]}

    results: list[dict] = []
    batch = settings.serving.replay_concurrency
    with ThreadPoolExecutor(max_workers=batch) as pool:
        while len(results) < maximum:
            if len(results) >= minimum and (until is None or until(results)):
                break
            size = min(batch, maximum - len(results))
            results += list(pool.map(send, range(len(results), len(results) + size)))
    return results


def wait_for_shadow(backend, endpoint: str, shadow_variant: str, expected: int, since: float, timeout: float) -> int:
    """Wait until the shadow answered ``expected`` mirrored requests since ``since`` (its copies are
    sent after the callers have their answers); returns how many it answered."""
    deadline = time.monotonic() + timeout
    while True:
        window = backend.variant_windows(endpoint, since, shadow=True).get(shadow_variant)
        answered = window.invocations if window else 0
        if answered >= expected or time.monotonic() > deadline:
            return answered
        time.sleep(backend.metrics_poll_seconds)


def wait_for_capture(event_count: Callable[[], int], expected: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while event_count() < expected and time.monotonic() < deadline:
        time.sleep(0.25)


# -- judging captured answers -------------------------------------------------------------------


def captured_rows(records, references: dict[str, dict]) -> list[dict]:
    """Judge-ready rows of captured answers: the prompt, the answer, the reference when the prompt
    is one of ``references`` (replayed catalog items), and the signals the local judge reads."""
    rows = []
    for record in records:
        _, prompt = request_prompt(record.request_json())
        answered = record.status_code is None or 200 <= record.status_code < 300
        answer = record.response_json() if answered else None
        response = answer.get("generated_text", "") if isinstance(answer, dict) else ""
        item = references.get(prompt, {})
        rows.append(
            {
                "item_id": record.event_id,
                "model": record.variant,
                "prompt": prompt,
                "response": response,
                "reference": item.get("reference", ""),
                "kind": item.get("kind", "open"),
                "truncated": isinstance(answer, dict) and answer.get("finish_reason") == "length",
                "failed": answer is None,
            }
        )
    return rows


def score_rows(settings: Settings, rows: list[dict]) -> list[float | None]:
    """The judge's overall score (1-10) of each row; an answer that failed scores None."""
    from llmops.evaluation import make_judge
    from llmops.judges import JudgeError
    from llmops.monitoring import make_sentence_encoder
    from llmops.prompts import load_registered
    from training.metrics import chrf, exact_match, is_refusal, repetition_rate

    if not rows:
        return []
    embedder = make_sentence_encoder(settings)  # NumPy where the worker has no torch (MWAA)
    responses = [r["response"] for r in rows]
    with_reference = [i for i, r in enumerate(rows) if r["reference"]]
    to_reference = embedder.similarity(
        [responses[i] for i in with_reference], [rows[i]["reference"] for i in with_reference]
    )
    to_question = embedder.similarity(responses, [r["prompt"] for r in rows])
    similarity = dict(zip(with_reference, to_reference, strict=True))
    judge = make_judge(settings)
    rubric = load_registered(settings.mlflow.tracking_uri, "judge_rubric")
    scores: list[float | None] = []
    for index, row in enumerate(rows):
        if row["failed"]:
            scores.append(None)
            continue
        signals = {
            **row,
            "question_similarity": to_question[index],
            "repetition": repetition_rate(row["response"]),
            "refusal": 1.0 if is_refusal(row["response"]) else 0.0,
        }
        if row["reference"]:
            signals["semantic_similarity"] = similarity[index]
            signals["chrf"] = chrf(row["response"], row["reference"])
            if row["kind"] == "short_answer":
                signals["exact_match"] = exact_match(row["response"], row["reference"])
        try:
            scores.append(judge.judge(signals, rubric).overall)
        except JudgeError:
            scores.append(None)
    return scores


def shadow_pairs(records) -> list[tuple]:
    """(shadow record, production record) of every mirrored request whose both sides were captured:
    by the production event a shadow record names (this gateway), else by their shared
    ``inferenceId`` (SageMaker's capture; the replay gives every request its own)."""
    production = [r for r in records if not r.shadow]
    by_event = {r.event_id: r for r in production}
    by_inference = {r.inference_id: r for r in production if r.inference_id}
    pairs = []
    for record in records:
        if not record.shadow:
            continue
        source = by_event.get(record.source_event_id) if record.source_event_id else None
        if source is None and record.inference_id:
            source = by_inference.get(record.inference_id)
        if source is not None:
            pairs.append((record, source))
    return pairs


def mean(values) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


# -- the rollout's steps (one per llm_rollout task) ---------------------------------------------


# The phases that end a rollout with a verdict. A rollout that failed outright (restored by
# ``restore_on_failure``) has not ended: clearing its tasks rolls it out again.
CONCLUSIONS = ("promote", "roll_back")


def _phase_uri(settings: Settings, run_key: str, phase: str) -> str:
    from llmops.data.stages import run_folder

    dag_id, _, run_id = run_key.partition("/")
    return storage.join(run_folder(settings, run_id, dag_id), "phases", f"{phase}.json")


def record_phase(settings: Settings, run_key: str, phase: str, result: dict) -> dict:
    """Keep what a phase of this rollout run did, in the run's partition of the store; returns it."""
    storage.write_json(_phase_uri(settings, run_key, phase), result)
    return result


def finished_phase(settings: Settings, run_key: str, phase: str, log: Callable[[str], None] = print) -> dict | None:
    """What ``phase`` of this rollout run did, once the run has promoted or rolled back: a task of a
    finished rollout, cleared and run again (even after later rollouts moved the endpoint on),
    returns it and touches nothing; rolling out again is a new run. None while the rollout is under
    way (or failed outright): the phase is done again, idempotently (configs named by the run,
    waits for updates in progress)."""
    if not any(storage.exists(_phase_uri(settings, run_key, p)) for p in CONCLUSIONS):
        return None
    uri = _phase_uri(settings, run_key, phase)
    if not storage.exists(uri):
        return None
    log(f"{phase}: this rollout has ended; keeping what the phase did then ({uri})")
    return storage.read_json(uri)


def _tag_version(settings: Settings, version: str, tags: dict[str, object]) -> None:
    from llmops.tracking import client

    mlflow_client = client(settings.mlflow.tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(settings.finetune.model_name, str(version), key, str(value)[:5000])


def _drop_challenger_alias(settings: Settings, version: str) -> None:
    from mlflow.exceptions import MlflowException

    from llmops.tracking import client

    mlflow_client = client(settings.mlflow.tracking_uri)
    try:
        current = mlflow_client.get_model_version_by_alias(settings.finetune.model_name, CHALLENGER)
    except MlflowException:
        return
    if str(current.version) == str(version):
        mlflow_client.delete_registered_model_alias(settings.finetune.model_name, CHALLENGER)


def _soon() -> datetime:
    """An end for reads of capture up to now (bounds the hour folders a read lists)."""
    return datetime.fromtimestamp(time.time() + 60, UTC)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def deploy_first(settings: Settings, plan: dict, run_key: str, log: Callable[[str], None] = print) -> dict:
    """No champion yet: serve the candidate alone, and check it answers (a few catalog prompts)."""
    if (done := finished_phase(settings, run_key, "deploy_champion", log)) is not None:
        return done
    backend = backend_for(settings)
    candidate = plan["candidate"]
    name = serve_alone(settings, backend, candidate, "initial", run_key)
    log(f"endpoint {plan['endpoint']} serves version {candidate['version']} ({name})")
    smoke = replay(settings, backend, catalog_items(settings)[:3], 3, tag=f"smoke-{run_key[-20:]}")
    failed = [r for r in smoke if r["status"] != 200]
    if failed:
        raise DeploymentError(
            f"the smoke test failed on {len(failed)} of {len(smoke)} requests: {failed[0].get('error')}"
        )
    result = {"config": name, "variant": variant_name(candidate["version"]), "smoke_requests": len(smoke)}
    return record_phase(settings, run_key, "deploy_champion", result)


def deploy_shadow(settings: Settings, plan: dict, run_key: str, log: Callable[[str], None] = print) -> dict:
    """The champion serves all traffic; the candidate receives a mirrored copy as the shadow."""
    if (done := finished_phase(settings, run_key, "deploy_shadow", log)) is not None:
        return done
    backend = backend_for(settings)
    champion, candidate = plan["champion"], plan["candidate"]
    ensure_models(settings, backend, [champion, candidate])
    name = config_name(plan["endpoint"], "shadow", run_key)
    described = apply_config(
        settings,
        backend,
        endpoint_config_request(
            name, plan["endpoint"], {champion["version"]: 1.0}, candidate["version"], capture_config(settings)
        ),
    )
    _tag_version(
        settings,
        candidate["version"],
        {"rollout.status": "shadow", "rollout.endpoint": plan["endpoint"], "rollout.started": _now()},
    )
    log(
        f"endpoint {plan['endpoint']}: champion {variant_name(champion['version'])} serves, "
        f"{variant_name(candidate['version'])} shadows it ({name})"
    )
    return record_phase(settings, run_key, "deploy_shadow", {"config": name, "status": described["EndpointStatus"]})


def evaluate_shadow(settings: Settings, plan: dict, policy, run_key: str, log: Callable[[str], None] = print) -> dict:
    """Replay a traffic sample through the endpoint, then compare the shadow's answers with the
    champion's on the same requests, and decide (``llmops.rollout.decide_shadow``)."""
    from llmops.rollout import compare_shadow, decide_shadow
    from serving.capture import read_capture

    if (done := finished_phase(settings, run_key, "compare_shadow", log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint = plan["endpoint"]
    mine, theirs = variant_name(plan["candidate"]["version"]), variant_name(plan["champion"]["version"])
    items = replay_items(settings, max(policy.replay_requests, 1), policy.lookback_hours)
    sampled = settings.serving.sampling_percentage / 100
    if sampled <= 0:
        raise DeploymentRejected("data capture is off (sampling_percentage 0): shadow answers cannot be compared")
    since = time.time()
    started = datetime.fromtimestamp(since - 0.001, UTC)  # inferenceTime is cut to the millisecond
    # Enough requests that, at the capture's sampling rate, about replay_requests pairs are captured.
    requests = math.ceil(policy.replay_requests / sampled)
    results = replay(settings, backend, items, requests, tag=f"shadow-{run_key[-20:]}")
    log(f"replayed {len(results)} requests ({sum(r['status'] == 200 for r in results)} answered)")
    # Only answered requests were mirrored: one that never reached the endpoint has no shadow copy.
    answered = wait_for_shadow(
        backend,
        endpoint,
        mine,
        sum(r["status"] == 200 for r in results),
        since,
        settings.serving.deploy_timeout_minutes * 60,
    )
    log(f"the shadow answered {answered} mirrored copies")
    expected = math.floor(answered * settings.serving.sampling_percentage / 100)

    def scan():
        return read_capture(settings.serving.capture_uri, endpoint, [mine, theirs], start=started, end=_soon())

    wait_for_capture(lambda: len(shadow_pairs(scan().records)), expected)
    pairs = shadow_pairs(scan().records)
    references = {i["prompt"]: i for i in items}
    rows = captured_rows([r for pair in pairs for r in pair], references)
    scores = score_rows(settings, rows)
    windows = backend.variant_windows(endpoint, since)
    comparison = compare_shadow(
        [(scores[2 * i], scores[2 * i + 1]) for i in range(len(pairs))],
        backend.variant_windows(endpoint, since, shadow=True).get(mine, VariantWindow(0, 0)),
        windows.get(theirs, VariantWindow(0, 0)),
    )
    decision = decide_shadow(comparison, policy)
    _tag_version(
        settings,
        plan["candidate"]["version"],
        {
            "rollout.shadow.decision": decision.verdict,
            "rollout.shadow.pairs": comparison.pairs,
            "rollout.shadow.win_rate": f"{comparison.win_rate:.3f}" if comparison.win_rate is not None else "none",
            "rollout.shadow.reasons": "; ".join(decision.reasons),
        },
    )
    result = {
        "comparison": comparison.to_dict(),
        "decision": decision.to_dict(),
        "replayed": len(results),
        "items": items,
    }
    return record_phase(settings, run_key, "compare_shadow", result)


def traffic_step(
    settings: Settings, plan: dict, policy, run_key: str, share: float, shadow: dict, log: Callable[[str], None] = print
) -> dict:
    """Move ``share`` of traffic to the candidate, let the step run (replayed and live traffic),
    then check the guardrails on what the candidate did in the step."""
    from llmops.rollout import check_guardrails, step_label, step_request_budget, step_weights
    from serving.capture import read_capture

    label = step_label(share)
    phase = f"shift_traffic_{label}"
    if (done := finished_phase(settings, run_key, phase, log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint = plan["endpoint"]
    champion, candidate = plan["champion"]["version"], plan["candidate"]["version"]
    mine, theirs = variant_name(candidate), variant_name(champion)
    described = backend.describe_endpoint(endpoint)
    production = {v["VariantName"] for v in (described or {}).get("ProductionVariants", [])}
    if mine not in production:
        name = config_name(endpoint, "ab", run_key)
        request = endpoint_config_request(
            name, endpoint, {champion: round(1 - share, 6), candidate: share}, None, capture_config(settings)
        )
        described = apply_config(settings, backend, request)
    weights = step_weights(share, theirs, mine)
    backend.update_endpoint_weights(endpoint, weights)
    described = backend.describe_endpoint(endpoint)
    applied = {v["VariantName"]: v["CurrentWeight"] for v in described["ProductionVariants"]}
    if any(abs(applied.get(v, -1) - w) > 1e-6 for v, w in weights.items()):
        raise DeploymentError(f"endpoint {endpoint} did not take the weights {weights}: it has {applied}")
    _tag_version(settings, candidate, {"rollout.status": f"ab:{label}", "serving.weight": share})
    log(f"step {label}: weights {weights}")

    since = time.time()
    started = datetime.fromtimestamp(since - 0.001, UTC)
    least, most = step_request_budget(share, policy, settings.serving.sampling_percentage)
    rails = policy.guardrails
    results = replay(
        settings,
        backend,
        shadow["items"],
        least,
        most,
        until=lambda done: sum(r["variant"] == mine for r in done) >= rails.min_invocations,
        tag=f"{label}-{run_key[-20:]}",
    )
    if policy.bake_seconds:
        time.sleep(policy.bake_seconds)
    served = sum(r["variant"] == mine for r in results)
    log(f"step {label}: replayed {len(results)} requests, {served} served by {mine}")
    window = backend.variant_windows(endpoint, since).get(mine, VariantWindow(0, 0))
    expected = math.floor(window.invocations * settings.serving.sampling_percentage / 100)

    def records():
        scan = read_capture(settings.serving.capture_uri, endpoint, [mine], start=started, end=_soon())
        return [r for r in scan.records if not r.shadow]

    wait_for_capture(lambda: len(records()), expected)
    references = {i["prompt"]: i for i in shadow["items"]}
    scores = score_rows(settings, captured_rows(records(), references))
    judged = mean(scores)
    scored = sum(s is not None for s in scores)
    decision = check_guardrails(
        label, window, judged, shadow["comparison"]["champion_judge_mean"], policy, judged_answers=scored
    )
    result = {
        "label": label,
        "share": share,
        "weights": weights,
        "window": window.__dict__,
        "judge_mean": judged,
        "judged_answers": scored,
        "replayed": len(results),
        "decision": decision.to_dict(),
    }
    return record_phase(settings, run_key, phase, result)


def promote(settings: Settings, plan: dict, run_key: str, log: Callable[[str], None] = print) -> dict:
    """The candidate takes all traffic on its own config (the old variant retires), the
    ``champion`` alias moves to it, and both versions record where they serve."""
    from llmops.tracking import client

    if (done := finished_phase(settings, run_key, "promote", log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint, candidate, previous = plan["endpoint"], plan["candidate"], plan["champion"]
    name = serve_alone(settings, backend, candidate, "final", run_key)
    client(settings.mlflow.tracking_uri).set_registered_model_alias(plan["model_name"], CHAMPION, candidate["version"])
    _drop_challenger_alias(settings, candidate["version"])
    now = _now()
    _tag_version(
        settings,
        candidate["version"],
        {
            "serving.status": CHAMPION,
            "serving.endpoint": endpoint,
            "serving.variant": variant_name(candidate["version"]),
            "serving.weight": 1.0,
            "serving.endpoint_config": name,
            "serving.since": now,
            "rollout.status": "promoted",
        },
    )
    if previous is not None:
        _tag_version(
            settings,
            previous["version"],
            {
                "serving.status": "retired",
                "serving.weight": 0.0,
                "serving.retired_at": now,
                "serving.retired_by": candidate["version"],
            },
        )
    log(f"version {candidate['version']} is the {CHAMPION}, serving all traffic on {endpoint}")
    result = {"champion": candidate["version"], "previous": previous["version"] if previous else None, "config": name}
    return record_phase(settings, run_key, "promote", result)


def current_champion(settings: Settings) -> str | None:
    from mlflow.exceptions import MlflowException

    from llmops.tracking import client

    try:
        version = client(settings.mlflow.tracking_uri).get_model_version_by_alias(
            settings.finetune.model_name, CHAMPION
        )
    except MlflowException:
        return None
    return str(version.version)


def roll_back(
    settings: Settings,
    plan: dict,
    run_key: str,
    reasons: list[str],
    log: Callable[[str], None] = print,
    reject: bool = True,
) -> dict:
    """Traffic returns to the champion at once (weights), then the endpoint serves it alone again
    (re-created if it is gone). With ``reject`` (a failed check) the candidate is tagged rejected
    with the reasons and loses the ``challenger`` alias; without (the rollout itself failed) it is
    tagged failed and keeps the alias, so it can be rolled out again."""
    if reject and (done := finished_phase(settings, run_key, "roll_back", log)) is not None:
        return done
    backend = backend_for(settings)
    endpoint, candidate, champion = plan["endpoint"], plan["candidate"], plan["champion"]
    described = backend.describe_endpoint(endpoint)
    restored = None
    if champion is None:
        # Nothing served before this run; unless the candidate became the champion after all.
        if described is not None and current_champion(settings) != candidate["version"]:
            backend.delete_endpoint(endpoint)
    else:
        mine, theirs = variant_name(candidate["version"]), variant_name(champion["version"])
        production = {v["VariantName"] for v in (described or {}).get("ProductionVariants", [])}
        if described and described["EndpointStatus"] == IN_SERVICE and {mine, theirs} <= production:
            backend.update_endpoint_weights(endpoint, {theirs: 1.0, mine: 0.0})
            log(f"traffic back on {theirs}")
        restored = serve_alone(settings, backend, champion, "restored", run_key)
    tags = {
        "rollout.status": "rolled_back" if reject else "failed",
        "rollout.reasons": "; ".join(reasons) or "unspecified",
        "rollout.rolled_back_at": _now(),
        "serving.weight": 0.0,
    }
    if reject:
        tags["serving.status"] = "rejected"
    _tag_version(settings, candidate["version"], tags)
    if reject:
        _drop_challenger_alias(settings, candidate["version"])
    log(f"version {candidate['version']} rolled back: " + "; ".join(reasons))
    result = {"rolled_back": candidate["version"], "reasons": reasons, "config": restored, "rejected": reject}
    # A verdict ends the rollout; a failure does not (clearing the failed tasks tries again).
    return record_phase(settings, run_key, "roll_back", result) if reject else result


def record_rollout(settings: Settings, plan: dict, policy, lineage: dict, phases: dict) -> dict:
    """One MLflow run per rollout (in the model's experiment, keyed by the Airflow run): the
    policy, the shadow comparison and every step's figures, linked from the candidate's version.
    The same record again logs nothing (a metric logged twice would show twice in its history)."""
    import mlflow

    from llmops.tracking import RUN_KEY, _find_run, client, ensure_experiment

    mlflow_client = client(settings.mlflow.tracking_uri)
    experiment_id = ensure_experiment(mlflow_client, plan["model_name"], settings.mlflow.artifact_uri)
    run_key = f"{lineage['dag_id']}/{lineage['run_id']}"
    outcome = phases.get("outcome", "unknown")
    record = json.dumps({"plan": plan, "policy": policy.model_dump(), **phases}, indent=1, default=str)
    digest = hashlib.sha256(record.encode()).hexdigest()
    run = _find_run(mlflow_client, experiment_id, run_key)
    if run is None:
        run = mlflow_client.create_run(
            experiment_id,
            run_name=f"rollout-v{plan['candidate']['version']}",
            tags={
                RUN_KEY: run_key,
                "llmops.kind": "rollout",
                "airflow.dag_id": lineage["dag_id"],
                "airflow.run_id": lineage["run_id"],
                "model_version": plan["candidate"]["version"],
            },
        )
    run_id = run.info.run_id
    params = {
        "action": plan["action"],
        "endpoint": plan["endpoint"],
        "champion_version": (plan["champion"] or {}).get("version", "none"),
        "traffic_steps": ",".join(f"{s:g}" for s in policy.traffic_steps),
    }
    existing = mlflow_client.get_run(run_id).data.params
    mlflow_client.log_batch(
        run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in existing]
    )
    metrics = {}
    shadow = phases.get("shadow")
    if shadow:
        comparison = shadow["comparison"]
        metrics.update(
            {
                "shadow.pairs": comparison["pairs"],
                "shadow.error_rate": comparison["shadow"]["errors"] / max(comparison["shadow"]["invocations"], 1),
            }
        )
        for key in ("win_rate", "challenger_judge_mean", "champion_judge_mean"):
            if comparison[key] is not None:
                metrics[f"shadow.{key}"] = comparison[key]
    for step in phases.get("steps", []):
        prefix = f"step.{step['label']}"
        window = step["window"]
        metrics[f"{prefix}.invocations"] = window["invocations"]
        metrics[f"{prefix}.error_rate"] = window["errors"] / max(window["invocations"], 1)
        if window.get("p99_ms") is not None:
            metrics[f"{prefix}.p99_ms"] = window["p99_ms"]
        if step.get("judge_mean") is not None:
            metrics[f"{prefix}.judge_mean"] = step["judge_mean"]
    recorded = run.info.status == "FINISHED" and run.data.tags.get("llmops.record_sha256") == digest
    if not recorded:
        stamp = int(time.time() * 1000)
        mlflow_client.log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
        )
        mlflow_client.log_text(run_id, record, "rollout/rollout.json")
        mlflow_client.set_tag(run_id, "rollout.outcome", outcome)
        # The digest goes last: a run that has it holds the whole record.
        mlflow_client.set_tag(run_id, "llmops.record_sha256", digest)
        mlflow_client.set_terminated(run_id, "FINISHED")
    _tag_version(settings, plan["candidate"]["version"], {"rollout.mlflow_run_id": run_id, "rollout.outcome": outcome})
    return {"run_id": run_id, "outcome": outcome, "metrics": metrics}
