"""The upstream's wire: its event stream read from bytes however the network splits them, and the sharded
connection pool (requests spread over small pools, one connection reused by a lone client)."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import pytest

from tests.api.inprocess import InProcessServer
from tests.gateway.test_upstream import GOOD, USAGE, Upstreams, call, obj, provider
from thinkgate.gateway.providers.pool import ShardedTransport
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


def test_the_pool_spreads_concurrent_streams_over_its_shards_and_reuses_connections():
    seen: list = []
    server = InProcessServer(streaming_app(seen))
    try:
        async def run():
            transport = ShardedTransport(shards=8, max_connections=256, max_keepalive_connections=64)
            peak = []
            async with httpx.AsyncClient(base_url=server.base, transport=transport) as client:
                async def one():
                    async with client.stream("POST", "/v1/chat/completions", json={}) as r:
                        peak.append(list(transport.in_flight))
                        return b"".join([part async for part in r.aiter_raw()])

                bodies = await asyncio.gather(*(one() for _ in range(32)))
                after_burst = list(transport.in_flight)
                n_burst = len(set(seen))
                for _ in range(5):  # a lone client, one request after another
                    await one()
            return bodies, peak, after_burst, n_burst

        bodies, peak, after_burst, n_burst = asyncio.run(run())
    finally:
        server.stop()
    assert all(b.endswith(b"data: [DONE]\n\n") and b.count(b"data: {") == 3 for b in bodies)
    assert max(max(p) for p in peak) == 4  # 32 streams in flight: 4 on each of 8 shards, none on one pool alone
    assert after_burst == [0] * 8  # every closed response gave its slot back
    assert n_burst == 32
    # The five sequential requests took shard 0's kept-alive connection: no new connection for them.
    assert len(set(seen)) == 32
