"""httpcore's network layer for the upstream connections, on asyncio's transports and protocols directly.

httpcore reaches asyncio through anyio, whose socket stream asks the loop to start reading before each read
that waits and to stop after it (two epoll changes per network read), and wraps each read in a cancel scope:
about 120 us of CPU per read on this project's 2-core machine, against ~60 us for the whole read through
asyncio's own streams (benchmarks/upstream_overhead.py; a token is one read). Here the protocol keeps reading
into a buffer (paused only past a high-water mark), a read that finds data returns it without yielding, one that
waits arms a timer only then, and a write goes to the transport at once. httpcore's connection and pool logic,
HTTP/1.1 parsing (h11) and TLS set-up are unchanged: this is the `network_backend` httpcore accepts.
"""

from __future__ import annotations

import asyncio
import ssl
import typing

import httpcore

HIGH_WATER = 1 << 20  # bytes read ahead before the socket is paused (a stream the reader does not keep up with)
LOW_WATER = 1 << 18


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None  # a read waiting for data
        self.paused = False  # reading paused past HIGH_WATER
        self.drain: asyncio.Future | None = None  # a write waiting for the transport's buffer to empty
        self.write_paused = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport: HTTP/1.1 has nothing to send after the peer's end

    def connection_lost(self, exc: BaseException | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _wait(fut: asyncio.Future, timeout: float | None, exc: type[Exception]) -> None:
    """Wait for `fut`, failing with `exc` past `timeout` seconds: a timer armed only when a read or write waits."""
    timer = asyncio.get_running_loop().call_later(timeout, _timeout, fut, exc) if timeout is not None else None
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()


def _timeout(fut: asyncio.Future, exc: type[Exception]) -> None:
    if not fut.done():
        fut.set_exception(exc())


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport, self._protocol = transport, protocol
        self._pending: list[bytes] = []  # written, not yet handed to the transport
        self._pending_bytes = 0

    def _flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending, self._pending_bytes = [], 0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._protocol
        if self._pending:
            self._flush()
        if not p.buffer and not p.eof:
            p.waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.waiter, timeout, httpcore.ReadTimeout)
            finally:
                p.waiter = None
        if not p.buffer:
            if p.error is not None:
                raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
            return b""  # the peer closed: h11 reads this as the connection's end
        data = p.buffer[0] if len(p.buffer) == 1 else b"".join(p.buffer)
        if len(data) > max_bytes:
            p.buffer = [data[max_bytes:]]
            data = data[:max_bytes]
        else:
            p.buffer = []
        p.buffered -= len(data)
        if p.paused and p.buffered < LOW_WATER:
            p.paused = False
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self._protocol
        if p.eof or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        # httpcore writes a request's head and then its body, and then reads the response: held until that read
        # (or the loop's next turn, whichever comes first), both leave in one segment and wake the server once.
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(buffer)
        self._pending_bytes += len(buffer)
        if self._pending_bytes < LOW_WATER:
            return
        self._flush()
        if p.write_paused:  # the kernel's send buffer is full: wait for it, within the timeout
            p.drain = asyncio.get_running_loop().create_future()
            try:
                await _wait(p.drain, timeout, httpcore.WriteTimeout)
            finally:
                p.drain = None
            if p.error is not None:
                raise httpcore.WriteError(str(p.error) or type(p.error).__name__)

    async def aclose(self) -> None:
        self._pending, self._pending_bytes = [], 0
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self._transport, self._protocol, ssl_context,
                                                 server_hostname=server_hostname)
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as e:
            self._transport.close()
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":  # an idle connection with data or an end waiting: the server closed it
            return bool(self._protocol.buffer) or self._protocol.eof
        name = {"client_addr": "sockname", "server_addr": "peername", "socket": "socket",
                "ssl_object": "ssl_object"}.get(info)
        return self._transport.get_extra_info(name) if name else None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, local_addr=(local_address, 0) if local_address else None)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        sock = transport.get_extra_info("socket")  # asyncio and uvloop set TCP_NODELAY themselves
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None
                                  ) -> AsyncioStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {path} timed out") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e) or type(e).__name__) from e
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
