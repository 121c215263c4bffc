"""The Responses API (`POST /v1/responses`) on the tiny thinking model: the official SDK's
`client.responses.create` (plain, streamed, json_schema, function tools and a tool loop, reasoning), bodies
and every stream event valid against OpenAI's published schemas, usage equal to the engine's counts, the
usage hook and disconnects, errors naming the Responses parameter, and LangChain's Responses mode."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from tests.api.inprocess import asgi_client
from tests.api.schemas import validate
from tests.api.scripted_provider import ScriptedProvider
from tests.api.served import MODEL, PRICE, served_tiny
from thinkgate.api.app import create_app
from thinkgate.gateway.money import to_units
from thinkgate.models.tokenizer import ModelTokenizer
from thinkgate.params import EFFORT_FRACTION

ASK = "Tell me about the weather"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER,
          "strict": True},
         {"type": "function", "name": "get_time", "description": "The time", "parameters": None, "strict": None}]
FORCE_WEATHER = {"type": "function", "name": "get_weather"}


@pytest.fixture(scope="module")
def tok(checkpoints):
    return ModelTokenizer.from_dir(checkpoints["qwen3"])


def prompt_tokens_of_chat(server, messages, **kw) -> int:
    """What the same conversation costs as a chat request (the reference for Responses' input_tokens)."""
    r = server.client().chat.completions.create(model=server.model_id, messages=messages, max_tokens=1, **kw)
    return r.usage.prompt_tokens


def stream_events(base: str, body: dict, path: str = "/v1/responses") -> list[dict]:
    """The raw SSE stream: every frame is `event: <type>` + `data:`, no `[DONE]`; each event schema-valid."""
    r = httpx.post(base + path, json={**body, "stream": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for frame in r.text.split("\n\n"):
        if not frame.strip() or frame.startswith(":"):
            continue
        head, data = frame.split("\n")
        ev = json.loads(data.removeprefix("data: "))
        assert head == "event: " + ev["type"]
        validate(ev, "ResponseStreamEvent", "responses")
        events.append(ev)
    return events


def item_texts(output: list[dict]) -> list[tuple[str, str]]:
    out = []
    for it in output:
        if it["type"] == "function_call":
            out.append(("function_call", it["name"] + it["arguments"]))
        else:
            out.append((it["type"], "".join(p["text"] for p in it["content"])))
    return out


def test_plain_response_is_valid_with_the_engines_usage(server, tok):
    c = server.client()
    raw = c.responses.with_raw_response.create(model=server.model_id, input=ASK, max_output_tokens=12,
                                               extra_body={"ignore_eos": True})
    body = raw.http_response.json()
    validate(body, "Response", "responses")
    r = raw.parse()
    assert r.id.startswith("resp_") and r.object == "response" and body["store"] is False
    # The random model never closes its thinking: every token is reasoning, and the cap cuts it.
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [item] = body["output"]
    assert item["type"] == "reasoning" and item["id"].startswith("rs_") and item["status"] == "incomplete"
    assert item["summary"] == [] and item["content"][0]["type"] == "reasoning_text" and item["content"][0]["text"]
    u = body["usage"]
    assert u["input_tokens"] == prompt_tokens_of_chat(server, [{"role": "user", "content": ASK}])
    assert u["output_tokens"] == 12 and u["output_tokens_details"]["reasoning_tokens"] == 12
    assert u["total_tokens"] == u["input_tokens"] + 12 and u["input_tokens_details"]["cached_tokens"] >= 0
    assert r.output_text == ""  # no message: the SDK's convenience property still works


def test_instructions_and_input_items_are_the_chat_conversation(server):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi. "}, {"type": "input_text", "text": "Q?"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A."}]},
             {"role": "developer", "content": "Be brief."}, {"role": "user", "content": ASK}]
    r = server.client().responses.create(model=server.model_id, instructions="You are terse.", input=items,
                                         max_output_tokens=1)
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi. Q?"},
            {"role": "assistant", "content": "A."}, {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": ASK}]
    assert r.usage.input_tokens == prompt_tokens_of_chat(server, chat)
    assert r.instructions == "You are terse."


def test_stream_tells_the_same_response_event_by_event(server):
    body = {"model": server.model_id, "input": ASK, "max_output_tokens": 30, "temperature": 1.0, "seed": 11,
            "ignore_eos": True, "reasoning": {"max_tokens": 10}}  # think 10 tokens, then answer
    whole = httpx.post(server.base + "/v1/responses", json=body, timeout=120).json()
    validate(whole, "Response", "responses")
    events = stream_events(server.base, body)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.incomplete"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    assert item_texts(final["output"]) == item_texts(whole["output"])
    assert [it["type"] for it in final["output"]] == ["reasoning", "message"]  # thought, then answered
    assert final["usage"]["output_tokens"] == 30 == whole["usage"]["output_tokens"]
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 10
    # Each item: added, its part, deltas that add up to it, done; the deltas are in order and complete.
    for idx, item in enumerate(final["output"]):
        mine = [e for e in events if e.get("output_index") == idx]
        kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
        assert [e["type"] for e in mine[:2]] == ["response.output_item.added", "response.content_part.added"]
        assert mine[0]["item"]["id"] == item["id"] and mine[0]["item"]["status"] == "in_progress"
        deltas = "".join(e["delta"] for e in mine if e["type"] == f"response.{kind}.delta")
        assert deltas == item["content"][0]["text"] != ""
        assert [e["type"] for e in mine[-3:]] == [f"response.{kind}.done", "response.content_part.done",
                                                   "response.output_item.done"]
        assert mine[-1]["item"] == item
    # The SDK reads the same stream into its typed events.
    sdk = list(server.client().responses.create(stream=True, **{k: v for k, v in body.items() if k in (
        "model", "input", "max_output_tokens", "temperature", "reasoning")}, extra_body={k: body[k] for k in (
            "seed", "ignore_eos")}))
    assert [e.type for e in sdk] == types
    assert sdk[-1].response.output_text == "".join(t for k, t in item_texts(final["output"]) if k == "message")


def test_json_schema_and_json_object(server):
    c = server.client()
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "forecast", "schema": schema, "strict": True}
    raw = c.responses.with_raw_response.create(model=server.model_id, input=ASK, text={"format": fmt},
                                               max_output_tokens=300, extra_body={"reasoning": {"max_tokens": 4},
                                                                                  "seed": 1})
    body = raw.http_response.json()
    validate(body, "Response", "responses")
    r = raw.parse()
    assert r.status == "completed" and r.text.format.type == "json_schema" and r.text.format.name == "forecast"
    jsonschema.validate(json.loads(r.output_text), schema)
    r = c.responses.create(model=server.model_id, input=ASK, text={"format": {"type": "json_object"}},
                           max_output_tokens=40, extra_body={"reasoning": {"max_tokens": 4}, "seed": 2})
    # Any object: the random model may write one long string in it until the cap.
    assert r.text.format.type == "json_object" and r.output_text.startswith("{")


def test_function_call_then_its_output_in_a_follow_up(server):
    c = server.client()
    kw = dict(model=server.model_id, tools=TOOLS, max_output_tokens=200, temperature=1.0,
              extra_body={"reasoning": {"max_tokens": 4}, "seed": 3})
    question = [{"role": "user", "content": "Weather in Paris?"}]
    raw = c.responses.with_raw_response.create(input=question, tool_choice=FORCE_WEATHER, **kw)
    validate(raw.http_response.json(), "Response", "responses")
    r = raw.parse()
    assert r.status == "completed" and r.tool_choice.name == "get_weather"
    assert [t.name for t in r.tools] == ["get_weather", "get_time"]
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    reasoning = [o for o in r.output if o.type == "reasoning"]
    # The loop as OpenAI's guide writes it: the whole output goes back in, then the call's output.
    follow = question + list(r.output) + [{"type": "function_call_output", "call_id": call.call_id,
                                           "output": '{"temp": 21}'}]
    r2 = c.responses.create(input=follow, max_output_tokens=1, model=server.model_id, tools=TOOLS)
    assert r2.status in ("completed", "incomplete")
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type" and v is not None}}
                  for t in TOOLS]
    chat = question + [{"role": "assistant", "content": "", "reasoning_content": reasoning[0].content[0].text,
                        "tool_calls": [{"id": call.call_id, "type": "function",
                                        "function": {"name": call.name, "arguments": call.arguments}}]},
                       {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'}]
    assert r2.usage.input_tokens == prompt_tokens_of_chat(server, chat, tools=chat_tools)


def test_streamed_function_call_arguments_add_up(server):
    body = {"model": server.model_id, "input": "Weather in Paris?", "tools": TOOLS, "tool_choice": FORCE_WEATHER,
            "max_output_tokens": 200, "temperature": 1.0, "seed": 3, "reasoning": {"max_tokens": 4}}
    whole = httpx.post(server.base + "/v1/responses", json=body, timeout=120).json()
    [call] = [o for o in whole["output"] if o["type"] == "function_call"]
    events = stream_events(server.base, body)
    idx = next(e["output_index"] for e in events if e["type"] == "response.output_item.added"
               and e["item"]["type"] == "function_call")
    mine = [e for e in events if e.get("output_index") == idx]
    added, done = mine[0], mine[-1]
    assert added["item"]["name"] == "get_weather" and added["item"]["arguments"] == ""
    assert added["item"]["call_id"].startswith("call_")
    deltas = [e["delta"] for e in mine if e["type"] == "response.function_call_arguments.delta"]
    [args_done] = [e for e in mine if e["type"] == "response.function_call_arguments.done"]
    assert "".join(deltas) == args_done["arguments"] == done["item"]["arguments"] == call["arguments"]
    assert args_done["name"] == "get_weather" and events[-1]["type"] == "response.completed"


def test_reasoning_effort_sets_the_thinking_budget(server):
    c = server.client()
    cap = 40
    got = {}
    for effort in ("low", "high"):
        r = c.responses.create(model=server.model_id, input=ASK, max_output_tokens=cap,
                               reasoning={"effort": effort, "summary": "auto"}, extra_body={"ignore_eos": True})
        assert r.reasoning.effort == effort and r.reasoning.summary == "auto"
        [item] = [o for o in r.output if o.type == "reasoning"]
        assert item.content[0].text and item.summary == []
        got[effort] = r.usage.output_tokens_details.reasoning_tokens
    assert got == {e: int(EFFORT_FRACTION[e] * cap) for e in ("low", "high")}
    r = c.responses.create(model=server.model_id, input=ASK, max_output_tokens=10, reasoning={"effort": "none"},
                           extra_body={"ignore_eos": True})
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert [o.type for o in r.output] == ["message"] and r.output_text


def test_logprobs_on_request(server):
    r = server.client().responses.create(
        model=server.model_id, input=ASK, max_output_tokens=12, include=["message.output_text.logprobs"],
        top_logprobs=2, extra_body={"reasoning": {"max_tokens": 2}, "ignore_eos": True})
    [msg] = [o for o in r.output if o.type == "message"]
    lp = msg.content[0].logprobs
    assert lp and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)


def test_other_base_path_and_store(server):
    r = server.client("/api/gpt/v1").responses.create(model=server.model_id, input=ASK, max_output_tokens=2,
                                                      store=True)
    assert r.store is False  # accepted, nothing stored (there is no response store)


@pytest.mark.parametrize("body,param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools[0].parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "message", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": "many"}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": "high"}, "top_p"),
    ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"stream": "yes"}, "stream"),
    ({"top_k": -1}, "top_k"),
])
def test_bad_requests_name_the_parameter(server, body, param):
    r = httpx.post(server.base + "/v1/responses", json={"model": server.model_id, "input": "hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    # OpenAI's shape; `code` aside, which the error-codes change of issue 18 turns from an integer to a string.
    validate({"error": {**err, "code": None}}, "ErrorResponse", "responses")
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_missing_input_unknown_model_and_too_long(server, tok):
    r = httpx.post(server.base + "/v1/responses", json={"model": server.model_id}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    with pytest.raises(openai.NotFoundError) as e:
        server.client().responses.create(model="no-such-model", input="hi")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        server.client().responses.create(model=server.model_id, input="word " * 5000)
    assert e.value.body["param"] == "input" and e.value.body["code"] == "context_length_exceeded"


def test_usage_reaches_the_hook_once_also_when_the_client_leaves(engine_factory):
    with served_tiny(engine_factory) as s:
        r = s.client().responses.create(model=MODEL, input=ASK, max_output_tokens=5, extra_body={"ignore_eos": True})
        rec = s.record_after(0)
        assert rec.request_id == r.id and rec.ended_by == "finished"
        assert (rec.prompt_tokens, rec.completion_tokens) == (r.usage.input_tokens, r.usage.output_tokens)
        body = {"model": MODEL, "input": ASK, "max_output_tokens": 3000, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", s.base + "/v1/responses", json=body) as resp:
            deltas = 0
            for line in resp.iter_lines():
                deltas += line.startswith("event: response.reasoning_text.delta")
                if deltas == 3:
                    break
        rec = s.record_after(1)
        assert rec.request_id.startswith("resp_") and rec.ended_by == "client_disconnect"
        assert 3 <= rec.completion_tokens < 3000


def test_a_provider_error_fails_the_response():
    records = []
    app = create_app({"scripted": ScriptedProvider(fail_with="the backend broke")}, on_usage=records.append)

    async def run():
        async with asgi_client(app) as http:
            body = {"model": "scripted", "input": "hi"}
            whole = await http.post("/v1/responses", json=body)
            streamed = await http.post("/v1/responses", json={**body, "stream": True})
            return whole, streamed

    whole, streamed = asyncio.run(run())
    assert whole.status_code == 500 and whole.json()["error"]["message"] == "the backend broke"
    events = [json.loads(ln[6:]) for ln in streamed.text.splitlines() if ln.startswith("data: ")]
    for ev in events:
        validate(ev, "ResponseStreamEvent", "responses")
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and final["status"] == "failed"
    assert final["error"] == {"code": "server_error", "message": "the backend broke"}
    assert final["output"][0]["status"] == "incomplete" and final["usage"]["output_tokens"] == 2
    assert len(records) == 2 and all(r.ended_by == "error" for r in records)


def test_keyed_gateway_bills_a_response_exactly(engine_factory, tmp_path):
    with served_tiny(engine_factory, gateway_dir=tmp_path) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("sk-unknown").responses.create(model=MODEL, input=ASK, max_output_tokens=2)
        secret = s.key("acct", "10")
        r = s.client(secret).responses.create(model=MODEL, input=ASK, max_output_tokens=6,
                                              extra_body={"ignore_eos": True})
        rec = s.record_after(0)
        cost = PRICE.cost(r.usage.input_tokens, r.usage.output_tokens, r.usage.input_tokens_details.cached_tokens)
        assert r.usage.output_tokens == 6 and rec.completion_tokens == 6
        assert to_units(str(r.usage.model_extra["cost"])) == cost
        assert s.gateway.store.account("acct").balance_units == to_units("10") - cost


def test_langchain_chat_openai_on_the_responses_api(server):
    from langchain_openai import ChatOpenAI

    kw = dict(model=server.model_id, base_url=server.base + "/v1", api_key="sk-test", max_retries=0,
              max_tokens=24, extra_body={"reasoning": {"max_tokens": 4}, "ignore_eos": True, "seed": 5})
    llm = ChatOpenAI(use_responses_api=True, **kw)
    msg = llm.invoke("Tell me about the weather")
    assert msg.response_metadata["id"].startswith("resp_") and msg.text
    assert msg.usage_metadata["output_tokens"] == 24
    chunks = list(llm.stream("Tell me about the weather"))
    assert "".join(ch.text for ch in chunks) == msg.text
    # `reasoning=` alone switches LangChain to the Responses API.
    thinker = ChatOpenAI(reasoning={"effort": "low", "summary": "auto"}, **{**kw, "extra_body": {"ignore_eos": True}})
    out = thinker.invoke("Tell me about the weather")
    assert out.response_metadata["id"].startswith("resp_")
    assert out.usage_metadata["output_token_details"]["reasoning"] == int(EFFORT_FRACTION["low"] * 24)
