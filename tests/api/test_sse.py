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


def test_a_streaming_response_ends_when_its_client_leaves_and_passes_on_a_cancellation_from_outside():
    """RunStreamingResponse watches for the client's disconnect with a task of its own (not Starlette's task
    group): a disconnect ends the response quietly and abandons the run; the server cancelling the request
    (a shutdown) is not swallowed."""
    from thinkgate.api.provider_run import RunStreamingResponse

    class Run:
        abandoned = 0

        def abandon(self):
            Run.abandoned += 1

    async def endless():
        while True:
            yield b"data: x\n\n"
            await asyncio.sleep(0.01)

    async def scenario(leave: bool):
        sent, gone = [], asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        response = RunStreamingResponse(endless(), Run(), media_type="text/event-stream")
        task = asyncio.ensure_future(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send))
        await asyncio.sleep(0.05)
        gone.set() if leave else task.cancel()
        try:
            await asyncio.wait_for(task, 2)
        except asyncio.CancelledError:
            return "cancelled", len(sent)
        return "ended", len(sent)

    ended, n = asyncio.run(scenario(leave=True))
    assert ended == "ended" and n >= 3 and Run.abandoned == 1
    assert asyncio.run(scenario(leave=False))[0] == "cancelled" and Run.abandoned == 2
