"""SSE framing: keep-alive comments while waiting, errors after the headers travel in the stream."""

import asyncio

import orjson

from thinkgate.api.sse import sse
from thinkgate.errors import InvalidRequestError


async def _collect(gen):
    return [x async for x in gen]


def test_keepalive_comments_while_the_next_chunk_is_slow():
    async def slow():
        await asyncio.sleep(0.35)
        yield {"a": 1}

    frames = asyncio.run(_collect(sse(slow(), keepalive_s=0.1)))
    assert frames.count(b": keep-alive\n\n") >= 2
    assert frames[-2] == b'data: {"a":1}\n\n' and frames[-1] == b"data: [DONE]\n\n"


def test_error_mid_stream_becomes_an_error_chunk_then_done():
    async def failing():
        yield {"a": 1}
        raise RuntimeError("boom")

    frames = asyncio.run(_collect(sse(failing(), keepalive_s=5)))
    assert frames[0] == b'data: {"a":1}\n\n'
    err = orjson.loads(frames[1][6:])
    assert err["error"]["type"] == "server_error" and frames[-1] == b"data: [DONE]\n\n"

    async def bad_request():
        raise InvalidRequestError("nope", param="x")
        yield  # pragma: no cover

    frames = asyncio.run(_collect(sse(bad_request(), keepalive_s=5)))
    assert orjson.loads(frames[0][6:])["error"]["param"] == "x"
