"""Tool calling through the real server with the openai client."""

import json

import httpx
import jsonschema
import pytest

from tests.api.schemas import validate

TOOL_SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
    {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]},
    {"type": "object", "properties": {}},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99}, "maxItems": 3}},
     "required": ["ids"]},
    {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}, "limit": {"type": "integer",
                                                                                       "minimum": 1, "maximum": 5}},
     "required": ["q"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"]},
    {"type": "object", "properties": {"flag": {"type": "boolean"}, "note": {"anyOf": [{"type": "string",
                                                                                      "maxLength": 6},
                                                                                     {"type": "null"}]}},
     "required": ["flag", "note"]},
    {"type": "object", "properties": {"pt": {"type": "object", "properties": {"x": {"type": "integer"},
                                                                              "y": {"type": "integer"}},
                                             "required": ["x", "y"], "additionalProperties": False}},
     "required": ["pt"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
     "required": ["code"]},
]


def tool(name, schema):
    return {"type": "function", "function": {"name": name, "description": f"tool {name}", "parameters": schema}}


TOOLS = [tool(f"t{i}", s) for i, s in enumerate(TOOL_SCHEMAS)]
MSG = [{"role": "user", "content": "Use a tool."}]


def _calls_from_stream(chunks):
    calls = {}
    for ch in chunks:
        if not ch.choices:
            continue
        for tc in ch.choices[0].delta.tool_calls or []:
            cur = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert cur["id"] is None and tc.function.name, "first delta carries id and name"
                cur["id"], cur["name"] = tc.id, tc.function.name
                assert tc.type == "function"
            cur["arguments"] += tc.function.arguments or ""
    return [calls[k] for k in sorted(calls)]


@pytest.mark.parametrize("i", range(len(TOOL_SCHEMAS)))
def test_named_tool_choice_validates_streaming_and_not(server, i):
    c = server.client()
    kw = dict(model=server.model_id, messages=MSG, tools=TOOLS, max_tokens=200, temperature=1.0, seed=i,
              tool_choice={"type": "function", "function": {"name": f"t{i}"}},
              extra_body={"reasoning": {"max_tokens": 4}})
    r = c.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == f"t{i}" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), TOOL_SCHEMAS[i])
    chunks = list(c.chat.completions.create(stream=True, **kw))
    streamed = _calls_from_stream(chunks)
    assert [(x["name"], x["arguments"]) for x in streamed] == [(f"t{i}", calls[0].function.arguments)]
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["tool_calls"]


def test_required_always_calls_and_parallel_false_calls_once(server):
    c = server.client()
    for seed in range(4):
        r = c.chat.completions.create(model=server.model_id, messages=MSG, tools=TOOLS[:3], tool_choice="required",
                                      max_tokens=300, temperature=1.0, seed=seed,
                                      extra_body={"reasoning": {"max_tokens": 2}})
        ch = r.choices[0]
        if ch.finish_reason == "length":
            continue  # cut off mid-call: nothing to check
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls
        for call in ch.message.tool_calls:
            i = int(call.function.name[1:])
            jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[i])
        r = c.chat.completions.create(model=server.model_id, messages=MSG, tools=TOOLS[:3], tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=seed,
                                      extra_body={"reasoning": {"max_tokens": 2}})
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1


@pytest.fixture(scope="module")
def tok(checkpoints):
    from thinkgate.models.tokenizer import ModelTokenizer

    return ModelTokenizer.from_dir(checkpoints["qwen3"])


def test_required_with_parallel_calls_may_end_after_any_call(server, tok):
    """A newline after `</tool_call>` no longer forces another call: the turn may end after any complete
    call (before this, the grammar's only way on from a newline was the next `<tool_call>`)."""
    c = server.client()
    nl, eos, close = tok.encode("\n")[0], tok.token_id("<|im_end|>"), tok.token_id("</tool_call>")
    kw = dict(model=server.model_id, messages=MSG, tools=TOOLS[:3], max_tokens=300, temperature=0, logprobs=True)
    # The newline is the first choice wherever the grammar allows it, the end of the turn the second (no
    # thinking, where nothing constrains them).
    bias = {str(nl): 50, str(eos): 30}
    r = c.chat.completions.create(tool_choice="required", **kw,
                                  extra_body={"reasoning": {"max_tokens": 0}, "logit_bias": bias})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.native_finish_reason == "eos"
    assert len(ch.message.tool_calls) == 1 and ch.message.content is None
    last = [e.token for e in ch.logprobs.content[-2:]]
    assert last == [tok.decode([close]), "\n"]  # the newline came, then the end
    assert r.usage.completion_tokens < 60
    # Without the newline the end is allowed right after the call.
    r = c.chat.completions.create(tool_choice="required", **kw,
                                  extra_body={"reasoning": {"max_tokens": 0}, "logit_bias": {str(eos): 30}})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
    assert ch.logprobs.content[-1].token == tok.decode([close])
    # A named function: the grammar is done after its one call, and generation stops there.
    r = c.chat.completions.create(tool_choice={"type": "function", "function": {"name": "t2"}}, **kw,
                                  extra_body={"reasoning": {"max_tokens": 0}, "logit_bias": bias})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.native_finish_reason == "grammar"
    assert [t.function.name for t in ch.message.tool_calls] == ["t2"]


NOTE = tool("note", {"type": "object", "properties": {"text": {"type": "string", "minLength": 30,
                                                                 "maxLength": 40}}, "required": ["text"]})
NOTE_CHOICE = {"type": "function", "function": {"name": "note"}}


def test_cut_call_is_a_call_with_finish_length_and_no_markup_in_content(server):
    c = server.client()
    kw = dict(model=server.model_id, messages=MSG, tools=[NOTE], tool_choice=NOTE_CHOICE, max_tokens=30,
              temperature=1.0, seed=3, extra_body={"reasoning": {"max_tokens": 2}})
    raw = c.chat.completions.with_raw_response.create(**kw)
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    ch = body["choices"][0]
    assert ch["finish_reason"] == "length" and ch["native_finish_reason"] == "max_tokens"
    assert ch["message"]["content"] is None  # null, not "", and never the call's markup
    (call,) = ch["message"]["tool_calls"]
    args = call["function"]["arguments"]
    assert call["function"]["name"] == "note" and args.startswith('{"text":"') and len(args) > len('{"text":"')
    with pytest.raises(ValueError):
        json.loads(args)  # cut: the arguments written so far
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert all(not ch.choices[0].delta.content for ch in chunks if ch.choices)
    assert [(x["name"], x["arguments"]) for x in _calls_from_stream(chunks)] == [("note", args)]
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]


def test_arguments_stream_as_written_and_equal_the_message(server):
    c = server.client()
    kw = dict(model=server.model_id, messages=MSG, tools=[NOTE], tool_choice=NOTE_CHOICE, max_tokens=200,
              temperature=1.0, seed=5, extra_body={"reasoning": {"max_tokens": 2}})
    r = c.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    args = r.choices[0].message.tool_calls[0].function.arguments
    assert len(json.loads(args)["text"]) >= 30
    chunks = list(c.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    head, frags = deltas[0], [d.function.arguments for d in deltas[1:]]
    assert head.id and head.function.name == "note" and head.function.arguments == ""
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert len(frags) > 10 and "".join(frags) == args  # token by token, not the whole call cut up at its end


def test_tool_choice_none_offers_no_tools_and_history_renders(server):
    c = server.client()
    history = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "t0", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"}]
    r = c.chat.completions.create(model=server.model_id, messages=history, tools=TOOLS, tool_choice="none",
                                  max_tokens=5, extra_body={"logit_bias": {"1014": 100}})  # push <tool_call>
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize("body,param", [
    ({"tools": [tool("a", {"type": "array"})]}, "tools[0].function.parameters"),
    ({"tools": [tool("a", {}), tool("a", {})]}, "tools[1].function.name"),
    ({"tools": [tool("a", {})], "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [tool("bad name!", {})]}, "tools[0].function.name"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
])
def test_tool_validation(server, body, param):
    r = httpx.post(server.base + "/v1/chat/completions", timeout=30,
                   json={"model": server.model_id, "messages": MSG, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.slow
@pytest.mark.network
def test_agent_loop_with_real_model(default_gguf):
    from tests.conftest import ServerProcess

    s = ServerProcess(str(default_gguf), extra=["--kv-cache-memory", str(256 * 2**20), "--dtype", "bfloat16"],
                      name="coder")
    try:
        c = s.client()
        weather = {"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        # Parallel calls allowed (the default, and what pydantic-ai and LangChain's tool_choice="any" send):
        # the model writes a newline after its call, then ends the turn (before, the newline forced another
        # call, and this model went on with London, Tokyo... up to the cap).
        r = c.chat.completions.create(model="coder", messages=messages, tools=[weather], tool_choice="required",
                                      temperature=0, max_tokens=500)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert r.choices[0].message.content is None and r.usage.completion_tokens < 40  # well under the cap
        args = json.loads(call.function.arguments)
        assert "paris" in args["city"].lower()
        # The same through LangChain's bind_tools(..., tool_choice="any"), with no max_tokens at all.
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(model="coder", base_url=s.base + "/v1", api_key="sk-test", max_retries=0, temperature=0,
                         timeout=300)
        msg = llm.bind_tools([weather], tool_choice="any").invoke(messages[0]["content"])
        assert [tc["name"] for tc in msg.tool_calls] == ["get_weather"]
        assert "paris" in msg.tool_calls[0]["args"]["city"].lower()
        assert msg.response_metadata["finish_reason"] == "tool_calls"
        messages += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
        r2 = c.chat.completions.create(model="coder", messages=messages, tools=[weather], tool_choice="none",
                                       temperature=0, max_tokens=60)
        text = r2.choices[0].message.content
        assert text and r2.choices[0].message.tool_calls is None
        assert "21" in text or "sunny" in text.lower()
    finally:
        s.stop()
