"""A stand-in model server for gateway tests: answers in microseconds, or slowly, or with errors,
or dies. Run as ``python -m tests.fakecontainer PORT MODE [DELAY]`` (modes: echo, slow, error,
crash), or in-process through ``serve()``.

Its answer names the server (``FAKE_NAME``) so a test can tell which variant served a request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(name: str, mode: str, delay: float = 0.0) -> Starlette:
    async def ping(request: Request):
        return JSONResponse({"status": "ok"})

    async def invocations(request: Request):
        body = await request.body()
        if mode == "crash":
            os._exit(3)
        if mode == "slow":
            await asyncio.sleep(delay)
        if mode == "error":
            return JSONResponse({"error": "the fake model failed"}, status_code=500)
        try:
            inputs = json.loads(body).get("inputs")
        except (ValueError, AttributeError):
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        answer = {"generated_text": f"{name} says: {inputs}", "prompt_tokens": 1, "completion_tokens": 3}
        # Custom attributes come back as they went in, as a SageMaker container may answer them.
        attributes = request.headers.get("x-amzn-sagemaker-custom-attributes")
        headers = {"X-Amzn-SageMaker-Custom-Attributes": attributes} if attributes else None
        return Response(json.dumps(answer), media_type="application/json", headers=headers)

    return Starlette(routes=[Route("/ping", ping), Route("/invocations", invocations, methods=["POST"])])


def main() -> None:
    import uvicorn

    port, mode = int(sys.argv[1]), sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    app = create_app(os.environ.get("FAKE_NAME", f"fake-{mode}"), mode, delay)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
