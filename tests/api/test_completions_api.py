"""Legacy text completions (`POST /v1/completions`) on the tiny model with the official SDK: every prompt
form, echo, legacy logprobs, n, stop, streaming equal to the whole, usage equal to the engine's counts
(summed over prompts, one record for the hook, also on disconnect), bodies valid against OpenAI's published
schema; what cannot be served is a 400 naming the parameter; `/v1/embeddings` is a 404."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from tests.api.schemas import validate
from tests.api.served import MODEL, served_tiny
from thinkgate.models.tokenizer import ModelTokenizer

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tok(checkpoints):
    return ModelTokenizer.from_dir(checkpoints["qwen3"])


def create(client, **kw):
    """The SDK's completion, its body checked against the published schema first."""
    raw = client.completions.with_raw_response.create(**kw)
    validate(raw.http_response.json(), "CreateCompletionResponse", "completions")
    return raw.parse()


def test_string_prompt_shape_usage_and_default_max_tokens(server, tok):
    c = server.client()
    raw = c.completions.with_raw_response.create(model=server.model_id, prompt=PROMPT, extra_body={"ignore_eos": True})
    body = raw.http_response.json()
    validate(body, "CreateCompletionResponse", "completions")
    r = raw.parse()
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == server.model_id
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    # No chat template: the prompt is the text's own tokens; OpenAI's default cap of 16 tokens.
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert r.usage.completion_tokens == 16 and r.usage.total_tokens == r.usage.prompt_tokens + 16
    assert "<think>" not in choice.text


def test_prompt_forms_agree_and_index_choices_by_prompt(server, tok):
    c = server.client()
    other = "The weather"
    kw = dict(model=server.model_id, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    one = {p: c.completions.create(prompt=p, **kw).choices[0].text for p in (PROMPT, other)}
    assert c.completions.create(prompt=tok.encode(PROMPT), **kw).choices[0].text == one[PROMPT]
    for prompts in ([PROMPT, other], [tok.encode(PROMPT), tok.encode(other)]):
        r = create(c, prompt=prompts, n=2, **kw)
        assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
        assert [ch.text for ch in r.choices] == [one[PROMPT]] * 2 + [one[other]] * 2  # greedy: both choices agree
        assert r.usage.prompt_tokens == len(tok.encode(PROMPT)) + len(tok.encode(other))
        assert r.usage.completion_tokens == 4 * 6


def test_echo_puts_the_prompt_first(server, tok):
    c = server.client()
    kw = dict(model=server.model_id, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = c.completions.create(prompt=PROMPT, **kw).choices[0].text
    assert c.completions.create(prompt=PROMPT, echo=True, **kw).choices[0].text == PROMPT + plain
    ids = tok.encode(PROMPT)
    assert c.completions.create(prompt=ids, echo=True, **kw).choices[0].text == tok.decode(ids) + plain
    chunks = list(c.completions.create(prompt=PROMPT, echo=True, stream=True, **kw))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == PROMPT + plain


def test_logprobs_in_the_legacy_shape(server):
    r = create(server.client(), model=server.model_id, prompt=PROMPT, max_tokens=8, logprobs=3, temperature=1.0,
               seed=4, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert 0 < n <= 8 and len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False)] == [len(t) for t in lp.tokens[:-1]]


def test_stop_sequence_ends_the_text(server):
    c = server.client()
    kw = dict(model=server.model_id, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = c.completions.create(**kw).choices[0].text
    stop = text[4:7]
    assert stop.strip(), text
    r = c.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_stream_adds_up_to_the_whole_with_usage_last(server):
    c = server.client()
    kw = dict(model=server.model_id, prompt=[PROMPT, "The weather"], n=2, max_tokens=10, temperature=1.0, seed=9,
              extra_body={"ignore_eos": True})
    whole = c.completions.create(**kw)
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(ch.object == "text_completion" for ch in chunks)
    texts: dict[int, str] = {}
    finishes = {}
    for ch in chunks[:-1]:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(4)] == [ch.text for ch in whole.choices]
    assert finishes == {i: "length" for i in range(4)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # On the wire: every chunk the published shape (finish_reason is null until a choice ends), then [DONE].
    r = httpx.post(server.base + "/api/gpt/v1/completions", json={**kw.pop("extra_body"), **kw, "stream": True},
                   timeout=60)
    frames = [f.removeprefix("data: ") for f in r.text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    for f in frames[:-1]:
        body = json.loads(f)
        for choice in body["choices"]:
            choice["finish_reason"] = choice["finish_reason"] or "length"
        validate(body, "CreateCompletionResponse", "completions")


@pytest.mark.parametrize("body,param", [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": True, "logprobs": 2}, "echo"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": ["a"] * 33}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"stream": 1}, "stream"),
    ({"top_k": "ten"}, "top_k"),
])
def test_bad_requests_name_the_parameter(server, body, param):
    r = httpx.post(server.base + "/v1/completions", json={"model": server.model_id, "prompt": PROMPT, **body},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    validate({"error": {**err, "code": None}}, "ErrorResponse", "completions")  # `code`: see issue 18
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_missing_prompt_unknown_model_and_too_long(server):
    r = httpx.post(server.base + "/v1/completions", json={"model": server.model_id}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="no-such-model", prompt=PROMPT)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=server.model_id, prompt="word " * 5000)
    assert e.value.body["param"] == "prompt" and e.value.body["code"] == "context_length_exceeded"


def test_embeddings_answer_404_in_the_openai_shape(server):
    for base in ("/v1", "/api/gpt/v1"):
        with pytest.raises(openai.NotFoundError) as e:
            server.client(base).embeddings.create(model=server.model_id, input="hello")
        err = e.value.body
        assert err["type"] == "not_found_error" and err["param"] == "model" and "embedding" in err["message"]
        assert e.value.response.json() == {"error": err}


def test_one_usage_record_per_request_summed_over_prompts_and_on_disconnect(engine_factory, tok):
    with served_tiny(engine_factory) as s:
        r = s.client().completions.create(model=MODEL, prompt=[PROMPT, "The weather", "Hi"], n=2, max_tokens=5,
                                          extra_body={"ignore_eos": True})
        rec = s.record_after(0)
        assert rec.request_id == r.id and rec.choices == 6 and rec.ended_by == "finished"
        assert rec.prompt_tokens == r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in (PROMPT, "The weather",
                                                                                               "Hi"))
        assert rec.completion_tokens == r.usage.completion_tokens == 30
        body = {"model": MODEL, "prompt": [PROMPT, "Hi"], "max_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", s.base + "/v1/completions", json=body) as resp:
            data = (ln for ln in resp.iter_lines() if ln.startswith("data: "))
            for _ in range(6):
                next(data)
        rec = s.record_after(1)
        assert rec.request_id.startswith("cmpl-") and rec.ended_by == "client_disconnect" and rec.choices == 2
        assert 2 <= rec.completion_tokens < 6000


def test_keyed_gateway_holds_for_every_choice_of_every_prompt(engine_factory, tmp_path, tok):
    with served_tiny(engine_factory, gateway_dir=tmp_path) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("sk-unknown").completions.create(model=MODEL, prompt=PROMPT)
        # Enough for the prompts and 4 completion tokens in all: two prompts x two choices get one token each.
        prompts = [PROMPT, "The weather"]
        prompt_units = sum(len(tok.encode(p)) for p in prompts) * 100_000
        secret = s.key("poor", str(Decimal(prompt_units + 4 * 200_000) / 10**8))
        r = s.client(secret).completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=50,
                                                extra_body={"ignore_eos": True})
        assert [ch.finish_reason for ch in r.choices] == ["length"] * 4
        assert r.usage.completion_tokens == 4 and s.record_after(0).choices == 4
        assert s.gateway.store.account("poor").balance_units == 0
