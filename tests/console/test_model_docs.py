"""A model page's parameter table is the validator's own ranges (protocol.Range, which params.validate_chat
checks), its capabilities follow the model's card, and its samples carry the base URL and model id."""

from __future__ import annotations

import json

from thinkgate.console.model_docs import ALWAYS, capabilities, parameter_rows, response_example, samples
from thinkgate.protocol import ChatCompletionRequest, Reasoning, ranges


def _expected(r) -> str:
    num = lambda v: format(v, "g")  # noqa: E731
    lo = "-∞" if r.lo is None else num(r.lo)
    hi = "∞" if r.hi is None else num(r.hi)
    return f"({lo}, {hi}]" if r.lo_open else f"[{lo}, {hi}]"


def test_every_checked_range_is_shown_as_the_validator_checks_it():
    rows = {r["name"]: r for r in parameter_rows(None)}
    checked = {**ranges(ChatCompletionRequest), **{f"reasoning.{k}": v for k, v in ranges(Reasoning).items()}}
    assert checked  # the validator declares ranges; each one is in the table
    for name, rng in checked.items():
        assert rows[name]["range"] == _expected(rng), name
    assert set(ChatCompletionRequest.model_json_schema()["properties"]) <= set(rows)


def test_the_table_lists_what_the_model_supports_and_what_every_request_carries():
    names = [r["name"] for r in parameter_rows(["temperature", "reasoning"])]
    assert names[:len(ALWAYS)] == ["model", "messages", "stream", "stream_options"]  # required ones first
    assert "temperature" in names and "reasoning.max_tokens" in names and "top_k" not in names
    assert {r["name"] for r in parameter_rows(["x"]) if r["required"]} == {"model", "messages"}


def test_capabilities_follow_the_card():
    assert capabilities({}) == ["cap_text"]
    assert capabilities({"supported_parameters": ["reasoning", "tools", "response_format"], "vision": True}) == [
        "cap_text", "cap_reasoning", "cap_tools", "cap_json", "cap_vision"]


def test_samples_and_the_response_example_name_the_server_and_the_model():
    code = samples("https://api.example.com/api/gpt/v1", "qwen/qwen3-235b-a22b-thinking-2507")
    assert set(code) == {"curl", "python", "requests", "javascript", "go"}
    for text in code.values():
        assert "qwen/qwen3-235b-a22b-thinking-2507" in text and "api.example.com/api/gpt/v1" in text
        assert "THINKGATE_API_KEY" in text and "sk-" not in text  # the key comes from the environment
    example = json.loads(response_example("m", {"pricing": {"prompt": "0.00275", "completion": "0.0095"}}))
    usage = example["usage"]
    assert example["model"] == "m" and example["choices"][0]["message"]["reasoning"]
    assert usage["cost"] == round((10 * 0.00275 + 120 * 0.0095) / 1000, 10)
