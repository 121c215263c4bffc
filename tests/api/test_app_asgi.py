"""The API in-process over an ASGI transport with a scripted provider: where usage goes in a stream, error
shapes, the usage hook. No server process, no engine."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from openai import AsyncOpenAI

from tests.api.inprocess import asgi_client
from tests.api.schemas import validate
from tests.api.scripted_provider import ScriptedProvider
from thinkgate.api.app import create_app

MSGS = [{"role": "user", "content": "hi"}]


def make(provider=None, hook=None):
    provider = provider or ScriptedProvider()
    records = []
    app = create_app({provider.model_id: provider}, on_usage=hook or records.append)
    return app, provider, records


async def sse_chunks(http, **body):
    r = await http.post("/v1/chat/completions", json={"model": "scripted", "messages": MSGS, "stream": True, **body})
    assert r.status_code == 200, r.text
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(ln) for ln in lines[:-1]]


@pytest.mark.parametrize("n", [1, 3])
def test_without_include_usage_usage_rides_on_the_last_finish_chunk(n):
    app, _, records = make()

    async def run():
        async with asgi_client(app) as http:
            chunks = await sse_chunks(http, n=n)
            sdk = AsyncOpenAI(base_url="http://thinkgate.test/v1", api_key="x", http_client=http)
            stream = await sdk.chat.completions.create(model="scripted", messages=MSGS, stream=True, n=n)
            # What much client code does: choices[0] of every chunk. No empty-choices chunk may come.
            firsts = [chunk.choices[0] async for chunk in stream]
            return chunks, firsts

    chunks, firsts = asyncio.run(run())
    assert all(c["choices"] for c in chunks)
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")
    with_usage = [c for c in chunks if c.get("usage")]
    assert with_usage == [chunks[-1]]
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == n
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * n and chunks[-1]["usage"]["prompt_tokens"] == 7
    assert len(firsts) == len(chunks)
    assert len(records) == 2 and records[0].completion_tokens == 2 * n


def test_include_usage_adds_the_empty_choices_chunk_as_openai_does():
    app, _, records = make()

    async def run():
        async with asgi_client(app) as http:
            return await sse_chunks(http, stream_options={"include_usage": True})

    chunks = asyncio.run(run())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert not any(c.get("usage") for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert [r.request_id for r in records] == [chunks[0]["id"]]


def test_non_streaming_body_and_one_record():
    app, _, records = make()

    async def run():
        async with asgi_client(app) as http:
            sdk = AsyncOpenAI(base_url="http://thinkgate.test/api/gpt/v1", api_key="x", http_client=http)
            return await sdk.chat.completions.with_raw_response.create(model="scripted", messages=MSGS)

    raw = asyncio.run(run())
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "Hello world"
    assert body["usage"]["completion_tokens"] == 2
    assert len(records) == 1 and records[0].request_id == body["id"] and records[0].ended_by == "finished"


def test_error_event_gives_500_or_an_error_chunk_and_still_a_record():
    app, _, records = make(ScriptedProvider(fail_with="the backend fell over"))

    async def run():
        async with asgi_client(app) as http:
            r = await http.post("/v1/chat/completions", json={"model": "scripted", "messages": MSGS})
            return r, await sse_chunks(http)

    r, chunks = asyncio.run(run())
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "the backend fell over", "type": "server_error", "param": None,
                                  "code": None}}
    err = [c for c in chunks if "error" in c]
    assert len(err) == 1 and err[0]["error"]["message"] == "the backend fell over"
    assert err[0]["choices"][0]["finish_reason"] == "error" and err[0]["usage"]["completion_tokens"] == 2
    assert [rec.ended_by for rec in records] == ["error", "error"]


def test_an_async_usage_hook_is_awaited_and_a_failing_one_does_not_break_the_response():
    seen = []

    async def hook(record):
        await asyncio.sleep(0)
        seen.append(record.request_id)

    def broken(record):
        raise RuntimeError("ledger down")

    async def run(app):
        async with asgi_client(app) as http:
            return await http.post("/v1/chat/completions", json={"model": "scripted", "messages": MSGS})

    assert asyncio.run(run(make(hook=hook)[0])).status_code == 200 and len(seen) == 1
    assert asyncio.run(run(make(hook=broken)[0])).status_code == 200


def test_validation_happens_before_the_provider_is_asked():
    app, provider, records = make()

    async def run():
        async with asgi_client(app) as http:
            return await http.post("/v1/chat/completions",
                                   json={"model": "scripted", "messages": MSGS, "temperature": 3})

    r = asyncio.run(run())
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert records == [] and provider.active == 0
