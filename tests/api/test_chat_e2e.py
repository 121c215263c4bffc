"""End to end: a real `thinkgate serve` process, called with the official openai client."""

import json
import time

import httpx
import pytest

from tests.api.schemas import validate
from thinkgate.chat.template import render_chat
from thinkgate.models.tokenizer import ModelTokenizer

MSGS = [{"role": "user", "content": "Tell me about the weather"}]


@pytest.fixture(scope="module")
def tok(checkpoints):
    return ModelTokenizer.from_dir(checkpoints["qwen3"])


def test_models_endpoints(server):
    for base in ("/v1", "/api/gpt/v1"):
        listing = httpx.get(server.base + base + "/models").json()
        validate(listing, "ListModelsResponse")
        assert [m["id"] for m in listing["data"]] == [server.model_id]
        one = httpx.get(f"{server.base}{base}/models/{server.model_id}").json()
        assert one["id"] == server.model_id and one["context_length"] > 0
    r = httpx.get(server.base + "/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_non_streaming_shape_and_exact_usage(server, tok):
    c = server.client()
    raw = c.chat.completions.with_raw_response.create(model=server.model_id, messages=MSGS, max_tokens=12, seed=3,
                                                      extra_body={"ignore_eos": True})
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    raw.parse()  # the SDK accepts it too
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["native_finish_reason"] == "max_tokens"
    msg = choice["message"]
    assert msg["role"] == "assistant" and msg["refusal"] is None
    assert msg["reasoning"] == msg["reasoning_content"]
    prompt = render_chat(tok.chat_template, MSGS)
    u = body["usage"]
    assert u["prompt_tokens"] == len(tok.encode(prompt))
    assert u["completion_tokens"] == 12 and u["total_tokens"] == u["prompt_tokens"] + 12
    assert u["prompt_tokens_details"]["cached_tokens"] >= 0
    # The random model never closes its thinking, so every generated token is reasoning.
    assert u["completion_tokens_details"]["reasoning_tokens"] == 12
    assert msg["content"] == ""


def test_stream_concatenates_to_the_non_streaming_message(server):
    c = server.client()
    kw = dict(model=server.model_id, messages=MSGS, max_tokens=20, seed=11, temperature=1.0,
              extra_body={"ignore_eos": True, "logit_bias": {"1025": 8}})  # 1025 = </think>: make it close
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    body = {"messages": MSGS, "stream": True, **{k: v for k, v in kw.items() if k != "extra_body"}, **kw["extra_body"]}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for ln in lines[:-1]:
        validate(json.loads(ln), "CreateChatCompletionStreamResponse")
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning", None) or "" for ch in chunks if ch.choices)
    rc = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    msg = full.choices[0].message
    assert reasoning == rc == msg.reasoning
    assert content == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]


def test_seed_page_python_example_runs_on_both_base_paths(checkpoints):
    from tests.conftest import ServerProcess

    s = ServerProcess(str(checkpoints["qwen3"]), extra=["--kv-cache-memory", str(32 * 2**20)],
                      name="qwen/qwen3-235b-a22b-thinking-2507")
    try:
        for base in ("/api/gpt/v1", "/v1"):
            from openai import OpenAI

            client = OpenAI(
                base_url=s.base + base,
                api_key="API_KEY",
            )

            completion = client.chat.completions.create(
                model="qwen/qwen3-235b-a22b-thinking-2507",
                messages=[
                    {
                        "role": "user",
                        "content": "你好"
                    }
                ],
                max_tokens=16,  # the page leaves it unset (whole context); a cap keeps the test short
            )

            print(completion.choices[0].message.content)
            assert completion.model == "qwen/qwen3-235b-a22b-thinking-2507"
            assert completion.choices[0].message.content is not None
    finally:
        s.stop()


def test_thinking_budget_closes_reasoning_then_answers(server, tok):
    c = server.client()
    think_end = tok.token_id("</think>")
    resp = c.chat.completions.create(
        model=server.model_id, messages=MSGS, max_tokens=40, seed=5,
        extra_body={"reasoning": {"max_tokens": 16}, "ignore_eos": True,
                    "logit_bias": {str(think_end): -100}, "logprobs": False})  # the model itself never closes
    u = resp.usage
    assert u.completion_tokens_details.reasoning_tokens == 16
    assert resp.choices[0].message.content  # it answered after the forced </think>
    assert u.completion_tokens == 40
    # Streaming: same budget, reasoning deltas stop before the content starts.
    chunks = list(c.chat.completions.create(
        model=server.model_id, messages=MSGS, max_tokens=40, seed=5, stream=True,
        extra_body={"reasoning": {"max_tokens": 16}, "ignore_eos": True, "logit_bias": {str(think_end): -100}}))
    kinds = [("r" if getattr(ch.choices[0].delta, "reasoning", None) else "c")
             for ch in chunks if ch.choices and (ch.choices[0].delta.content or getattr(ch.choices[0].delta, "reasoning", None))]
    assert kinds and "c" in kinds and "".join(kinds).rstrip("c").count("c") == 0  # reasoning first, then content


def test_reasoning_effort_top_level_sets_the_thinking_budget(server, tok):
    """OpenAI's `reasoning_effort` (what LangChain and LiteLLM send) maps to the same budget as
    `reasoning.effort`: a fraction of the room left for the answer (here max_tokens=40)."""
    c = server.client()
    think_end = tok.token_id("</think>")

    def reasoning_tokens(**kw):
        r = c.chat.completions.create(model=server.model_id, messages=MSGS, max_tokens=40, seed=5, **kw)
        assert r.usage.completion_tokens == 40
        return r.usage.completion_tokens_details.reasoning_tokens

    body = {"ignore_eos": True, "logit_bias": {str(think_end): -100}}  # the model itself never closes
    assert reasoning_tokens(reasoning_effort="low", extra_body=body) == 8  # 0.2 of 40
    assert reasoning_tokens(reasoning_effort="high", extra_body=body) == 32  # 0.8 of 40
    assert reasoning_tokens(reasoning_effort="none", extra_body=body) == 0
    # Both given: `reasoning.effort` wins.
    assert reasoning_tokens(reasoning_effort="high", extra_body={**body, "reasoning": {"effort": "low"}}) == 8
    # No effort at all: the model thinks as long as it likes.
    assert reasoning_tokens(extra_body=body) == 40


def test_reasoning_exclude_hides_but_bills(server):
    c = server.client()
    resp = c.chat.completions.create(model=server.model_id, messages=MSGS, max_tokens=8, seed=1,
                                     extra_body={"reasoning": {"exclude": True}, "ignore_eos": True})
    assert resp.choices[0].message.reasoning is None
    assert resp.usage.completion_tokens_details.reasoning_tokens == 8
    resp = c.chat.completions.create(model=server.model_id, messages=MSGS, max_tokens=8, seed=1,
                                     extra_body={"include_reasoning": False, "ignore_eos": True})
    assert resp.choices[0].message.reasoning is None


def test_n_choices_logprobs_and_stop(server):
    c = server.client()
    resp = c.chat.completions.create(model=server.model_id, messages=MSGS, max_tokens=10, n=3, seed=7,
                                     temperature=1.0, logprobs=True, top_logprobs=3,
                                     extra_body={"ignore_eos": True, "reasoning": {"max_tokens": 2}})
    assert [ch.index for ch in resp.choices] == [0, 1, 2]
    assert resp.usage.completion_tokens == 30
    for ch in resp.choices:
        lp = ch.logprobs.content
        assert lp and all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in lp)
        assert all(e.bytes is not None for e in lp)
    texts = {ch.message.content for ch in resp.choices}
    assert len(texts) > 1  # independent choices


def test_max_tokens_is_capped_to_the_context(server, tok):
    c = server.client()
    resp = c.chat.completions.create(model=server.model_id, messages=MSGS, max_tokens=10**9, seed=2,
                                     extra_body={"stop_token_ids": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]},
                                     stop=["e", "a", "o", "i"])
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_aborts_the_request(server):
    body = {"model": server.model_id, "messages": MSGS, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.base + "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    break
        assert httpx.get(server.base + "/health").json()["active_requests"] >= 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if httpx.get(server.base + "/health").json()["active_requests"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(server.base + "/health").json()["active_requests"] == 0
    # and the server keeps serving, with nothing unhandled in its log
    assert server.client().chat.completions.create(model=server.model_id, messages=MSGS, max_tokens=2).choices
    server.log.flush()
    with open(server.log.name) as f:
        assert "Traceback" not in f.read()


def test_non_streaming_disconnect_aborts(server):
    body = {"model": server.model_id, "messages": MSGS, "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and httpx.get(server.base + "/health").json()["active_requests"]:
        time.sleep(0.05)
    assert httpx.get(server.base + "/health").json()["active_requests"] == 0
