"""Every request ends with exactly one usage record, however it ends, and its token counts are the engine's
own: the tiny model served in-process by a real uvicorn server (so clients really disconnect), the records
taken from the app's usage hook, the engine's counts read where it finishes a sequence."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from tests.api.engine_probe import EngineProbe
from tests.api.inprocess import InProcessServer
from thinkgate.api.app import create_app
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.providers.local import LocalProvider

MSGS = [{"role": "user", "content": "Tell me about the weather"}]
MODEL = "tiny"


@pytest.fixture(scope="module")
def served(engine_factory):
    eng = engine_factory("qwen3")
    probe = EngineProbe(eng)
    async_engine = AsyncEngine(eng)
    records = []
    app = create_app({MODEL: LocalProvider(async_engine, MODEL)}, on_usage=records.append)
    server = InProcessServer(app)
    yield server, probe, records, async_engine
    server.stop()
    async_engine.shutdown()


@pytest.fixture
def ctx(served):
    server, probe, records, async_engine = served
    probe.reset()
    seen = [len(records)]

    def new_record(timeout: float = 30):
        """The one record the last request produced (waits for it; fails on none or several)."""
        deadline = time.monotonic() + timeout
        while len(records) == seen[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # a second record, if there were one, would arrive by now
        fresh = records[seen[0]:]
        seen[0] = len(records)
        assert len(fresh) == 1, fresh
        return fresh[0]

    return server, probe, new_record, async_engine


def post(server, **body):
    return httpx.post(server.base + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, **body},
                      timeout=60)


def assert_exact(record, probe, may_be_empty=False, **expect):
    """The record counts exactly what the engine generated for the request; `expect` are its other fields."""
    generated = probe.generated(record.request_id)
    assert record.completion_tokens == generated and (generated > 0 or may_be_empty), (record, generated)
    assert record.model == MODEL and record.prompt_tokens > 0 and record.total_time_s > 0
    for k, v in expect.items():
        assert getattr(record, k) == v, (k, record)


def test_finished_by_eos(ctx):
    server, probe, new_record, async_engine = ctx
    eos = min(async_engine.engine.eos_ids)
    body = post(server, min_tokens=3, logit_bias={str(eos): 100}).json()
    rec = new_record()
    assert_exact(rec, probe, finish_reason="stop", native_finish_reason="eos", ended_by="finished")
    assert rec.completion_tokens == 4 == body["usage"]["completion_tokens"]
    assert rec.request_id == body["id"] and rec.time_to_first_token_s is not None


def test_stop_string(ctx):
    server, probe, new_record, _ = ctx
    greedy = post(server, temperature=0, max_tokens=30, ignore_eos=True).json()
    new_record()
    text = greedy["choices"][0]["message"]["reasoning"]
    stop = next(text[i:i + 3] for i in range(6, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
    body = post(server, temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]).json()
    rec = new_record()
    assert_exact(rec, probe, finish_reason="stop", native_finish_reason="stop_sequence", ended_by="finished")
    assert rec.completion_tokens == body["usage"]["completion_tokens"] < 30


def test_length_streamed_with_n_choices(ctx):
    server, probe, new_record, _ = ctx
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 5, "n": 2, "ignore_eos": True,
                            "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    rec = new_record()
    assert_exact(rec, probe, finish_reason="length", native_finish_reason="max_tokens", ended_by="finished",
                 choices=2)
    assert rec.completion_tokens == 10
    assert orjson.loads(lines[-2][6:])["usage"]["completion_tokens"] == 10


def test_tool_call(ctx):
    server, probe, new_record, _ = ctx
    tool = {"type": "function", "function": {"name": "t0", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}
    body = post(server, tools=[tool], tool_choice={"type": "function", "function": {"name": "t0"}},
                max_tokens=200, temperature=1.0, seed=0, reasoning={"max_tokens": 4}).json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    rec = new_record()
    assert_exact(rec, probe, finish_reason="tool_calls", native_finish_reason="grammar", ended_by="finished")
    assert rec.completion_tokens == body["usage"]["completion_tokens"]


def test_client_disconnects_mid_stream(ctx):
    server, probe, new_record, _ = ctx
    probe.delay_s = 0.02  # ~50 tokens/s: the client leaves long before the 400th
    seen = 0
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"reasoning"' in line:
                seen += 1
                if seen == 5:
                    break
    rec = new_record()
    assert_exact(rec, probe, ended_by="client_disconnect", native_finish_reason="abort")
    assert seen <= rec.completion_tokens < 400


def test_client_disconnects_before_the_first_token(ctx):
    server, probe, new_record, _ = ctx
    probe.open.clear()  # the engine's first step for this request waits
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as r:
        first = next(ln for ln in r.iter_lines() if ln.startswith("data: "))
        assert '"role":"assistant"' in first  # the role chunk needs no token; nothing else came
    time.sleep(0.5)  # the server notices the disconnect while the step is held
    probe.open.set()
    rec = new_record()
    assert_exact(rec, probe, ended_by="client_disconnect", may_be_empty=True)
    assert rec.completion_tokens <= 1  # at most the token of the step that was already running


def test_client_disconnects_from_a_non_streaming_request(ctx):
    server, probe, new_record, _ = ctx
    probe.delay_s = 0.02
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", timeout=1.0,
                   json={"model": MODEL, "messages": MSGS, "max_tokens": 400, "ignore_eos": True})
    rec = new_record()
    assert_exact(rec, probe, ended_by="client_disconnect", native_finish_reason="abort")
    assert rec.completion_tokens < 400


def test_abort_by_the_server(ctx):
    server, probe, new_record, async_engine = ctx
    probe.delay_s = 0.02
    finish = None
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("reasoning") and finish is None:
                async_engine.abort(chunk["id"] + "-0")
                finish = "asked"
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["native_finish_reason"]
                usage = chunk["usage"]
    assert finish == "abort"
    rec = new_record()
    assert_exact(rec, probe, ended_by="finished", native_finish_reason="abort")
    assert rec.completion_tokens == usage["completion_tokens"] < 400


def test_error_after_generation_started(ctx):
    server, probe, new_record, _ = ctx
    probe.fail_after = 3
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 50, "ignore_eos": True,
                            "stream": True}) as r:
        chunks = [orjson.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    errors = [c for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error"
    assert errors[0]["choices"][0]["finish_reason"] == "error"
    rec = new_record()
    assert_exact(rec, probe, ended_by="error", finish_reason="error", native_finish_reason="error")
    assert rec.completion_tokens == 3
