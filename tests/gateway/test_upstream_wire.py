"""The upstream's wire: its event stream read from bytes however the network splits them, and the sharded
connection pool (requests spread over small pools, one connection reused by a lone client)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import httpx
import pytest

from tests.api.inprocess import InProcessServer
from tests.gateway.test_upstream import GOOD, USAGE, Upstreams, call, obj, provider, stream_and_leave
from thinkgate.gateway.providers.h1 import H1Transport
from thinkgate.gateway.providers.sse_reader import split_lines


def test_lines_end_with_lf_crlf_or_cr_even_across_reads():
    assert split_lines(b"", b"a\nb\r\nc\rd") == ([b"a", b"b", b"c"], b"d")
    lines, rest = split_lines(b"", b"x\r")  # the \n may be in the next read: not an empty line in between
    assert (lines, rest) == ([], b"x\r")
    assert split_lines(rest, b"\ny\n") == ([b"x", b"y"], b"")
    assert split_lines(b"x\r", b"y\n") == ([b"x", b"y"], b"")  # a lone \r ends a line too


async def pieces(body: bytes, size: int):
    for i in range(0, len(body), size):
        yield body[i:i + size]
        await asyncio.sleep(0)


@pytest.mark.parametrize("size", [1, 3, 7, 4096])
def test_an_event_stream_split_anywhere_reads_the_same(size):
    # CRLF line ends, an `id:` and a `retry:` field and a comment, as an SSE server may send them
    body = (b": keep-alive\r\nretry: 1000\r\n\r\n"
            + GOOD.replace(b"\n\n", b"\r\nid: 7\r\n\r\n"))

    async def answer(request):
        return httpx.Response(200, content=pieces(body, size), headers={"content-type": "text/event-stream"})

    records = []
    r = call(provider(Upstreams(a=[answer]), "a"), records, max_tokens=50)
    msg = r.json()["choices"][0]["message"]
    assert r.status_code == 200 and msg["content"] == "Hello" and msg["reasoning"] == "think"
    assert records[0].usage_source == "upstream" and records[0].completion_tokens == USAGE["completion_tokens"]


def test_a_gzipped_event_stream_is_decoded():
    async def answer(request):
        return httpx.Response(200, content=pieces(gzip.compress(GOOD), 5),
                              headers={"content-type": "text/event-stream", "content-encoding": "gzip"})

    r = call(provider(Upstreams(a=[answer]), "a"), max_tokens=50)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"


def test_a_line_that_is_not_sse_is_garbage_and_a_502():
    async def answer(request):
        return httpx.Response(200, content=pieces(b"<html>oops</html>\n", 4),
                              headers={"content-type": "text/event-stream"})

    r = call(provider(Upstreams(a=[answer]), "a"), max_tokens=50)
    assert r.status_code == 502 and "not an event stream" in r.json()["error"]["message"]


def streaming_app(seen: list):
    """An ASGI app answering each POST with an event stream of three chunks 30 ms apart; it notes each
    request's client address (one per connection)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["client"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for text in ("a", "b", "c"):
            await asyncio.sleep(0.03)
            await send({"type": "http.response.body", "more_body": True,
                        "body": b"data: " + json.dumps(obj(content=text)).encode() + b"\n\n"})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def test_concurrent_streams_get_a_connection_each_and_a_lone_client_reuses_one():
    seen: list = []
    server = InProcessServer(streaming_app(seen))
    try:
        async def run():
            transport = H1Transport(max_connections=256, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=server.base, transport=transport) as client:
                async def one():
                    async with client.stream("POST", "/v1/chat/completions", json={}) as r:
                        return b"".join([part async for part in r.aiter_raw()])

                bodies = await asyncio.gather(*(one() for _ in range(32)))
                counts = (transport.n_open, transport.n_idle)
                n_burst = len(set(seen))
                for _ in range(5):  # a lone client, one request after another
                    await one()
            return bodies, counts, n_burst

        bodies, counts, n_burst = asyncio.run(run())
    finally:
        server.stop()
    assert all(b.endswith(b"data: [DONE]\n\n") and b.count(b"data: {") == 3 for b in bodies)
    assert n_burst == 32 and counts == (32, 32)  # every response read to its end gave its connection back
    # The five sequential requests took a kept-alive connection: no new connection for them.
    assert len(set(seen)) == 32


def test_past_the_connection_limit_a_request_waits_for_one_to_come_free():
    seen: list = []
    server = InProcessServer(streaming_app(seen))
    try:
        async def run():
            transport = H1Transport(max_connections=2)
            async with httpx.AsyncClient(base_url=server.base, transport=transport) as client:
                async def one():
                    async with client.stream("POST", "/v1/chat/completions", json={}) as r:
                        return b"".join([part async for part in r.aiter_raw()])

                return await asyncio.gather(*(one() for _ in range(6)))

        bodies = asyncio.run(run())
    finally:
        server.stop()
    assert all(b.count(b"data: {") == 3 for b in bodies)
    assert len(set(seen)) == 2


def test_a_response_closed_from_another_task_wakes_its_reader_and_closes_the_connection():
    closed = []

    def handler(conn):  # the head and one event, then nothing until the client goes
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"6\r\ndata: \r\n")
        conn.settimeout(5)
        try:
            closed.append(conn.recv(100) == b"")
        except OSError:
            closed.append(False)

    async def run(port):
        transport = H1Transport()
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/", content=b"{}",
                                extensions={"timeout": httpx.Timeout(5.0).as_dict()})
        response = await transport.handle_async_request(request)
        parts = []

        async def read():
            async for part in response.stream:
                parts.append(part)

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await response.aclose()
        with pytest.raises(httpx.ReadError):
            await reader
        return parts, time.monotonic() - t0, transport.n_open

    with raw_server(handler) as port:
        parts, took, n_open = asyncio.run(run(port))
        deadline = time.monotonic() + 3
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
    assert parts == [b"data: "] and took < 0.5 and n_open == 0
    assert closed == [True]  # the upstream saw the connection close: it stops generating


def test_a_response_that_is_not_http_is_a_protocol_error():
    def handler(conn):
        read_request(conn)
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        time.sleep(0.5)
        conn.close()

    with raw_server(handler) as port, pytest.raises(httpx.RemoteProtocolError):
        fetch(port)


def test_a_stream_cut_mid_body_is_an_error_and_a_body_without_length_ends_with_the_connection():
    def cut(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        conn.close()

    def unframed(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        conn.close()

    with raw_server(cut) as port, pytest.raises(httpx.RemoteProtocolError):
        fetch(port)
    with raw_server(unframed) as port:
        assert fetch(port) == [b"all of it"]


# -- the transport (h1.py) over real sockets ----------------------------------------------------------
@contextlib.contextmanager
def raw_server(handler):
    """A TCP server on loopback in a thread, its port; `handler(conn)` answers each connection."""
    sock = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def recv_some(conn) -> bytes:
    """The next bytes, or ConnectionError once the peer has closed (a loop on an empty read would spin: such a
    handler thread once outlived its test and slowed the rest of the suite by half)."""
    data = conn.recv(65536)
    if not data:
        raise ConnectionError("the client closed the connection")
    return data


def read_request(conn, pace_s: float = 0.0) -> tuple[bytes, bytes]:
    """A request's head and body; `pace_s` between reads of the body makes a slow reader."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += recv_some(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")),
                      b"0"))
    while len(body) < length:
        time.sleep(pace_s)
        body += recv_some(conn)
    return head, body


def fetch(port, *, timeout=5.0, tls=None, scheme="http", n=1, read_slowly=False) -> list[bytes]:
    async def run():
        transport = H1Transport(ssl_context=tls)
        out = []
        async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
            for _ in range(n):
                async with client.stream("POST", f"{scheme}://localhost:{port}/v1/x", json={"a": 1}) as r:
                    parts = []
                    async for part in r.aiter_raw():
                        parts.append(part)
                        if read_slowly:
                            await asyncio.sleep(0.001)
                    out.append(b"".join(parts))
        return out

    return asyncio.run(run())


def test_a_server_that_stalls_is_a_read_timeout():
    def handler(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        time.sleep(3)
        conn.close()

    with raw_server(handler) as port:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            fetch(port, timeout=0.3)
        assert time.monotonic() - t0 < 2


def test_a_refused_connection_is_a_connect_error():
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(httpx.ConnectError):
        fetch(port)


def test_a_connection_the_server_closed_while_idle_is_not_reused():
    connections = []

    def handler(conn):  # answers one request, then closes without saying so (as a keep-alive timeout does)
        connections.append(conn)
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        time.sleep(0.05)
        conn.close()

    with raw_server(handler) as port:
        async def run():
            async with httpx.AsyncClient(transport=H1Transport()) as client:
                bodies = []
                for _ in range(3):
                    bodies.append((await client.post(f"http://127.0.0.1:{port}/", json={})).content)
                    await asyncio.sleep(0.2)  # the server has closed the kept-alive connection by now
                return bodies

        assert asyncio.run(run()) == [b"ok"] * 3 and len(connections) == 3


def test_a_body_larger_than_the_read_ahead_arrives_whole_when_read_slowly():
    body = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: reading pauses past 1 MiB and resumes

    def handler(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        time.sleep(1)
        conn.close()

    with raw_server(handler) as port:
        assert fetch(port, read_slowly=True) == [body]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", d / "key.pem", "-out", d / "cert.pem"],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_https_upstreams_work_and_a_certificate_not_trusted_is_refused(tls_files):
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    def handler(conn):
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                while True:
                    read_request(tls)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecret")
        except (OSError, ssl.SSLError):
            pass

    with raw_server(handler) as port:
        trusted = ssl.create_default_context(cafile=str(cert))
        assert fetch(port, tls=trusted, scheme="https", n=2) == [b"secret"] * 2
        with pytest.raises(httpx.ConnectError):
            fetch(port, scheme="https")  # the system's CAs do not know this certificate


def test_the_upstream_body_is_compact_json_even_with_integers_orjson_refuses():
    from thinkgate.gateway.providers.upstream import _json_body

    assert _json_body({"model": "m", "messages": [{"content": "é"}]}) == '{"model":"m","messages":[{"content":"é"}]}'.encode()
    assert json.loads(_json_body({"maximum": 2**70})) == {"maximum": 2**70}


def test_a_request_body_larger_than_the_socket_buffers_is_sent_whole():
    body = bytes(range(256)) * (12 * 1024)  # 3 MiB: the transport's buffer fills and the write waits to drain
    got = []

    def handler(conn):
        got.append(read_request(conn, pace_s=0.001)[1])  # a slow reader
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        time.sleep(0.5)
        conn.close()

    async def run(port):
        async with httpx.AsyncClient(transport=H1Transport(), timeout=10) as client:
            return (await client.post(f"http://127.0.0.1:{port}/", content=body)).content

    with raw_server(handler) as port:
        assert asyncio.run(run(port)) == b"ok"
    assert got == [body]


def test_a_client_that_leaves_closes_a_real_upstream_connection_at_once():
    """The provider over our transport and a real socket: the run reads in its own task, and the client's leaving
    wakes that read by closing the connection (no reader task), which the upstream sees."""
    from thinkgate.gateway.providers.base import UsageEvent
    from thinkgate.gateway.providers.upstream import UpstreamBackend, UpstreamProvider

    gone = []

    def handler(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        event = b"data: " + json.dumps(obj(content="b")).encode() + b"\n\n"
        try:
            while True:
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                time.sleep(0.01)
        except OSError:
            gone.append(time.monotonic())

    async def run(port):
        prov = UpstreamProvider("up", [UpstreamBackend("a", f"http://127.0.0.1:{port}/v1", "remote")])
        events, left = await stream_and_leave(prov, after=4)
        await prov.aclose()
        return events, left

    with raw_server(handler) as port:
        events, left = asyncio.run(run(port))
        deadline = time.monotonic() + 3
        while not gone and time.monotonic() < deadline:
            time.sleep(0.01)
    record = events[-1].record
    assert isinstance(events[-1], UsageEvent) and record.ended_by == "client_disconnect"
    assert record.completion_tokens > 0 and len(events) <= 6  # nothing read past the leaving but what was in flight
    assert gone and gone[0] - left < 0.5


def test_a_waiter_woken_for_a_free_connection_and_then_cancelled_passes_it_on():
    seen: list = []
    server = InProcessServer(streaming_app(seen))

    def request():
        return httpx.Request("POST", server.base + "/v1/chat/completions", content=b"{}",
                             extensions={"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 1.0}})

    async def run():
        transport = H1Transport(max_connections=1)
        first = await transport.handle_async_request(request())
        second = asyncio.ensure_future(transport.handle_async_request(request()))
        third = asyncio.ensure_future(transport.handle_async_request(request()))
        await asyncio.sleep(0.05)  # both wait for the one connection
        await first.aclose()  # closed unread: the connection goes, and the first waiter is woken...
        second.cancel()  # ...and cancelled before it ran
        response = await third  # not a PoolTimeout after 1 s: the slot was passed on
        body = b"".join([part async for part in response.stream])
        await transport.aclose()
        return second.cancelled(), body

    try:
        cancelled, body = asyncio.run(run())
    finally:
        server.stop()
    assert cancelled and body.count(b"data: {") == 3
