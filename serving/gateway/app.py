"""The gateway's HTTP face and command line: the FastAPI app (the SageMaker runtime route, the
``/control/...`` API, ``/ping``) and ``main``, which builds a ``Gateway`` from the flags and serves it
with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from serving import guardrails
from serving.access import AccessConfigError, CaptureRoots, ModelStore, RateLimiter, load_api_keys
from serving.capture import CaptureBudget
from serving.endpoints import EndpointConfigSpec, EndpointSpec, ModelSpec, UpdateEndpointSpec, UpdateWeightsSpec
from serving.gateway.admission import CLIENT, AccessDenied, Authentication, ClientGone, drain, read_body, requires
from serving.gateway.errors import ControlError, aws_error
from serving.gateway.servers import default_capture_roots, default_model_store
from serving.gateway.service import Gateway
from serving.gateway.state import MAX_PAYLOAD_BYTES, Limits

log = logging.getLogger("llmops.gateway")
DESCRIPTION = "The local endpoint gateway: the twin of a SageMaker real-time endpoint, on one machine."


CONTROL_BODY_BYTES = 1024 * 1024  # a control request is a SageMaker API body: kilobytes


async def _body(model: type[BaseModel], request: Request):
    """The control request's body as ``model``, read only up to ``CONTROL_BODY_BYTES``."""
    try:
        data, size = await read_body(request, CONTROL_BODY_BYTES)
    except ClientGone:
        raise ControlError(400, "the request body ended early: the client went away") from None
    if data is None:
        raise ControlError(413, f"the request body is {size} bytes; a control request may have {CONTROL_BODY_BYTES}")
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ControlError(400, f"invalid {model.__name__}: {problems}") from None


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        await gateway.start()
        yield
        await gateway.stop()

    # No interactive docs: every route is an API call that needs a role, and the docs would be one more
    # surface to guard.
    app = FastAPI(title="llmops endpoint gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway
    app.add_middleware(Authentication, admission=gateway.admission)

    @app.exception_handler(ControlError)
    async def control_error(request, exc: ControlError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(AccessDenied)
    async def access_denied(request, exc: AccessDenied):
        gateway.admission.warnings.warn(f"denied {request.scope.get(CLIENT)}", "refused: %s", exc)
        return aws_error(403, "AccessDeniedException", str(exc))

    @app.get("/ping")
    async def ping():
        return {"status": "ok", "endpoints": {name: e.status for name, e in gateway.control.endpoints.items()}}

    @app.post("/endpoints/{name}/invocations", dependencies=[requires("invoke")])
    async def invocations(name: str, request: Request):
        client = request.scope.get(CLIENT)
        throttled = gateway.admission.admit(client or f"address {request.client.host if request.client else '?'}", name)
        if throttled is not None:
            await drain(request.receive)
            return throttled
        limit = gateway.limits.max_body_bytes
        try:
            body, size = await read_body(request, limit)
        except ClientGone:
            return Response(status_code=400)  # nobody is left to read it
        if body is None:
            gateway.admission.refusals.add("PayloadTooLarge")
            return aws_error(413, "ValidationError", f"the payload is {size} bytes; at most {limit} are accepted")
        return await gateway.pipeline.invoke(name, body, request.headers, client)

    @app.get("/control/metrics", dependencies=[requires("operate")])
    async def gateway_metrics():
        return gateway.gateway_metrics()

    _add_control_routes(app, gateway)
    return app


def _add_control_routes(app: FastAPI, gateway: Gateway) -> None:
    """``/control/...``: the SageMaker API's calls, with its request bodies."""
    control = gateway.control

    @app.post("/control/models", dependencies=[requires("admin")])
    async def create_model(request: Request):
        return await control.create_model(await _body(ModelSpec, request))

    @app.get("/control/models/{name}", dependencies=[requires("admin")])
    async def describe_model(name: str):
        return control.model(name).model_dump()

    @app.post("/control/endpoint-configs", dependencies=[requires("admin")])
    async def create_endpoint_config(request: Request):
        return await control.create_endpoint_config(await _body(EndpointConfigSpec, request))

    @app.get("/control/endpoint-configs/{name}", dependencies=[requires("operate")])
    async def describe_endpoint_config(name: str):
        return control.config(name).model_dump()

    @app.get("/control/endpoints", dependencies=[requires("operate")])
    async def list_endpoints():
        return {"Endpoints": [control.describe(name) for name in sorted(control.endpoints)]}

    @app.post("/control/endpoints", dependencies=[requires("admin")])
    async def create_endpoint(request: Request):
        return await control.create_endpoint(await _body(EndpointSpec, request))

    @app.get("/control/endpoints/{name}", dependencies=[requires("operate")])
    async def describe_endpoint(name: str):
        return control.describe(name)

    @app.put("/control/endpoints/{name}", dependencies=[requires("admin")])
    async def update_endpoint(name: str, request: Request):
        return await control.update_endpoint(name, await _body(UpdateEndpointSpec, request))

    @app.post("/control/endpoints/{name}/weights", dependencies=[requires("operate")])
    async def update_weights(name: str, request: Request):
        return await control.update_weights(name, await _body(UpdateWeightsSpec, request))

    @app.delete("/control/endpoints/{name}", dependencies=[requires("admin")])
    async def delete_endpoint(name: str):
        await control.delete_endpoint(name)
        return {"EndpointName": name, "deleted": True}

    @app.get("/control/endpoints/{name}/metrics", dependencies=[requires("operate")])
    async def metrics(name: str, since: float | None = None):
        return gateway.metrics(name, since)


def _optional_int(value: str) -> int | None:
    return int(value) if value not in ("", "0") else None


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description=DESCRIPTION)
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
    _add_access_arguments(parser)
    return parser


def _add_access_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    access = parser.add_argument_group("access")
    access.add_argument(
        "--api-keys-file",
        default=env("LLMOPS_GATEWAY_API_KEYS_FILE"),
        help="'<client-name> <key> [<role>]' (or '<client-name> sha256:<hex> [<role>]') a line, role invoke"
        " (the default), operate or admin; LLMOPS_GATEWAY_API_KEY adds the client 'default' (role"
        " LLMOPS_GATEWAY_API_KEY_ROLE, default admin). Without keys the gateway serves anyone",
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
        "--capture-root",
        action="append",
        default=None,
        help="a folder data capture may write under (folder or file://); repeat for more. Default:"
        " LLMOPS_GATEWAY_CAPTURE_ROOT (comma-separated), else $LLMOPS_HOME/capture",
    )
    access.add_argument(
        "--capture-max-bytes",
        type=int,
        default=int(env("LLMOPS_GATEWAY_CAPTURE_MAX_BYTES", str(CaptureBudget.max_bytes))),
        help="most bytes of captured traffic under one destination; beyond, records are dropped and counted",
    )
    access.add_argument(
        "--capture-min-free-bytes",
        type=int,
        default=int(env("LLMOPS_GATEWAY_CAPTURE_MIN_FREE_BYTES", str(CaptureBudget.min_free_bytes))),
        help="free disk space capture always leaves",
    )
    access.add_argument(
        "--allow-remote-containers",
        action="store_true",
        default=env("LLMOPS_GATEWAY_ALLOW_REMOTE_CONTAINERS", "") == "1",
        help="accept a ContainerUrl on another host (default: loopback only)",
    )


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = load_api_keys(args.api_keys_file)
        limits = Limits(args.max_body_bytes, args.max_new_tokens, args.max_input_tokens)
        limiter = RateLimiter(args.rate_limit, args.rate_burst) if args.rate_limit > 0 else None
        store = ModelStore(args.model_store or default_model_store(), args.allow_remote_containers)
        capture_roots = CaptureRoots(args.capture_root or default_capture_roots())
        capture_budget = CaptureBudget(max_bytes=args.capture_max_bytes, min_free_bytes=args.capture_min_free_bytes)
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
        log.info("API keys of %d client(s): %s", len(keys), ", ".join(f"{c} ({r})" for c, r in keys.roles.items()))
    log.info(
        "models load from: %s; capture writes under: %s; guardrails: %s",
        ", ".join(store.roots),
        ", ".join(capture_roots.roots),
        args.guardrails,
    )
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
        capture_roots=capture_roots,
        capture_budget=capture_budget,
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
