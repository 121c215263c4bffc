"""Tool calling through the real server with the openai client."""

import json

import httpx
import jsonschema
import pytest

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
        # parallel_tool_calls=False: left free after one call, this small model keeps calling for more cities.
        r = c.chat.completions.create(model="coder", messages=messages, tools=[weather], tool_choice="required",
                                      parallel_tool_calls=False, temperature=0, max_tokens=80)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        assert "paris" in args["city"].lower()
        messages += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
        r2 = c.chat.completions.create(model="coder", messages=messages, tools=[weather], tool_choice="none",
                                       temperature=0, max_tokens=60)
        text = r2.choices[0].message.content
        assert text and r2.choices[0].message.tool_calls is None
        assert "21" in text or "sunny" in text.lower()
    finally:
        s.stop()
