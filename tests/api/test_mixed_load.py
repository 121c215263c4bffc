"""Many different valid requests at once: every one succeeds, nothing leaks, the server stays healthy."""

import asyncio
import random
import time

import httpx

FEATURES = [
    {}, {"temperature": 1.2, "top_k": 5}, {"top_p": 0.5, "seed": 3}, {"min_p": 0.2, "top_a": 0.3},
    {"logprobs": True, "top_logprobs": 3}, {"stop": ["a", "e"]}, {"n": 2, "seed": 9},
    {"frequency_penalty": 1.0, "presence_penalty": 0.5, "repetition_penalty": 1.3},
    {"response_format": {"type": "json_object"}, "reasoning": {"max_tokens": 2}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}],
     "tool_choice": "required", "reasoning": {"max_tokens": 1}},
    {"reasoning": {"effort": "low"}}, {"include_reasoning": False}, {"verbosity": "high"},
    {"logit_bias": {"10": 5, "11": -5}}, {"max_completion_tokens": 3},
]


def test_mixed_concurrent_requests(server):
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient, i: int):
        body = {"model": server.model_id, "messages": [{"role": "user", "content": f"request {i}"}],
                "max_tokens": rng.randint(4, 40), "stream": rng.random() < 0.5, **rng.choice(FEATURES)}
        if body["stream"]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
                return r.status_code, lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, "choices" in r.json()

    async def run():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(40)))

    results = asyncio.run(run())
    assert all(status == 200 and ok for status, ok in results), results
    deadline = time.monotonic() + 5
    while httpx.get(server.base + "/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.base + "/health").json()["active_requests"] == 0
