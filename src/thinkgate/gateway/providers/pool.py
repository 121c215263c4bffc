"""The connections to one upstream backend: several small httpcore pools behind one httpx transport.

httpcore's pool (1.0.x) re-examines every connection it holds each time it places a request or a response
closes, and for each idle one counts all of them again: the work per placement grows with the square of the
open connections. With 32 streams open to one backend that was 0.5 ms a placement, ~7 placements a request:
17% of the gateway's CPU at 32 streams (`benchmarks/upstream_overhead.py`, the pool's own method timed). Split
into shards of a few connections each, a placement looks at its shard only; a request goes to the shard with
the fewest requests in flight, the first one when they tie, so a lone client keeps reusing one connection.
Each pool reads and writes through net.py's asyncio network backend instead of anyio's.
"""

from __future__ import annotations

import functools
import math
import ssl
from collections.abc import AsyncIterator

import httpcore
import httpx

from thinkgate.gateway.providers.net import AsyncioBackend


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, shards: int = 8, max_connections: int = 256, max_keepalive_connections: int = 64,
                 keepalive_expiry: float = 2.0, ssl_context: ssl.SSLContext | None = None):
        limits = httpx.Limits(max_connections=math.ceil(max_connections / shards),
                              max_keepalive_connections=math.ceil(max_keepalive_connections / shards),
                              keepalive_expiry=keepalive_expiry)
        self.shards = [_http_transport(limits, ssl_context or _tls()) for _ in range(shards)]
        self.in_flight = [0] * shards  # requests sent and whose response is not closed yet, per shard
        # Whether the shards run on net.py's backend (False if httpx's internals moved: its own then serves).
        self.own_network = all(isinstance(getattr(getattr(t, "_pool", None), "_network_backend", None),
                                          AsyncioBackend) for t in self.shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        i = min(range(len(self.in_flight)), key=self.in_flight.__getitem__)
        self.in_flight[i] += 1
        try:
            response = await self.shards[i].handle_async_request(request)
        except BaseException:
            self.in_flight[i] -= 1
            raise
        response.stream = _Counted(response.stream, self.in_flight, i)
        return response

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.aclose()


def _http_transport(limits: httpx.Limits, tls: ssl.SSLContext) -> httpx.AsyncHTTPTransport:
    """httpx's transport over httpcore's pool, the pool given thinkgate's asyncio network backend (net.py).
    httpx takes no network backend, so its pool is replaced by one built with the same settings; should a
    later httpx keep it elsewhere, its own pool stays (tests/gateway/test_upstream_wire.py notices)."""
    transport = httpx.AsyncHTTPTransport(verify=tls, limits=limits)
    if isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend())
    return transport


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default TLS context (the system's CA certificates), loaded once: ~36 ms each time."""
    return httpx.create_ssl_context()


class _Counted(httpx.AsyncByteStream):
    """A response body that gives its shard's slot back once, when it is closed."""

    def __init__(self, stream, in_flight: list[int], shard: int):
        self._stream, self._in_flight, self._shard, self._open = stream, in_flight, shard, True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._open:
                self._open = False
                self._in_flight[self._shard] -= 1
