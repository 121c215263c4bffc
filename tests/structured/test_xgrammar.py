"""The xgrammar backend closes xgrammar's gaps: what it would not enforce is refused by name, and what it
enforces loosely is rewritten into something it enforces exactly."""

import pytest

from thinkgate.structured.backend import (
    GrammarError,
    make_backend,
    resolve_grammar_backend,
    xgrammar_installed,
)

pytestmark = pytest.mark.skipif(not xgrammar_installed(),
                                reason="xgrammar is not installed (optional extra thinkgate[xgrammar])")


@pytest.fixture(scope="module")
def backend(engine_factory):
    eng = engine_factory("qwen3")
    return make_backend(eng.tokenizer, sorted(eng.eos_ids), "xgrammar")


def accepts(backend, schema: dict, text: str) -> bool:
    m = backend.json_schema(schema).inner.m  # the xgrammar matcher itself, under the number bounds
    return m.accept_string(text) and m.is_completed()


def obj(prop: dict) -> dict:
    return {"type": "object", "properties": {"v": prop}, "required": ["v"], "additionalProperties": False}


@pytest.mark.parametrize("schema,named", [
    (obj({"type": "object", "maxProperties": 2}), "maxProperties"),
    (obj({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
    (obj({"type": "integer", "multipleOf": 5}), "multipleOf"),
    (obj({"type": "string", "pattern": "^[a-z]+$", "maxLength": 4}), "minLength'/'maxLength"),
    (obj({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}), "oneOf"),
    (obj({"not": {"type": "string"}}), "not"),
])
def test_unenforceable_schemas_are_refused_by_name(backend, schema, named):
    with pytest.raises(GrammarError, match=named):
        backend.json_schema(schema)


def test_property_names_that_look_like_keywords_are_fine(backend):
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"enum": ["a"]}},
              "required": ["not", "if"]}
    assert accepts(backend, schema, '{"not":"x","if":"a"}')


def test_disjoint_one_of_is_kept(backend):
    by_type = obj({"oneOf": [{"type": "string"}, {"type": "integer"}]})
    by_const = obj({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                              {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}]})
    assert accepts(backend, by_type, '{"v":3}') and accepts(backend, by_const, '{"v":{"k":"b"}}')


def test_calendar_formats_allow_only_real_days(backend):
    date, dt = obj({"type": "string", "format": "date"}), obj({"type": "string", "format": "date-time"})
    assert accepts(backend, date, '{"v":"2024-06-30"}')
    assert not accepts(backend, date, '{"v":"2024-06-31"}')
    assert not accepts(backend, date, '{"v":"2023-02-30"}')
    assert accepts(backend, dt, '{"v":"2024-01-31T23:59:59.5Z"}')
    assert not accepts(backend, dt, '{"v":"2024-01-31T23:59:595Z"}')  # fraction without its dot


def test_bounded_strings_exclude_control_characters(backend):
    schema = obj({"type": "string", "minLength": 1, "maxLength": 3})
    assert accepts(backend, schema, '{"v":"aé"}')
    assert not accepts(backend, schema, '{"v":"a\x01"}')
    assert not accepts(backend, schema, '{"v":""}') and not accepts(backend, schema, '{"v":"abcd"}')


def test_optional_groups_in_patterns_are_exact(backend):
    schema = obj({"type": "string", "pattern": "^(x[0-9]+)?y$"})
    assert accepts(backend, schema, '{"v":"x12y"}') and accepts(backend, schema, '{"v":"y"}')
    assert not accepts(backend, schema, '{"v":"12y"}')  # xgrammar alone accepts this


def test_tool_call_grammars_go_to_llguidance(backend):
    m = backend.lark('start: "a" | "b"')
    assert type(m.inner).__name__ == "LLGuidanceMatcher"  # under the same number bounds


def test_auto_picks_xgrammar_on_gpu_only():
    assert resolve_grammar_backend("auto", "cuda") == "xgrammar"
    assert resolve_grammar_backend("auto", "cpu") == "llguidance"
    with pytest.raises(ValueError, match="outlines"):
        resolve_grammar_backend("outlines", "cpu")


@pytest.mark.slow
def test_server_with_xgrammar_backend(checkpoints):
    import datetime
    import json

    import httpx

    from tests.conftest import ServerProcess

    s = ServerProcess(str(checkpoints["qwen3"]), extra=["--kv-cache-memory", str(64 * 2**20),
                                                        "--grammar-backend", "xgrammar"])
    try:
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                   "born": {"type": "string", "format": "date"}},
                  "required": ["name", "born"], "additionalProperties": False}
        r = s.client().chat.completions.create(
            model=s.model_id, messages=[{"role": "user", "content": "A person"}], max_tokens=120, temperature=1.0,
            seed=3, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
            extra_body={"reasoning": {"enabled": False}})
        assert r.choices[0].finish_reason == "stop"
        out = json.loads(r.choices[0].message.content)
        assert set(out) == {"name", "born"} and len(out["name"]) <= 8
        datetime.date.fromisoformat(out["born"])  # a real calendar day
        # A thinking turn: the reasoning is free text, the answer after it follows the schema.
        r = s.client().chat.completions.create(
            model=s.model_id, messages=[{"role": "user", "content": "A person"}], max_tokens=160, temperature=1.0,
            seed=5, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
            extra_body={"reasoning": {"max_tokens": 12}})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.reasoning
        with pytest.raises(ValueError):
            json.loads(r.choices[0].message.reasoning)
        datetime.date.fromisoformat(json.loads(r.choices[0].message.content)["born"])
        bad = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
        resp = httpx.post(s.base + "/v1/chat/completions", timeout=30, json={
            "model": s.model_id, "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}})
        assert resp.status_code == 400
        err = resp.json()["error"]
        assert err["param"] == "response_format.json_schema" and "multipleOf" in err["message"]
    finally:
        s.stop()
