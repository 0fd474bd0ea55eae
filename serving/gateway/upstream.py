"""The client that carries invocations to model servers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class UpstreamAnswer:
    status_code: int
    content: bytes
    headers: Any  # case-insensitive, as received

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class UpstreamTimeout(Exception):
    pass


class UpstreamUnreachable(Exception):
    pass


class Upstream:
    """The client that carries invocations to model servers: aiohttp, which costs a fraction of
    httpx's async client per request; under concurrency that is most of the gateway's overhead.
    (Control calls, such as health checks, keep httpx.)"""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.session = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            # Idle connections close before the servers' (uvicorn: 5 s): aiohttp never retries a POST.
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=0, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            # No Accept-Encoding: answers pass through to callers and capture as they came.
            skip_auto_headers=("Content-Type", "User-Agent", "Accept-Encoding"),
            auto_decompress=False,
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamAnswer:
        if self.session is None or self.session.closed:
            raise UpstreamUnreachable("the gateway's client is not running")
        try:
            async with self.session.post(url, data=body, headers=headers) as response:
                return UpstreamAnswer(response.status, await response.read(), response.headers)
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
