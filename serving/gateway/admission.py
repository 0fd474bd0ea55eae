"""The first step of a request: who sends it (API keys, as ASGI middleware), whether its key's
role may call the route (``requires``), how often (a token bucket per client) and how much (the
body's size). A refused request is answered here, its body read and dropped, and reaches no model."""

from __future__ import annotations

import math

from fastapi import Depends, Request
from fastapi.responses import Response

from serving.access import ROLES, ApiKeys, RateLimiter, presented_key, role_allows
from serving.gateway.errors import OccasionalWarnings, aws_error
from serving.gateway.state import Endpoint, Limits
from serving.metrics import RefusalCounters

DRAIN_BYTES = 64 * 1024 * 1024  # a refused request's body read (and dropped) so the caller reads the answer
CLIENT = "llmops.client"  # the ASGI scope key of the authenticated client's name
ROLE = "llmops.role"  # and of its key's role


class Admission:
    """What a request must pass before the gateway looks at it, and the gateway's count of the
    requests refused (unauthenticated, throttled, too large, over a token cap)."""

    def __init__(
        self,
        api_keys: ApiKeys | None,
        rate_limiter: RateLimiter | None,
        limits: Limits,
        endpoints: dict[str, Endpoint],
        warnings: OccasionalWarnings,
    ):
        self.api_keys = api_keys if api_keys else None  # no keys: open
        self.rate_limiter = rate_limiter
        self.limits = limits
        self.endpoints = endpoints
        self.warnings = warnings
        self.refusals = RefusalCounters()  # the gateway's: unauthenticated, throttled, too large

    def admit(self, client: str, endpoint_name: str) -> Response | None:
        """A 429 ``ThrottlingException`` when ``client`` is over its rate limit, else None."""
        if self.rate_limiter is None:
            return None
        wait = self.rate_limiter.acquire(client)
        if not wait:
            return None
        limiter = self.rate_limiter
        self.refusals.add("Throttled")
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is not None:
            endpoint.refusals.add("Throttled")
        self.warnings.warn(
            f"throttled {client}", "throttling %s: over %g requests/s (burst %g)", client, limiter.rate, limiter.burst
        )
        response = aws_error(
            429,
            "ThrottlingException",
            f"Rate exceeded: {client} may send {limiter.rate:g} requests a second (burst {limiter.burst:g});"
            f" retry in {wait:.2f}s",
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return response


async def drain(receive, limit: int = DRAIN_BYTES) -> int:
    """Read and drop a request's body (up to ``limit`` bytes): a client still sending when the
    answer comes can miss it (a reset connection instead of a 401 or 413)."""
    size = 0
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return size


class Authentication:
    """ASGI middleware: with API keys, every route but ``/ping`` needs one. The client's name goes
    into the scope (``CLIENT``) for rate limits and capture."""

    def __init__(self, app, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send):
        keys = self.admission.api_keys
        if keys is None or scope["type"] != "http" or scope["path"] == "/ping":
            return await self.app(scope, receive, send)
        presented = presented_key(scope["headers"])
        client = keys.identify(presented)
        if client is not None:
            scope[CLIENT] = client
            scope[ROLE] = keys.role(client)
            return await self.app(scope, receive, send)
        self.admission.refusals.add("Unauthenticated")
        address = (scope.get("client") or ("?",))[0]
        if presented is None:
            code, message = (
                "MissingAuthenticationTokenException",
                "This gateway needs an API key: send it in the x-api-key header or as Authorization: Bearer <key>.",
            )
        else:
            code, message = "UnrecognizedClientException", "The API key in the request is not valid."
        self.admission.warnings.warn(
            f"unauthenticated {address}", "refused %s %s from %s: %s", scope["method"], scope["path"], address, code
        )
        await drain(receive, self.admission.limits.max_body_bytes)  # no more than a caller with a key may send
        response = aws_error(401, code, message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="llmops-gateway"'
        await response(scope, receive, send)


class ClientGone(Exception):
    """The caller closed the connection before its request's body was whole."""


async def read_body(request: Request, limit: int) -> tuple[bytes | None, int]:
    """The body, or None when it is over ``limit`` bytes (then read and dropped); and its size.
    ``ClientGone`` when the caller left halfway: a partial body must never reach a model."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await drain(request.receive)
        return None, int(declared)
    chunks, size, more = [], 0, True
    while more:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            if more:
                size += await drain(request.receive)
            return None, size
        chunks.append(chunk)
    return b"".join(chunks), size


class AccessDenied(Exception):
    """The caller's key has a role below what the route needs."""

    def __init__(self, client: str, held: str, needed: str, route: str):
        super().__init__(
            f"client {client} has the role {held}; {route} needs {needed} (roles, least first: {', '.join(ROLES)})"
        )


def requires(role: str):
    """A route dependency: the route needs a key of ``role`` or above. A gateway without keys has
    no roles to check (it warns at start that anyone may call it)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    async def check(request: Request) -> None:
        held = request.scope.get(ROLE)
        if held is not None and not role_allows(held, role):
            await drain(request.receive)
            request.app.state.gateway.admission.refusals.add("AccessDenied")
            route = f"{request.method} {request.scope['route'].path}"
            raise AccessDenied(request.scope[CLIENT], held, role, route)

    check.role = role  # read by the route table: every route names the role it needs
    return Depends(check)
