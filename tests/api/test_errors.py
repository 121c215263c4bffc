"""A table of malformed or out-of-range requests: each gets the right 4xx, in the OpenAI error shape,
naming the parameter; the server keeps serving."""

import httpx
import pytest

M = "tiny-thinker"
U = [{"role": "user", "content": "hi"}]


def ok(**kw):
    return {"model": M, "messages": U, "max_tokens": 2, **kw}


CASES = [
    # (name, body (dict, or raw bytes), headers, status, param substring or None)
    ("malformed json", b'{"model": "tiny-thinker", "messages": [', None, 400, None),
    ("json array body", b"[1, 2, 3]", None, 400, None),
    ("json string body", b'"hello"', None, 400, None),
    ("wrong content type", b'{"model": "x"}', {"Content-Type": "text/plain"}, 400, None),
    ("missing model", {"messages": U}, None, 400, "model"),
    ("missing messages", {"model": M}, None, 400, "messages"),
    ("empty messages", {"model": M, "messages": []}, None, 400, "messages"),
    ("messages not a list", {"model": M, "messages": "hi"}, None, 400, "messages"),
    ("unknown role", {"model": M, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "messages[0].role"),
    ("message without role", {"model": M, "messages": [{"content": "x"}]}, None, 400, "messages[0].role"),
    ("content wrong type", {"model": M, "messages": [{"role": "user", "content": 42}]}, None, 400, "messages[0].content"),
    ("image content part", {"model": M, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, None, 400, "messages[0].content"),
    ("unknown model", ok(model="gpt-9"), None, 404, "model"),
    ("model wrong type", ok(model=5), None, 400, "model"),
    ("temperature too high", ok(temperature=2.5), None, 400, "temperature"),
    ("temperature negative", ok(temperature=-0.1), None, 400, "temperature"),
    ("temperature string", ok(temperature="hot"), None, 400, "temperature"),
    ("top_p zero", ok(top_p=0), None, 400, "top_p"),
    ("top_p above one", ok(top_p=1.5), None, 400, "top_p"),
    ("top_k negative", ok(top_k=-3), None, 400, "top_k"),
    ("top_k float", ok(top_k=2.5), None, 400, "top_k"),
    ("min_p above one", ok(min_p=1.1), None, 400, "min_p"),
    ("top_a negative", ok(top_a=-1), None, 400, "top_a"),
    ("frequency_penalty out of range", ok(frequency_penalty=2.5), None, 400, "frequency_penalty"),
    ("presence_penalty out of range", ok(presence_penalty=-3), None, 400, "presence_penalty"),
    ("repetition_penalty zero", ok(repetition_penalty=0), None, 400, "repetition_penalty"),
    ("repetition_penalty too big", ok(repetition_penalty=3), None, 400, "repetition_penalty"),
    ("max_tokens zero", ok(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens negative", ok(max_tokens=-5), None, 400, "max_tokens"),
    ("max_tokens string", ok(max_tokens="ten"), None, 400, "max_tokens"),
    ("max_completion_tokens zero", ok(max_completion_tokens=0), None, 400, "max_completion_tokens"),
    ("seed float", ok(seed=1.5), None, 400, "seed"),
    ("n zero", ok(n=0), None, 400, "n"),
    ("n too large", ok(n=100), None, 400, "n"),
    ("top_logprobs without logprobs", ok(top_logprobs=3), None, 400, "top_logprobs"),
    ("top_logprobs too large", ok(logprobs=True, top_logprobs=25), None, 400, "top_logprobs"),
    ("logprobs not bool", ok(logprobs="yes"), None, 400, "logprobs"),
    ("logit_bias key not an id", ok(logit_bias={"hello": 5}), None, 400, "logit_bias"),
    ("logit_bias out of vocabulary", ok(logit_bias={"99999999": 5}), None, 400, "logit_bias"),
    ("logit_bias value too large", ok(logit_bias={"5": 150}), None, 400, "logit_bias"),
    ("too many stop strings", ok(stop=["a", "b", "c", "d", "e"]), None, 400, "stop"),
    ("stop wrong type", ok(stop=5), None, 400, "stop"),
    ("empty stop string", ok(stop=[""]), None, 400, "stop"),
    ("stream not bool", ok(stream="yes"), None, 400, "stream"),
    ("response_format bad type", ok(response_format={"type": "xml"}), None, 400, "response_format"),
    ("reasoning effort unknown", ok(reasoning={"effort": "extreme"}), None, 400, "reasoning.effort"),
    ("reasoning max_tokens negative", ok(reasoning={"max_tokens": -1}), None, 400, "reasoning.max_tokens"),
    ("reasoning_effort unknown", ok(reasoning_effort="extreme"), None, 400, "reasoning_effort"),
    ("verbosity unknown", ok(verbosity="loud"), None, 400, "verbosity"),
    ("tool_choice unknown string", ok(tool_choice="sometimes"), None, 400, "tool_choice"),
    ("min_tokens over max_tokens", ok(min_tokens=10, max_tokens=2), None, 400, "min_tokens"),
    ("prompt over the context", {"model": M, "messages": [{"role": "user", "content": "word " * 6000}]}, None,
     400, "messages"),
    ("body over the size limit", b'{"model": "tiny-thinker", "messages": [{"role": "user", "content": "'
     + b"x" * (33 * 1024 * 1024) + b'"}]}', None, 413, None),
]


@pytest.mark.parametrize("name,body,headers,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, name, body, headers, status, param):
    url = server.base + "/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers=headers or {"Content-Type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert err["code"] is None or isinstance(err["code"], str), err  # as OpenAI: a string or null
    if param is not None:
        assert err["param"] is not None and param in err["param"], err
        head = param.split(".")[-1].split("[")[0]
        assert head in err["message"] or "context length" in err["message"], err


def test_context_error_names_both_numbers(server):
    r = httpx.post(server.base + "/v1/chat/completions",
                   json={"model": M, "messages": [{"role": "user", "content": "word " * 6000}]}, timeout=60)
    err = r.json()["error"]
    assert "4096" in err["message"] and "tokens" in err["message"]
    assert err["code"] == "context_length_exceeded"


def test_an_image_to_a_local_model_is_refused_naming_the_model(server):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    r = httpx.post(server.base + "/v1/chat/completions", json=ok(messages=[
        {"role": "user", "content": [{"type": "text", "text": "look"}, image]}]), timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "messages[0].content"
    assert f"{M!r}" in err["message"] and "text only" in err["message"]


def test_error_codes_are_strings_or_null(server):
    r = httpx.post(server.base + "/v1/chat/completions", json=ok(model="gpt-9"), timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.base + "/v1/chat/completions", json=ok(temperature=5), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] is None
    r = httpx.get(server.base + "/v1/nothing-here", timeout=60)
    assert r.status_code == 404 and r.json()["error"] == {"message": "Not Found", "type": "not_found_error",
                                                          "param": None, "code": None}


def test_unknown_fields_are_ignored_and_server_keeps_serving(server):
    r = httpx.post(server.base + "/v1/chat/completions", json=ok(some_future_field={"x": 1}, structured_outputs=True),
                   timeout=60)
    assert r.status_code == 200
    r = httpx.get(server.base + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_openai_client_raises_typed_errors(server):
    import openai

    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=server.model_id, messages=U, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=U)
