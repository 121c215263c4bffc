"""SSE framing: keep-alive comments while waiting, errors after the headers travel in the stream."""

import asyncio

import orjson

from thinkgate.api.sse import sse
from thinkgate.errors import InvalidRequestError


async def _collect(gen):
    return [x async for x in gen]


def test_keepalive_comments_while_the_next_chunk_is_slow():
    """The chunks are read in the response's task: a keep-alive is the run's KEEPALIVE marker, asked for by the
    framing's timer and passed on by the renderer, never a chunk; one waiting chunk is not delayed by it."""
    from thinkgate.api.provider_run import ProviderRun
    from thinkgate.api.responses import render_chunks
    from thinkgate.gateway.providers.base import ChunkEvent, RequestContext, UsageEvent, UsageRecord

    async def slow():
        yield ChunkEvent([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        await asyncio.sleep(0.35)
        yield ChunkEvent([{"index": 0, "delta": {"content": "a"}, "finish_reason": None}])
        await asyncio.sleep(0.25)
        yield ChunkEvent([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        yield UsageEvent(UsageRecord("r", "m", 1, prompt_tokens=1, cached_prompt_tokens=0, completion_tokens=1,
                                     reasoning_tokens=0, finish_reason="stop", native_finish_reason="stop",
                                     ended_by="finished", time_to_first_token_s=0.35, total_time_s=0.6))

    async def main():
        ctx = RequestContext("r")
        run = ProviderRun(slow(), ctx, lambda record: None)
        assert await run.first_error() is None
        chunks = render_chunks(run, ctx, "m", 1, include_usage=True)
        return [x async for x in sse(chunks, keepalive_s=0.1, keepalive=run.keepalive)]

    frames = asyncio.run(main())
    data = [orjson.loads(f[6:]) for f in frames if f.startswith(b"data: {")]
    assert [d["choices"][0]["delta"] if d["choices"] else "usage" for d in data] == [
        {"role": "assistant", "content": ""}, {"content": "a"}, {}, "usage"]
    keepalives = [i for i, f in enumerate(frames) if f == b": keep-alive\n\n"]
    assert len(keepalives) >= 4 and frames[1] == b": keep-alive\n\n"  # while the second chunk was slow
    assert frames[-1] == b"data: [DONE]\n\n"

    async def quiet():  # no keep-alive asked for: none sent
        await asyncio.sleep(0.25)
        yield {"a": 1}

    assert asyncio.run(_collect(sse(quiet(), keepalive_s=0.1))) == [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]


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


def test_chat_and_responses_streams_keep_alive_while_the_provider_is_slow():
    """The keep-alive marker passes through each endpoint's converter to the framing (never into a chunk)."""
    from tests.api.inprocess import asgi_client
    from tests.api.scripted_provider import ScriptedProvider
    from thinkgate.api.app import create_app
    from thinkgate.config import ServerConfig

    app = create_app({"scripted": ScriptedProvider(words=("Hello", " world"), step_s=0.35)},
                     ServerConfig(keepalive_s=0.1))
    requests = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}, "/v1/responses": {"input": "hi"}}

    async def run():
        async with asgi_client(app) as http:
            out = {}
            for path, body in requests.items():
                r = await http.post(path, json={"model": "scripted", "stream": True, **body})
                assert r.status_code == 200, r.text
                out[path] = r.text
            return out

    for path, text in asyncio.run(run()).items():
        assert text.count(": keep-alive\n\n") >= 2, path
        data = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        assert "Hello" in orjson.dumps(data).decode() and " world" in orjson.dumps(data).decode(), path
