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

**Modules**, imported in one direction (``app`` → ``service`` → ``admission``, ``pipeline``,
``control`` → ``state`` → ``servers`` → ``errors``; ``pipeline`` → ``upstream``):

- ``app``: the FastAPI app (routes, the authentication middleware mounted) and the CLI, ``main``;
- ``service``: ``Gateway``, which wires the parts below together: life cycle and metrics;
- ``admission``: API keys, rate limits and the body's size, before a request is looked at;
- ``pipeline``: guard → route → model server → capture → mirror to the shadow;
- ``control``: the control plane: models, endpoint configs, endpoints and their weights;
- ``state``: the records those share (``Endpoint``, ``Routing``, ``Limits``) and ``gateway.json``;
- ``servers``: the model server processes (``serving.app``) behind the variants;
- ``upstream``: the client that carries invocations to the model servers;
- ``errors``: ``ControlError``, SageMaker-style error responses, rate-limited warnings.
"""
