"""HTTP/1.1 to the upstreams: a pool of kept-alive connections on asyncio's transports, each response parsed by
httptools (llhttp, in C: the parser uvicorn serves with).

Every token a gateway relays is one read of an upstream's chunked response. Through httpx's own transport that
read went through httpcore's connection (h11 parsing each chunk in Python, anyio locks around it) and pool (which
re-examines every connection it holds at each placement: quadratic in the connections open). Here a read that
finds data returns it without yielding, one that waits arms a timer only then, a placement takes the most recently
used idle connection, and a response closed from another task wakes its reader at once. It is an httpx transport:
the provider takes any other (the tests also give it httpx.MockTransport).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx

HIGH_WATER = 1 << 20  # body bytes read ahead before the socket is paused (a reader that does not keep up)
LOW_WATER = 1 << 18  # request bytes gathered before a write; below it the head and body leave in one write
DEFAULT_TIMEOUT = 5.0  # httpx's, for a request that brings no timeout extension
Key = tuple[bytes, bytes, int]


class _Connection(asyncio.Protocol):
    """One connection. Its current response's head and body arrive through the parser's callbacks."""

    def __init__(self, key: Key):
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.in_use = False
        self.counted = True  # in the pool's count of open connections, until the pool closes it
        self.closed = False  # gone, from either side
        self.error: httpx.HTTPError | None = None  # why it closed, if not cleanly
        self.idle_since = 0.0
        self.waiter: asyncio.Future | None = None  # a reader waiting for the head, body or end
        self.drain: asyncio.Future | None = None  # a write waiting for the transport's buffer to empty
        self.write_paused = False
        self.paused = False  # reading paused past HIGH_WATER
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False  # the response's last byte arrived
        self.keep_alive = False  # the response allows a next request on this connection
        self.framed = False  # the body has a length or chunks (else it ends with the connection)
        self.body: list[bytes] = []
        self.buffered = 0

    # -- asyncio's protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.in_use or self.complete:  # bytes nobody asked for: the connection can't be trusted again
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.error = httpx.RemoteProtocolError(f"the upstream's response is not HTTP/1.1: {e}")
            self.transport.close()
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close: HTTP/1.1 has nothing to send after the peer's end

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and not self.framed and self.error is None and exc is None:
            self.complete = True  # a body of no stated length ends with the connection (RFC 9112 6.3)
        if self.error is None and exc is not None:
            self.error = httpx.ReadError(str(exc) or type(exc).__name__)
        self._wake()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # -- httptools' callbacks ---------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.framed = self.framed or self.parser.get_status_code() in (204, 304)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # asked later, the parser has reset for a next message

    # -- for the transport ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def usable(self, fresh_after: float) -> bool:
        return not self.closed and not self.transport.is_closing() and self.idle_since >= fresh_after

    def write(self, data: bytes) -> None:
        if self.closed or self.transport.is_closing():
            raise httpx.WriteError("the connection is closed")
        self.transport.write(data)

    async def drained(self, timeout: float | None) -> None:
        if self.write_paused:
            self.drain = asyncio.get_running_loop().create_future()
            try:
                await _wait(self.drain, timeout, httpx.WriteTimeout, "writing to the upstream timed out")
            finally:
                self.drain = None
            if self.closed:
                raise httpx.WriteError(str(self.error) if self.error else "the connection closed")

    async def wait(self, timeout: float | None) -> None:
        """Until the parser has more for the reader, or the connection ends."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await _wait(self.waiter, timeout, httpx.ReadTimeout, "the upstream sent nothing in time")
        finally:
            self.waiter = None

    def failure(self) -> Exception:
        if self.error is not None:
            return self.error
        if not self.headers_done:
            return httpx.RemoteProtocolError("the upstream closed the connection without a response")
        return httpx.RemoteProtocolError("the upstream closed the connection in the middle of the response")


async def _wait(fut: asyncio.Future, timeout: float | None, exc: type[Exception], message: str) -> None:
    """Wait for `fut`, failing with `exc` past `timeout` seconds: a timer armed only when a read or write waits."""
    timer = asyncio.get_running_loop().call_later(timeout, _expire, fut, exc, message) if timeout is not None else None
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()


def _expire(fut: asyncio.Future, exc: type[Exception], message: str) -> None:
    if not fut.done():
        fut.set_exception(exc(message))


class H1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 only (what vLLM, SGLang and OpenAI-compatible servers speak), no proxies. `max_connections`
    counts every connection open; past it a request waits (the `pool` timeout) for one to come free."""

    def __init__(self, max_connections: int = 256, max_keepalive_connections: int = 64, keepalive_expiry: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive_connections
        self.keepalive_expiry = keepalive_expiry
        self.ssl_context = ssl_context
        self.idle: dict[Key, list[_Connection]] = {}  # most recently used last
        self.n_open = 0  # open or opening
        self.n_idle = 0
        self.waiters: deque[asyncio.Future] = deque()  # requests waiting for a connection to come free
        self.is_closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.is_closed:
            raise RuntimeError("the transport is closed")
        t = request.extensions.get("timeout") or {}
        conn = await self._acquire(request, t.get("pool", DEFAULT_TIMEOUT), t.get("connect", DEFAULT_TIMEOUT))
        read_timeout = t.get("read", DEFAULT_TIMEOUT)
        try:
            await self._send(conn, request, t.get("write", DEFAULT_TIMEOUT))
            while not conn.headers_done:
                if conn.closed or conn.error is not None:
                    raise conn.failure()
                await conn.wait(read_timeout)
        except BaseException:
            self._close(conn)
            raise
        return httpx.Response(conn.parser.get_status_code(), headers=conn.headers,
                              stream=_Body(self, conn, read_timeout), extensions={"http_version": b"HTTP/1.1"})

    async def _send(self, conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
        head += [b"%s: %s\r\n" % (name, value) for name, value in request.headers.raw]
        head.append(b"\r\n")
        pending, size = [b"".join(head)], 0
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        async for part in request.stream:
            if not part:
                continue
            pending.append(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            size += len(part)
            if size >= LOW_WATER:
                conn.write(b"".join(pending))
                pending, size = [], 0
                await conn.drained(timeout)
        if chunked:
            pending.append(b"0\r\n\r\n")
        if pending:
            conn.write(b"".join(pending))

    # -- the pool ---------------------------------------------------------------------------------------------
    async def _acquire(self, request: httpx.Request, pool_timeout: float | None,
                       connect_timeout: float | None) -> _Connection:
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        while True:
            idle = self.idle.get(key)
            fresh_after = time.monotonic() - self.keepalive_expiry
            while idle:
                conn = idle.pop()
                self.n_idle -= 1
                if conn.usable(fresh_after):
                    conn.in_use = True
                    return conn
                self._close(conn)
            if self.n_open >= self.max_connections:
                self._close_an_idle_one()
            if self.n_open < self.max_connections:
                break
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await _wait(fut, pool_timeout, httpx.PoolTimeout, "no connection to the upstream came free in time")
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._wake_one()  # woken, then cancelled before taking the slot: the next waiter gets it
                raise
            finally:
                if fut in self.waiters:
                    self.waiters.remove(fut)
        self.n_open += 1
        try:
            conn = await self._connect(key, connect_timeout)
        except BaseException:
            self.n_open -= 1
            self._wake_one()
            raise
        conn.in_use = True
        return conn

    async def _connect(self, key: Key, timeout: float | None) -> _Connection:
        scheme, host, port = key
        tls = (self.ssl_context or _default_tls()) if scheme == b"https" else None
        name = host.decode("ascii")
        loop = asyncio.get_running_loop()
        try:  # wait_for, not asyncio.timeout: this may run in an eager task's first step (thinkgate/eager.py)
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Connection(key), name, port, ssl=tls,
                                                                    server_hostname=name if tls else None), timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {name}:{port} timed out") from None
        except (OSError, ssl.SSLError) as e:
            raise httpx.ConnectError(str(e) or type(e).__name__) from e
        return conn

    def _release(self, conn: _Connection) -> None:
        """A response read to its end: its connection is kept for the next request, or closed."""
        conn.in_use = False
        if (conn.closed or self.is_closed or not conn.keep_alive
                or self.n_idle >= self.max_keepalive):
            self._close(conn)
            return
        conn._reset()
        conn.idle_since = time.monotonic()
        self.idle.setdefault(conn.key, []).append(conn)
        self.n_idle += 1
        self._wake_one()

    def _close(self, conn: _Connection) -> None:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()
        conn._wake()
        if conn.counted:
            conn.counted = False
            self.n_open -= 1
            self._wake_one()

    def _close_an_idle_one(self) -> None:
        """At the limit: the least recently used idle connection (any upstream) makes room."""
        oldest = min((c for conns in self.idle.values() for c in conns), key=lambda c: c.idle_since, default=None)
        if oldest is not None:
            self.idle[oldest.key].remove(oldest)
            self.n_idle -= 1
            self._close(oldest)

    def _wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def aclose(self) -> None:
        self.is_closed = True
        for conns in self.idle.values():
            for conn in conns:
                self._close(conn)
        self.idle.clear()
        self.n_idle = 0


class _Body(httpx.AsyncByteStream):
    """A response's body as it arrives. Read to its end, the connection goes back to the pool; closed before,
    the connection is closed (the upstream then stops generating), and a reader in another task fails at once."""

    wakes_reader_on_close = True  # the provider needs no reader task of its own (upstream._Pumped)

    def __init__(self, pool: H1Transport, conn: _Connection, timeout: float | None):
        self.pool, self.conn, self.timeout = pool, conn, timeout
        self.state = "open"  # "released" (read to its end) or "dropped" (closed before)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        while True:
            if self.state != "open":
                if self.state == "dropped":
                    raise httpx.ReadError("the response was closed")
                return
            if conn.body:
                data = conn.body[0] if len(conn.body) == 1 else b"".join(conn.body)
                conn.body.clear()
                conn.buffered = 0
                if conn.paused:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield data
            elif conn.complete:
                self.state = "released"
                self.pool._release(conn)
            elif conn.closed or conn.error is not None:
                failure = conn.failure()
                self._drop()
                raise failure
            else:
                await conn.wait(self.timeout)

    def _drop(self) -> None:
        if self.state == "open":
            self.state = "dropped"
            self.pool._close(self.conn)

    async def aclose(self) -> None:
        if self.state != "open":
            return
        if self.conn.complete:  # all of it arrived, read or not: the connection can serve again
            self.state = "released"
            self.pool._release(self.conn)
            return
        self._drop()  # a reader waiting in another task wakes to the ReadError


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """httpx's default TLS context (the system's CA certificates), loaded once: ~36 ms each time."""
    return httpx.create_ssl_context()
