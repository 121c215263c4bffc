"""The upstream provider: over an injectable httpx transport (retries, fallback, 502/504/429, a stream cut
mid-way, missing usage, inline <think>, the breaker, the parameter map), and a second real thinkgate server
as the upstream of the first."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import httpx
import openai
import pytest

from tests.api.inprocess import InProcessServer, asgi_client
from tests.conftest import ServerProcess
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.errors import InvalidRequestError
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.providers.upstream import VLLM_PARAMETERS, Breaker, UpstreamBackend, UpstreamProvider
from thinkgate.gateway.service import Gateway
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.storage.accounts import AccountStore

MSGS = [{"role": "user", "content": "hi"}]


def obj(content=None, reasoning=None, finish=None, usage=None, index=0, tool_calls=None) -> dict:
    delta = {k: v for k, v in (("content", content), ("reasoning_content", reasoning),
                               ("tool_calls", tool_calls)) if v is not None}
    choices = [] if usage is not None and finish is None and not delta else [
        {"index": index, "delta": delta, "finish_reason": finish}]
    out = {"id": "up-1", "object": "chat.completion.chunk", "created": 0, "model": "remote", "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def sse(*objs, done: bool = True) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + (b"data: [DONE]\n\n" if done else b"")


USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
         "completion_tokens_details": {"reasoning_tokens": 1}}
GOOD = sse(obj(reasoning="think"), obj(content="Hel"), obj(content="lo"), obj(finish="stop"), obj(usage=USAGE))


class Upstreams:
    """A scripted transport: per backend host, a list of answers (status, body or callable) used in turn."""

    def __init__(self, **scripts):
        self.scripts = {h: list(s) for h, s in scripts.items()}
        self.calls: list[tuple[str, dict]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls.append((host, json.loads(request.content)))
        answer = self.scripts[host].pop(0) if len(self.scripts[host]) > 1 else self.scripts[host][0]
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return await answer(request)
        status, body, *headers = answer
        return httpx.Response(status, content=body, headers=headers[0] if headers else
                              {"content-type": "text/event-stream"})


def provider(transport, *hosts, think_in_content=False, first_byte_timeout_s=5.0, tokenizer=None, vision=False):
    backends = [UpstreamBackend(name=h, base_url=f"http://{h}/v1", remote_model="remote",
                                think_in_content=think_in_content, first_byte_timeout_s=first_byte_timeout_s)
                for h in hosts]
    return UpstreamProvider("up", backends, transport=httpx.MockTransport(transport), retries=1, backoff_s=0.01,
                            tokenizer=tokenizer, vision=vision)


def call(prov, records=None, **body):
    app = create_app({"up": prov}, on_usage=(records.append if records is not None else lambda r: None))

    async def run():
        async with asgi_client(app) as http:
            return await http.post("/v1/chat/completions", json={"model": "up", "messages": MSGS, **body})

    return asyncio.run(run())


def test_a_good_stream_maps_to_our_shapes_with_the_upstreams_usage():
    ups = Upstreams(a=[(200, GOOD)])
    records = []
    r = call(provider(ups, "a"), records, max_tokens=50, temperature=0.2, top_a=0.5, structured_outputs=True)
    body = r.json()
    msg = body["choices"][0]["message"]
    assert r.status_code == 200 and msg["content"] == "Hello" and msg["reasoning"] == "think"
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 3
    sent = ups.calls[0][1]
    assert sent["model"] == "remote" and sent["stream"] and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 50 and sent["temperature"] == 0.2
    assert "top_a" not in sent and "structured_outputs" not in sent  # unsupported dropped; ours never sent
    assert records[0].usage_source == "upstream" and records[0].prompt_tokens == 11 and records[0].backend == "a"


def test_parameter_map_sent_dropped_or_refused():
    prov = provider(Upstreams(a=[(200, GOOD)]), "a")
    backend = prov.backends["a"]

    def mapped(require=False, **kw):
        params = validate_chat(ChatCompletionRequest(model="up", messages=MSGS, **kw))
        return prov.map_request(params, backend, require)

    body = mapped(top_k=5, min_p=0.1, seed=3, stop=["x"], logprobs=True, top_logprobs=2, n=2,
                  response_format={"type": "json_object"}, reasoning={"enabled": False}, verbosity="low")
    for k in ("top_k", "min_p", "seed", "stop", "logprobs", "top_logprobs", "n", "response_format"):
        assert k in body, k
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning" not in body and "verbosity" not in body  # a vLLM takes neither
    with pytest.raises(InvalidRequestError) as e:
        mapped(require=True, top_a=0.3)
    assert e.value.param == "top_a"
    r = call(prov, top_a=0.3, provider={"require_parameters": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_a"


def test_a_500_is_retried_and_a_dead_backend_falls_over_to_the_next():
    ups = Upstreams(a=[(500, b"boom"), (200, GOOD)])
    assert call(provider(ups, "a")).status_code == 200 and [h for h, _ in ups.calls] == ["a", "a"]
    ups = Upstreams(a=[httpx.ConnectError("refused")], b=[(200, GOOD)])
    r = call(provider(ups, "a", "b"))
    assert r.status_code == 200 and [h for h, _ in ups.calls] == ["a", "a", "b"]
    ups = Upstreams(a=[httpx.ConnectError("refused")], b=[(200, GOOD)])
    r = call(provider(ups, "a", "b"), provider={"order": ["b", "a"]})
    assert r.status_code == 200 and [h for h, _ in ups.calls] == ["b"]
    ups = Upstreams(a=[httpx.ConnectError("refused")], b=[(200, GOOD)])
    r = call(provider(ups, "a", "b"), provider={"allow_fallbacks": False})
    assert r.status_code == 502 and {h for h, _ in ups.calls} == {"a"}


def test_garbage_502_slow_first_byte_504_and_429_with_retry_after():
    r = call(provider(Upstreams(a=[(200, b"<html>not sse</html>")]), "a"))
    assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"

    async def slow(request):
        async def body():
            await asyncio.sleep(2)
            yield GOOD

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    t = time.monotonic()
    r = call(provider(Upstreams(a=[slow]), "a", first_byte_timeout_s=0.3))
    assert r.status_code == 504 and time.monotonic() - t < 1.9 * 2
    r = call(provider(Upstreams(a=[(429, b"slow down", {"retry-after": "7"})]), "a"))
    assert r.status_code == 429 and r.headers["retry-after"] == "7"


def test_a_stream_cut_mid_way_ends_with_an_error_chunk_and_the_received_tokens_are_counted():
    async def cut(request):
        async def body():
            yield sse(obj(content="Hello there, "), obj(content="general"), done=False)
            raise httpx.ReadError("connection reset")

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    records = []
    r = call(provider(Upstreams(a=[cut]), "a"), records, stream=True)
    chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hello there, general"
    errors = [c for c in chunks if "error" in c]
    assert len(errors) == 1 and r.text.rstrip().endswith("data: [DONE]")
    rec = records[0]
    assert rec.ended_by == "error" and rec.usage_source == "estimate" and rec.completion_tokens > 0


def test_missing_usage_is_counted_with_the_tokenizer_and_marked(checkpoints):
    from thinkgate.models.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(checkpoints["qwen3"])
    records = []
    body = sse(obj(content="Hello world"), obj(finish="stop"))
    r = call(provider(Upstreams(a=[(200, body)]), "a", tokenizer=tok), records)
    rec = records[0]
    assert r.status_code == 200 and rec.usage_source == "tokenizer"
    assert rec.completion_tokens == len(tok.encode("Hello world")) > 0 and rec.prompt_tokens > 0


def test_inline_think_is_split_for_backends_marked_so():
    body = sse(obj(content="<thi"), obj(content="nk>plan</th"), obj(content="ink>\n\nAnswer"), obj(finish="stop"),
               obj(usage=USAGE))
    r = call(provider(Upstreams(a=[(200, body)]), "a", think_in_content=True))
    msg = r.json()["choices"][0]["message"]
    assert msg["reasoning"] == "plan" and msg["content"] == "Answer"


def test_the_breaker_opens_after_repeated_failures_and_closes_after_a_good_probe():
    b = Breaker(threshold=3, cooldown_s=0.2)
    b.failure()
    assert b.state == "closed" and b.allow()  # one error never disables a backend
    b.failure()
    b.failure()
    assert b.state == "open" and not b.allow()
    time.sleep(0.25)
    assert b.allow() and not b.allow()  # half-open: one probe at a time
    b.success()
    assert b.state == "closed"
    ups = Upstreams(a=[(500, b"x")])
    prov = provider(ups, "a")
    assert call(prov).status_code == 502  # two tries, two failures: still closed
    assert prov.health()["a"] == {"state": "closed", "consecutive_failures": 2}
    assert call(prov).status_code in (502, 503)  # the third failure opens it
    assert prov.health()["a"]["state"] == "open"
    calls = len(ups.calls)
    assert call(prov).status_code == 503 and len(ups.calls) == calls  # not tried while open


def test_a_second_thinkgate_is_the_upstream_of_the_first(checkpoints, tmp_path):
    upstream = ServerProcess(str(checkpoints["qwen3"]), extra=["--kv-cache-memory", str(64 * 2**20)])
    db = fresh_database("sqlite", tmp_path)
    try:
        store = AccountStore(db)
        store.create_account("a", balance_units=to_units("10"))
        secret = new_secret()
        store.create_key("a", "k", hash_secret(secret), display_prefix(secret))
        # A thinkgate upstream takes our own fields too (thinking budgets, top_a, ...).
        ours = VLLM_PARAMETERS | {"reasoning", "include_reasoning", "top_a", "verbosity"}
        prov = UpstreamProvider("front", [UpstreamBackend("back", upstream.base + "/v1", upstream.model_id,
                                                          parameters=ours)], context_length=4096)
        price = Price.cny("1", "2")
        gateway = Gateway(db, {"front": price}, require_keys=True, limiter=MemoryRateLimiter())
        gateway.start_sync()
        front = InProcessServer(create_app({"front": prov}, gateway=gateway))
        c = openai.OpenAI(base_url=front.base + "/v1", api_key=secret, max_retries=0, timeout=60)
        direct = upstream.client()
        kw = dict(messages=[{"role": "user", "content": "Tell me about the weather"}], max_tokens=12, seed=3,
                  temperature=0, extra_body={"ignore_eos": True, "logit_bias": {"1025": 8}})
        a = c.chat.completions.create(model="front", **kw)
        b = direct.chat.completions.create(model=upstream.model_id, **kw)
        assert a.choices[0].message.content == b.choices[0].message.content
        # The front cannot know the upstream's template: an empty reasoning comes back as null (hybrid).
        assert (a.choices[0].message.model_extra["reasoning"] or "") == b.choices[0].message.model_extra["reasoning"]
        assert a.usage.completion_tokens == b.usage.completion_tokens
        assert a.usage.prompt_tokens == b.usage.prompt_tokens
        cost = price.cost(a.usage.prompt_tokens, a.usage.completion_tokens)
        assert to_units(Decimal(str(a.usage.model_extra["cost"]))) == cost
        assert store.account("a").balance_units == to_units("10") - cost
        streamed = list(c.chat.completions.create(model="front", stream=True, **kw))
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == \
            a.choices[0].message.content
        tool = {"type": "function", "function": {"name": "t0", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}
        r = c.chat.completions.create(model="front", messages=MSGS, tools=[tool], max_tokens=120, temperature=1.0,
                                      seed=0, tool_choice={"type": "function", "function": {"name": "t0"}},
                                      extra_body={"reasoning": {"max_tokens": 4}})
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls[0].function.name == "t0"
        # No other keys, and a seed: random weights never run out of the 60 tokens inside a string of their own.
        schema = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 999}}, "required": ["a"],
                  "additionalProperties": False}
        r = c.chat.completions.create(model="front", messages=MSGS, max_tokens=60, seed=1, extra_body={
            "reasoning": {"enabled": False}},
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert isinstance(json.loads(r.choices[0].message.content)["a"], int)
        front.stop()
    finally:
        upstream.stop()
        db.dispose()


async def stream_and_leave(prov, after: int) -> tuple[list, float]:
    """One request's events from `prov`, the client leaving once `after` of them arrived; and when it left."""
    from thinkgate.gateway.providers.base import RequestContext

    prep = await prov.prepare(validate_chat(ChatCompletionRequest(model="up", messages=MSGS)))
    ctx = RequestContext("chatcmpl-x")
    events, left = [], 0.0
    async for ev in prov.stream(prep, ctx):
        events.append(ev)
        if len(events) == after:
            ctx.cancelled.set()
            left = time.monotonic()
    return events, left


def test_a_client_that_leaves_closes_the_upstream_request_at_once():
    closed = asyncio.Event()

    async def endless(request):
        async def body():
            try:
                yield sse(obj(content="a"), done=False)
                while True:
                    await asyncio.sleep(0.01)
                    yield sse(obj(content="b"), done=False)
            finally:
                closed.set()  # the upstream saw its client go: vLLM aborts the request here

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    from thinkgate.gateway.providers.base import UsageEvent

    async def run():
        events, _ = await stream_and_leave(provider(Upstreams(a=[endless]), "a"), after=3)
        await asyncio.wait_for(closed.wait(), 2)
        return events

    events = asyncio.run(run())
    rec = events[-1].record
    assert isinstance(events[-1], UsageEvent) and rec.ended_by == "client_disconnect"
    assert rec.native_finish_reason == "client_disconnect" and rec.completion_tokens > 0


def test_a_client_that_leaves_before_the_first_event_closes_the_upstream_request_at_once():
    closed = asyncio.Event()

    async def prefilling(request):  # headers, then nothing for a long while (a long prompt's prefill)
        async def body():
            try:
                while True:
                    await asyncio.sleep(0.01)
                    yield b": still here\n\n"
            finally:
                closed.set()

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    from thinkgate.gateway.providers.base import RequestContext, UsageEvent

    async def run():
        prov = provider(Upstreams(a=[prefilling]), "a", first_byte_timeout_s=60)
        prep = await prov.prepare(validate_chat(ChatCompletionRequest(model="up", messages=MSGS)))
        ctx = RequestContext("chatcmpl-x")
        asyncio.get_running_loop().call_later(0.1, ctx.cancelled.set)
        t0 = time.monotonic()
        events = [ev async for ev in prov.stream(prep, ctx)]
        await asyncio.wait_for(closed.wait(), 2)
        return events, time.monotonic() - t0

    events, took = asyncio.run(run())
    assert took < 2  # not the 60 s first-byte timeout
    assert len(events) == 1 and isinstance(events[0], UsageEvent)
    assert events[0].record.ended_by == "client_disconnect" and events[0].record.prompt_tokens == 0


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "iVBORw0KGgo" * 3000, "detail": "low"}}
LOOK = [{"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}]


def test_an_image_part_reaches_a_vision_upstream_unchanged():
    ups = Upstreams(a=[(200, GOOD)])
    records = []
    r = call(provider(ups, "a", vision=True), records, messages=LOOK, max_tokens=50)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"
    assert ups.calls[0][1]["messages"] == LOOK  # the part as the client wrote it, detail included
    assert records[0].prompt_tokens == 11  # billed on the upstream's count, not on the data URL's bytes
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
    r = call(provider(Upstreams(a=[(200, GOOD)]), "a", vision=True), messages=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"


def test_a_large_image_is_held_as_image_tokens_not_as_its_bytes():
    prov = provider(Upstreams(a=[(200, GOOD)]), "a", vision=True)
    prep = asyncio.run(prov.prepare(validate_chat(ChatCompletionRequest(model="up", messages=LOOK))))
    assert prep.prompt_tokens < 2000 < len(IMAGE["image_url"]["url"])


def test_a_text_only_upstream_refuses_an_image_naming_the_model():
    ups = Upstreams(a=[(200, GOOD)])
    r = call(provider(ups, "a"), messages=LOOK)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages[1].content" and "'up'" in err["message"]
    assert "image" in err["message"] and ups.calls == []  # refused before anything is sent
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]
    r = call(provider(ups, "a", vision=True), messages=audio)
    assert r.status_code == 400 and "input_audio" in r.json()["error"]["message"] and ups.calls == []


def test_admin_backends_shows_each_models_backends_and_breaker_state(engine_factory, tmp_path):
    from thinkgate.engine.async_engine import AsyncEngine
    from thinkgate.gateway.providers.local import LocalProvider

    ups = Upstreams(a=[httpx.ConnectError("refused")], b=[(200, GOOD)])
    prov = provider(ups, "a", "b")
    local = LocalProvider(AsyncEngine(engine_factory("qwen3")), "tiny")
    db = fresh_database("sqlite", tmp_path)
    gateway = Gateway(db, {"up": Price(), "tiny": Price()}, require_keys=False, limiter=MemoryRateLimiter())
    gateway.start_sync()
    app = create_app({"up": prov, "tiny": local}, gateway=gateway, admin_token="admin-secret")

    async def run():
        async with asgi_client(app) as http:
            r = await http.post("/v1/chat/completions", json={"model": "up", "messages": MSGS})
            assert r.status_code == 200  # a failed twice, b answered
            refused = await http.get("/admin/backends", headers={"Authorization": "Bearer wrong"})
            return refused, await http.get("/admin/backends", headers={"Authorization": "Bearer admin-secret"})

    try:
        refused, r = asyncio.run(run())
    finally:
        local.engine.shutdown()
        db.dispose()
    assert refused.status_code == 401 and r.status_code == 200
    by_model = {m["model"]: m for m in r.json()["data"]}
    assert by_model["up"] == {"model": "up", "type": "openai", "active_requests": 0, "backends": [
        {"name": "a", "type": "openai", "base_url": "http://a/v1", "state": "closed", "consecutive_failures": 2},
        {"name": "b", "type": "openai", "base_url": "http://b/v1", "state": "closed", "consecutive_failures": 0}]}
    assert by_model["tiny"] == {"model": "tiny", "type": "local", "active_requests": 0,
                                "backends": [{"name": "local", "type": "local", "state": "running"}]}


def test_a_gateway_of_upstream_models_alone_never_imports_torch(tmp_path):
    """A gateway process in front of a vLLM cluster runs no engine: building its app and serving a request must
    not load torch (seconds of start-up and hundreds of MiB in every gateway process behind the balancer)."""
    import subprocess
    import sys

    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[[models]]\nid = "front"\nprice_input_per_1k = 0.00275\nprice_output_per_1k = 0.0095\n'
                       '[models.backend]\ntype = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
                       'remote_model = "x"\n')
    script = f"""
import argparse, asyncio, sys
import httpx
from thinkgate.cli import _serve_args, build_app
p = argparse.ArgumentParser(); _serve_args(p)
app, _ = build_app(p.parse_args(["--config", {str(catalog)!r}, "--no-auth", "--db", "sqlite:///{tmp_path}/g.db"]))
async def main():
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            assert (await c.get("/v1/models")).json()["data"][0]["id"] == "front"
            body = {{"model": "front", "messages": [{{"role": "user", "content": "hi"}}],
                    "tools": [{{"type": "function", "function": {{"name": "f", "parameters": {{}}}}}}]}}
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 502, r.text  # its upstream (port 9) is down
asyncio.run(main())
print("torch" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "False"
