"""The local provider in-process (no HTTP): n choices share the prompt through the prefix cache."""

import asyncio

from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.providers.local import LocalProvider
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
        prep = await provider.prepare(req)
        chunks = [c async for c in provider.stream(req, prep, "chatcmpl-test", 0)]
        return prep, chunks

    try:
        prep, chunks = asyncio.run(run())
    finally:
        provider.engine.shutdown()
    full_blocks = (len(prep.prompt_ids) - 1) // 16 * 16
    assert full_blocks >= 96
    assert seen["chatcmpl-test-0"] == 0
    assert seen["chatcmpl-test-1"] == seen["chatcmpl-test-2"] == full_blocks
    assert chunks[-1]["usage"]["completion_tokens"] == 12
