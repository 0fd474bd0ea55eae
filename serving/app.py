"""The inference server: the SageMaker bring-your-own-container contract over HTTP.

    GET  /ping          200 once the model is loaded
    POST /invocations   {"inputs": text or chat messages,
                         "parameters": {"max_new_tokens", "temperature", "top_p", "stop"},
                         "adapter": optional adapter name}
                        -> {"generated_text", "prompt_tokens", "completion_tokens", "finish_reason",
                            "adapter", "batch_size", "latency_ms"}

    SM_MODEL_DIR=/path/to/model python -m serving.app      # port: SAGEMAKER_BIND_TO_PORT or PORT, default 8080

A parent that has already bound a socket for the server (the endpoint gateway does, so no other
process can take the port while the model loads) passes it as ``LLMOPS_SERVING_FD``, an inherited
file descriptor; the port settings are then ignored.

Concurrent requests are batched (``serving.model.Batcher``): ``LLMOPS_MAX_BATCH_SIZE`` (default 8;
1 serves one request at a time) and ``LLMOPS_BATCH_WAIT_MS`` (default 5), how long the first
request of a batch waits for company when the model is idle.

Operators may cap what one request costs: ``LLMOPS_MAX_NEW_TOKENS`` (a request asking for more is
refused with a 400; one that does not ask gets at most this many) and ``LLMOPS_MAX_INPUT_TOKENS``
(a longer prompt, counted after templating, is refused with a 413).

A request the server cannot honour (bad JSON, missing inputs, an unknown adapter, parameters out
of range, a prompt longer than the model's context or the cap) gets a 4xx with a message saying
what was wrong; a 5xx means a fault of the server itself.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.model import Batcher, BatcherStopped, load

MAX_BODY_BYTES = 1_000_000
MAX_NEW_TOKENS = 2048  # what Parameters accepts at all
MAX_INPUT_TOKENS = 1 << 24  # the highest prompt-token cap an operator may set


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=8)


class InvocationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: (
        Annotated[str, Field(min_length=1, max_length=32_000)]
        | Annotated[list[ChatMessage], Field(min_length=1, max_length=64)]
    )
    parameters: Parameters = Field(default_factory=Parameters)
    adapter: str | None = None


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, read only while it is at most ``limit`` bytes: a larger one (by its
    Content-Length, or as it arrives) is a ``ValueError`` before it is held in memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ValueError(f"the request body is {int(declared)} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"the request body is over {limit} bytes; at most {limit} are accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(body: bytes) -> InvocationRequest:
    """The request body as a typed request; ``ValueError`` says what is wrong with it."""
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the request body is not JSON: {exc}") from None
    if not isinstance(data, dict) or "inputs" not in data:
        raise ValueError('the request needs "inputs": a text or a list of chat messages')
    try:
        return InvocationRequest.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid request: {_errors(exc)}") from None


def _setting(name: str, default: float, kind: type) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None


def _cap(name: str, highest: int) -> int | None:
    value = int(_setting(name, 0, int))
    if value == 0:
        return None
    if not 1 <= value <= highest:
        raise ValueError(f"{name}={value} must be between 1 and {highest} (or unset: no cap)")
    return value


def create_app(loader=None, max_batch_size: int | None = None, max_wait_ms: float | None = None):
    """The FastAPI app; ``loader()`` returns a ``serving.model.LoadedModel`` (loaded at start-up).
    Batching and the per-request caps take their settings from the arguments, else from the
    environment."""
    from contextlib import asynccontextmanager

    if max_batch_size is None:
        max_batch_size = int(_setting("LLMOPS_MAX_BATCH_SIZE", 8, int))
    if max_wait_ms is None:
        max_wait_ms = _setting("LLMOPS_BATCH_WAIT_MS", 5.0, float)
    new_tokens_cap = _cap("LLMOPS_MAX_NEW_TOKENS", MAX_NEW_TOKENS)
    input_tokens_cap = _cap("LLMOPS_MAX_INPUT_TOKENS", MAX_INPUT_TOKENS)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["model"] = await run_in_threadpool(loader or load)
        state["batcher"] = Batcher(state["model"], max_batch_size, max_wait_ms)
        yield
        await run_in_threadpool(state["batcher"].close)

    app = FastAPI(title="llmops inference server", lifespan=lifespan)

    @app.get("/ping")
    def ping():
        if "model" not in state:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state["batcher"].alive:
            return JSONResponse({"status": "stopped", "error": "the generation thread is not running"}, status_code=503)
        return {"status": "ok", "adapters": list(state["model"].adapters), "batching": state["batcher"].stats()}

    @app.post("/invocations")
    async def invocations(request: Request):
        try:
            invocation = decode(await read_capped(request, MAX_BODY_BYTES))
        except ValueError as exc:
            status = 413 if "bytes; at most" in str(exc) else 400
            return JSONResponse({"error": str(exc)}, status_code=status)
        model = state["model"]
        if invocation.adapter is not None and invocation.adapter not in model.adapters:
            known = ", ".join(model.adapters) or "none: this server has no adapters"
            return JSONResponse({"error": f"unknown adapter {invocation.adapter!r} (known: {known})"}, status_code=404)
        inputs = invocation.inputs
        if not isinstance(inputs, str):
            inputs = [m.model_dump() for m in inputs]
        p = invocation.parameters
        max_new_tokens = p.max_new_tokens
        if new_tokens_cap is not None and max_new_tokens > new_tokens_cap:
            if "max_new_tokens" in p.model_fields_set:
                return JSONResponse(
                    {
                        "error": f"parameters.max_new_tokens is {max_new_tokens}; this server answers at most"
                        f" {new_tokens_cap} tokens (LLMOPS_MAX_NEW_TOKENS)"
                    },
                    status_code=400,
                )
            max_new_tokens = new_tokens_cap
        try:  # templating and tokenizing up to 32k characters: off the event loop
            prepared = await run_in_threadpool(
                model.prepare, inputs, max_new_tokens, p.temperature, p.top_p, p.stop, invocation.adapter
            )
        except ValueError as exc:  # the prompt does not fit the model's context
            return JSONResponse({"error": str(exc)}, status_code=413)
        if input_tokens_cap is not None and len(prepared.ids) > input_tokens_cap:
            return JSONResponse(
                {
                    "error": f"the prompt is {len(prepared.ids)} tokens; this server accepts at most"
                    f" {input_tokens_cap} (LLMOPS_MAX_INPUT_TOKENS)"
                },
                status_code=413,
            )
        try:
            future = state["batcher"].submit(prepared)
        except BatcherStopped as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return await asyncio.wrap_future(future)

    return app


def main() -> None:
    import uvicorn

    inherited = os.environ.get("LLMOPS_SERVING_FD")
    if inherited:
        import socket

        try:
            sock = socket.socket(fileno=int(inherited))  # family and type read from the descriptor
        except (ValueError, OSError) as exc:
            raise SystemExit(f"LLMOPS_SERVING_FD={inherited!r} is not an open socket: {exc}") from None
        uvicorn.Server(uvicorn.Config(create_app(), log_level="info")).run(sockets=[sock])
        return
    port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT") or os.environ.get("PORT") or 8080)
    # Loopback unless told otherwise: the serving image sets LLMOPS_SERVING_HOST=0.0.0.0 itself, as
    # SageMaker's contract (a container reached on its own interfaces) needs.
    uvicorn.run(create_app(), host=os.environ.get("LLMOPS_SERVING_HOST", "127.0.0.1"), port=port, log_level="info")


if __name__ == "__main__":
    main()
