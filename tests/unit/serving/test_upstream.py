"""The gateway's client to model servers: answers pass through as the server sent them, and a
client that is not running is a clear "unreachable", never an unhandled error."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from serving.gateway.upstream import Upstream, UpstreamUnreachable


def test_upstream_answer_is_not_left_compressed():
    from aiohttp import web

    payload = b'{"generated_text": "' + b"x" * 2000 + b'"}'

    async def handler(request):
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(
                body=gzip.compress(payload),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        return web.Response(body=payload, content_type="application/json")

    async def scenario():
        app = web.Application()
        app.router.add_post("/invocations", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        upstream = Upstream(5)
        await upstream.start()
        try:
            return await upstream.post(
                f"http://127.0.0.1:{port}/invocations", b'{"inputs": "hi"}', {"content-type": "application/json"}
            )
        finally:
            await upstream.close()
            await runner.cleanup()

    answer = asyncio.run(scenario())
    assert answer.content == payload


def test_a_client_that_is_not_running_is_unreachable_not_a_crash():
    async def scenario():
        upstream = Upstream(5)
        with pytest.raises(UpstreamUnreachable, match="not running"):
            await upstream.post("http://127.0.0.1:9/invocations", b"{}", {})
        await upstream.start()
        await upstream.close()
        with pytest.raises(UpstreamUnreachable, match="not running"):
            await upstream.post("http://127.0.0.1:9/invocations", b"{}", {})

    asyncio.run(scenario())
