"""The request path, once a request is admitted: guard (a token cap, the input guardrails) → route
(to the production variant drawn by weight, or the one ``TargetVariant`` names) → the model server →
guard (the output guardrails) → capture → mirror to the shadow.

A copy of a share of the requests goes to the shadow variant after the caller has its answer,
through a bounded queue drained by a few workers: the caller never waits for the shadow and never
sees its errors (a full queue drops the copy and counts it)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi.responses import Response

from serving import guardrails
from serving.capture import CaptureBudget, CaptureWriter, capture_record
from serving.endpoints import RoutingError, choose_variant
from serving.gateway.errors import OccasionalWarnings, aws_error
from serving.gateway.state import Endpoint, Limits, Routing
from serving.gateway.upstream import Upstream, UpstreamAnswer, UpstreamTimeout, UpstreamUnreachable
from serving.metrics import RefusalCounters

log = logging.getLogger("llmops.gateway")
FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
VARIANT_HEADER = "x-Amzn-Invoked-Production-Variant"
# The capture record's eventId, so a caller can find its own request in the captured traffic.
EVENT_ID_HEADER = "x-llmops-event-id"


def _token_count(value) -> int | None:
    """``parameters.max_new_tokens`` as the model server reads it (pydantic's lax int: an int, an
    integral float or a string of one), so ``"5000"`` meets the cap as 5000 does; None where the
    model server would refuse the value itself."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:  # "5000.0"; a form the server refuses anyway ("5e3") may be counted too
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return None


def guardrail_record(mode: str, found_in: tuple, found_out: tuple, blocked: str | None) -> dict | None:
    """A capture record's ``guardrails`` field: None when nothing was found."""
    if not found_in and not found_out:
        return None
    record: dict = {"mode": mode}
    if found_in:
        record["input"] = [f.to_dict() for f in found_in]
    if found_out:
        record["output"] = [f.to_dict() for f in found_out]
    if blocked:
        record["blocked"] = blocked
    return record


@dataclass
class Invocation:
    """One request, routed to its variant and on its way to the model."""

    endpoint: Endpoint
    routing: Routing
    variant: str
    body: bytes
    forward: dict[str, str]  # the caller's headers the model server gets
    inference_id: str | None
    client: str | None
    moment: datetime
    event_id: str
    found_in: tuple = ()  # the input guardrails' findings


@dataclass
class ModelAnswer:
    """What the variant's model server made of an invocation: its answer, or why there is none."""

    answer: UpstreamAnswer | None
    failure: str | None
    latency_ms: float

    @property
    def status(self) -> int:
        return self.answer.status_code if self.answer is not None else 502


@dataclass
class Mirror:
    endpoint: Endpoint
    routing: Routing
    body: bytes
    headers: dict[str, str]
    source_event_id: str
    inference_id: str | None
    capture: bool
    client: str | None = None
    found_in: tuple = ()


class Pipeline:
    """Invocations of the endpoints in ``endpoints`` (the control plane's), their capture and their
    shadow copies. ``refusals`` are the gateway's counters (a request over the token cap counts)."""

    def __init__(
        self,
        endpoints: dict[str, Endpoint],
        limits: Limits,
        refusals: RefusalCounters,
        warnings: OccasionalWarnings,
        invoke_timeout: float,
        spawn: Callable[[Coroutine], asyncio.Task],
        shadow_workers: int = 1,
        shadow_queue: int = 1024,
        capture_budget: CaptureBudget | None = None,
    ):
        self.endpoints = endpoints
        self.limits = limits
        self.refusals = refusals
        self.warnings = warnings
        self.invoke_timeout = invoke_timeout
        self._spawn = spawn
        self._shadow_workers = shadow_workers
        self._shadow_queue_size = shadow_queue
        self.writer = CaptureWriter(budget=capture_budget)
        self.upstream = Upstream(invoke_timeout)
        self.shadow_queue: asyncio.Queue[Mirror] | None = None

    async def start(self) -> None:
        await self.upstream.start()
        self.shadow_queue = asyncio.Queue(maxsize=self._shadow_queue_size)
        for _ in range(self._shadow_workers):
            self._spawn(self._shadow_worker())

    async def drain_shadow(self, seconds: float) -> None:
        """Wait (up to ``seconds``) for the shadow copies already queued to be sent."""
        if self.shadow_queue is not None:
            try:
                await asyncio.wait_for(self.shadow_queue.join(), seconds)
            except TimeoutError:
                log.warning("%d shadow copies were not sent before shutdown", self.shadow_queue.qsize())

    def metrics(self, endpoint: Endpoint, since: float | None = None) -> dict:
        return {
            "EndpointName": endpoint.name,
            "Since": since,
            "Variants": {variant: m.summary(since) for variant, m in endpoint.metrics.items()},
            "ShadowVariants": {variant: m.summary(since) for variant, m in endpoint.shadow_metrics.items()},
            "ShadowPending": self.shadow_queue.qsize() if self.shadow_queue else 0,
            # Since the gateway started: requests throttled or over a token cap, guardrail findings.
            "Guardrails": endpoint.routing.guardrails if endpoint.routing else None,
            "Refused": endpoint.refusals.summary(),
            "Capture": {
                "Running": self.writer.alive,  # False: the writer stopped, and records are piling up
                "Written": self.writer.written,
                "Failed": self.writer.failed,
                "Dropped": self.writer.dropped,  # over the queue or the disk budget: counted, never waited for
                "Pending": self.writer.pending(),
                "LastError": self.writer.last_error,
            },
        }

    # -- the production variant -------------------------------------------------------------------

    def _over_token_cap(self, endpoint: Endpoint, parsed) -> Response | None:
        cap = self.limits.max_new_tokens
        if cap is None or not isinstance(parsed, dict):
            return None
        parameters = parsed.get("parameters")
        asked = _token_count(parameters.get("max_new_tokens")) if isinstance(parameters, dict) else None
        if asked is not None and asked > cap:
            self.refusals.add("TokenLimit")
            endpoint.refusals.add("TokenLimit")
            return aws_error(
                400,
                "ValidationError",
                f"parameters.max_new_tokens is {asked}; endpoint {endpoint.name} answers at most {cap} new tokens"
                " a request",
            )
        return None

    async def invoke(self, name: str, body: bytes, headers, client: str | None = None) -> Response:
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            return aws_error(400, "ValidationError", f"Endpoint {name} of account 000000000000 not found.")
        routing = endpoint.routing
        if routing is None:
            return aws_error(400, "ValidationError", f"Endpoint {name} is {endpoint.status}, not in service.")
        try:
            variant = choose_variant(routing.weights, headers.get("x-amzn-sagemaker-target-variant"))
        except RoutingError as exc:
            return aws_error(400, "ValidationError", str(exc))
        forward = {h: headers[h] for h in FORWARDED_HEADERS if h in headers}
        mode = routing.guardrails
        parsed = guardrails.NOT_JSON
        if mode != "off" or self.limits.max_new_tokens is not None:
            parsed = guardrails.parse_json(body)
        refused = self._over_token_cap(endpoint, parsed)
        if refused is not None:
            return refused
        call = Invocation(
            endpoint,
            routing,
            variant,
            body,
            forward,
            inference_id=headers.get("x-amzn-sagemaker-inference-id"),
            client=client,
            moment=datetime.now(UTC),
            event_id=str(uuid.uuid4()),
        )
        found_in = await guardrails.scan_payload_async(body, parsed) if mode != "off" else ()
        if found_in:
            endpoint.refusals.add("InputFlagged")
            endpoint.refusals.findings("input", found_in)
            if mode == "block" and guardrails.blocking(found_in):
                return self._block_input(call, found_in)
        call.found_in = found_in
        return await self._answer(call, await self._call_model(call))

    async def _call_model(self, call: Invocation) -> ModelAnswer:
        server, variant = call.routing.servers[call.variant], call.variant
        started = time.perf_counter()
        answer, failure = None, None
        server.inflight += 1
        try:
            answer = await self.upstream.post(f"{server.url}/invocations", call.body, call.forward)
        except UpstreamTimeout:
            failure = f"the model of variant {variant} did not answer within {self.invoke_timeout:.0f}s"
        except UpstreamUnreachable as exc:
            failure = f"the model server of variant {variant} is not reachable ({exc})"
        finally:
            server.inflight -= 1
        return ModelAnswer(answer, failure, (time.perf_counter() - started) * 1000)

    async def _answer(self, call: Invocation, model: ModelAnswer) -> Response:
        """The caller's response to the model's answer (after the output guardrails); then capture
        and the shadow copy."""
        endpoint, variant, mode = call.endpoint, call.variant, call.routing.guardrails
        status, model_response = model.status, model.answer
        answered = model_response is not None and status < 400
        media = model_response.headers.get("content-type", "application/json") if answered else None
        found_out = await guardrails.scan_payload_async(model_response.content) if answered and mode != "off" else ()
        withheld = mode == "block" and bool(guardrails.blocking(found_out))
        if found_out:
            endpoint.refusals.add("OutputFlagged")
            endpoint.refusals.findings("output", found_out)
        # A withheld answer is the variant's failure: a model that leaks is not serving well.
        observed = 424 if withheld else status
        endpoint.variant_metrics(variant).observe(model.latency_ms, observed, call.moment.timestamp())

        if withheld:
            response = self._withhold(call, status, found_out)
        elif answered:
            response = Response(
                model_response.content,
                status_code=200,
                media_type=media,
                headers={VARIANT_HEADER: variant},
            )
            if "x-amzn-sagemaker-custom-attributes" in model_response.headers:
                response.headers["X-Amzn-SageMaker-Custom-Attributes"] = model_response.headers[
                    "x-amzn-sagemaker-custom-attributes"
                ]
        else:
            original = model_response.text[:2000] if model_response is not None else model.failure
            kind = "client" if 400 <= status < 500 else "server"
            response = aws_error(
                424,
                "ModelError",
                f"Received {kind} error ({status}) from variant {variant} with message {original!r}.",
                OriginalStatusCode=status,
                OriginalMessage=original,
                ErrorCode=f"{kind.upper()}_ERROR_FROM_MODEL",
            )
            response.headers[VARIANT_HEADER] = variant

        # Withheld answers are always captured: a sampled-out one would leave no trace of a leak.
        routing = call.routing
        sampled = routing.capture_root is not None and (withheld or random.random() < routing.sampling)
        if sampled:
            self._capture(
                routing,
                endpoint=endpoint.name,
                variant=variant,
                request=call.body,
                request_type=call.forward.get("content-type"),
                # The operator sees what was withheld; the caller never did.
                response=model_response.content if withheld else bytes(response.body),
                response_type=media if withheld else response.headers.get("content-type"),
                status_code=424 if withheld else status,
                latency_ms=model.latency_ms,
                inference_time=call.moment,
                event_id=call.event_id,
                inference_id=call.inference_id,
                client=call.client,
                guardrails=guardrail_record(mode, call.found_in, found_out, "output" if withheld else None),
            )
        self._mirror(call, sampled)
        response.headers[EVENT_ID_HEADER] = call.event_id
        return response

    def _withhold(self, call: Invocation, status: int, found_out: tuple) -> Response:
        """The 424 that stands in for an answer an output guardrail stopped."""
        name, variant = call.endpoint.name, call.variant
        call.endpoint.refusals.add("OutputBlocked")
        rules = guardrails.describe(guardrails.blocking(found_out))
        self.warnings.warn(
            f"output {name} {variant}", "endpoint %s: withheld an answer of variant %s (%s)", name, variant, rules
        )
        response = aws_error(
            424,
            "ModelError",
            f"The answer of variant {variant} was withheld by the gateway's output guardrails: {rules}.",
            OriginalStatusCode=status,
            OriginalMessage=f"withheld: the answer matched {rules}",
            ErrorCode="OUTPUT_BLOCKED_BY_GUARDRAILS",
        )
        response.headers[VARIANT_HEADER] = variant
        return response

    def _block_input(self, call: Invocation, found: tuple) -> Response:
        """Refuse a request an input guardrail stopped; it is captured (always: an operator must see
        every block) under the variant it was routed to, and reaches no model."""
        endpoint, routing = call.endpoint, call.routing
        rules = guardrails.describe(guardrails.blocking(found))
        endpoint.refusals.add("InputBlocked")
        self.warnings.warn(
            f"input {endpoint.name}",
            "endpoint %s: blocked a request from %s (%s)",
            endpoint.name,
            call.client or "?",
            rules,
        )
        response = aws_error(
            400, "ValidationError", f"The request was blocked by the gateway's input guardrails: {rules}."
        )
        if routing.capture_root is not None:
            self._capture(
                routing,
                endpoint=endpoint.name,
                variant=call.variant,
                request=call.body,
                request_type=call.forward.get("content-type"),
                response=bytes(response.body),
                response_type=response.headers.get("content-type"),
                status_code=400,
                latency_ms=0.0,
                inference_time=call.moment,
                event_id=call.event_id,
                inference_id=call.inference_id,
                client=call.client,
                guardrails=guardrail_record(routing.guardrails, found, (), "input"),
            )
        response.headers[EVENT_ID_HEADER] = call.event_id
        return response

    def _capture(self, routing: Routing, *, request: bytes, response: bytes, **fields) -> None:
        """Queue one capture record (``fields``: ``serving.capture.capture_record``'s), keeping the
        sides the config's capture options ask for."""
        types = routing.config.DataCaptureConfig.CaptureContentTypeHeader
        record = capture_record(
            request=request if routing.capture_input else None,
            response=response if routing.capture_output else None,
            json_types=tuple(types.JsonContentTypes),
            csv_types=tuple(types.CsvContentTypes),
            **fields,
        )
        self.writer.submit(
            routing.capture_root, fields["endpoint"], fields["variant"], record, redact=routing.capture_redact
        )

    # -- the shadow variant -----------------------------------------------------------------------

    def _mirror(self, call: Invocation, sampled: bool) -> None:
        """Queue a copy for the shadow variant, for a share of the requests; a full queue drops it."""
        routing = call.routing
        if routing.shadow is not None and random.random() < routing.shadow_share:
            mirror = Mirror(
                call.endpoint,
                routing,
                call.body,
                call.forward,
                call.event_id,
                call.inference_id,
                sampled,
                call.client,
                call.found_in,
            )
            try:
                self.shadow_queue.put_nowait(mirror)
            except asyncio.QueueFull:
                call.endpoint.variant_metrics(routing.shadow, shadow=True).dropped += 1

    async def _shadow_worker(self) -> None:
        while True:
            mirror = await self.shadow_queue.get()
            try:
                await self._send_to_shadow(mirror)
            except Exception:  # nothing a shadow does may reach a caller or stop this worker
                log.exception("shadow copy of %s failed", mirror.source_event_id)
            finally:
                self.shadow_queue.task_done()

    async def _send_to_shadow(self, mirror: Mirror) -> None:
        routing, variant = mirror.routing, mirror.routing.shadow
        server = routing.servers[variant]
        moment = datetime.now(UTC)
        started = time.perf_counter()
        server.inflight += 1
        try:
            answer = await self.upstream.post(f"{server.url}/invocations", mirror.body, mirror.headers)
            status, content, media = answer.status_code, answer.content, answer.headers.get("content-type")
        except (UpstreamTimeout, UpstreamUnreachable) as exc:
            status, content, media = 502, f"unreachable: {type(exc).__name__} {exc}".encode(), "text/plain"
        finally:
            server.inflight -= 1
        latency_ms = (time.perf_counter() - started) * 1000
        mirror.endpoint.variant_metrics(variant, shadow=True).observe(latency_ms, status, moment.timestamp())
        # A shadow's answer reaches no caller: its findings are recorded, never blocked.
        found = await guardrails.scan_payload_async(content) if routing.guardrails != "off" and status < 400 else ()
        if found:
            mirror.endpoint.refusals.add("ShadowOutputFlagged")
            mirror.endpoint.refusals.findings("shadow-output", found)
        if mirror.capture:
            self._capture(
                routing,
                endpoint=mirror.endpoint.name,
                variant=variant,
                request=mirror.body,
                request_type=mirror.headers.get("content-type"),
                response=content,
                response_type=media or "application/octet-stream",
                status_code=status,
                latency_ms=latency_ms,
                inference_time=moment,
                inference_id=mirror.inference_id,
                shadow=True,
                source_event_id=mirror.source_event_id,
                client=mirror.client,
                guardrails=guardrail_record(routing.guardrails, mirror.found_in, found, None),
            )
