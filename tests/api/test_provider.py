"""The local provider in-process (no HTTP): n choices share the prompt through the prefix cache."""

import asyncio

from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.providers.base import RequestContext, UsageEvent
from thinkgate.gateway.providers.local import LocalProvider
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest


def test_n_choices_prefill_the_prompt_once(engine_factory):
    eng = engine_factory("qwen3", block_size=16)
    provider = LocalProvider(AsyncEngine(eng), "tiny")
    seen = {}
    original = provider.engine.generate

    async def spy(request_id, *a, **k):
        async for out in original(request_id, *a, **k):
            if out.finished:
                seen[request_id] = out.num_cached_tokens
            yield out

    provider.engine.generate = spy
    req = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "word " * 120}], n=3,
                                max_tokens=4, seed=1)

    async def run():
        prep = await provider.prepare(validate_chat(req))
        events = [e async for e in provider.stream(prep, RequestContext("chatcmpl-test"))]
        return prep, events

    try:
        prep, events = asyncio.run(run())
    finally:
        provider.engine.shutdown()
    full_blocks = (len(prep.prompt_ids) - 1) // 16 * 16
    assert full_blocks >= 96
    assert seen["chatcmpl-test-0"] == 0
    assert seen["chatcmpl-test-1"] == seen["chatcmpl-test-2"] == full_blocks
    assert isinstance(events[-1], UsageEvent) and events[-1].record.completion_tokens == 12


def test_grammars_compile_in_prepare_before_anything_is_queued(engine_factory):
    """The constraint is compiled while the request is prepared (the server's side, before it reaches the
    engine), so a step of the engine never waits on a compile; `{"type": "text"}` compiles nothing."""
    eng = engine_factory("qwen3")
    provider = LocalProvider(AsyncEngine(eng), "tiny")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def req(rf):
        return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], n=2,
                                     response_format=rf)

    async def run():
        return [await provider.prepare(validate_chat(req(rf))) for rf in (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}, {"type": "json_object"},
            {"type": "text"}, None)]

    try:
        constrained, any_object, text, plain = asyncio.run(run())
        assert len(constrained.grammars) == 2 and len(any_object.grammars) == 2  # one matcher per choice
        assert constrained.grammars[0] is not constrained.grammars[1]
        assert text.grammars is None and plain.grammars is None
        assert not eng.has_unfinished() and not eng.seqs  # nothing reached the engine while compiling
    finally:
        provider.engine.shutdown()
