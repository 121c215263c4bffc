"""Structured outputs: constrained decoding keeps every finished answer valid against its schema."""

import json

import httpx
import jsonschema
import pytest

from tests.structured.schema_corpus import CORPUS
from thinkgate.sampling.params import SamplingParams
from thinkgate.structured.backend import GrammarError, make_backend, xgrammar_installed

# Both backends run every corpus test where installed; xgrammar is the optional extra (dev installs it).
BACKENDS = ["llguidance", pytest.param("xgrammar", marks=pytest.mark.skipif(
    not xgrammar_installed(), reason="xgrammar is not installed (optional extra thinkgate[xgrammar])"))]


def check(schema: dict, text: str) -> None:
    v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    v.validate(json.loads(text))


def run_all(eng) -> tuple[dict, dict]:
    """Step the engine until idle; return each request's text and finish reason."""
    texts, reasons = {}, {}
    while eng.has_unfinished():
        for o in eng.step():
            texts[o.request_id] = texts.get(o.request_id, "") + o.text
            if o.finished:
                reasons[o.request_id] = o.finish_reason.value
    return texts, reasons


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 60


@pytest.mark.parametrize("name", BACKENDS)
def test_every_finished_answer_validates_at_temperature_1(engine_factory, name):
    eng = engine_factory("qwen3", kv_cache_memory=128 * 2**20)
    backend = make_backend(eng.tokenizer, sorted(eng.eos_ids), name)
    prompt = eng.tokenizer.encode("<|im_start|>user\nGive me JSON<|im_end|>\n<|im_start|>assistant\n")
    refused = {}
    for i, schema in enumerate(CORPUS):
        try:
            grammar = backend.json_schema(schema)
        except GrammarError as e:  # refused at request time, naming what the backend cannot enforce
            refused[i] = str(e)
            continue
        eng.add_request(f"s{i}", prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=300), grammar=grammar)
    texts, reasons = run_all(eng)
    # llguidance takes the whole corpus; xgrammar refuses maxProperties (2), multipleOf, pattern+maxLength.
    assert len(refused) == (0 if name == "llguidance" else 4), refused
    finished = [i for i in range(len(CORPUS)) if reasons.get(f"s{i}") in ("grammar", "eos")]
    assert len(finished) >= 50, reasons  # most finish well inside the budget
    for i in finished:
        check(CORPUS[i], texts[f"s{i}"])
    assert set(reasons.values()) <= {"grammar", "eos", "max_tokens"}


@pytest.mark.parametrize("name", BACKENDS)
def test_compiled_grammars_are_cached(engine_factory, name):
    eng = engine_factory("qwen3")
    backend = make_backend(eng.tokenizer, sorted(eng.eos_ids), name)
    a, b = backend.json_schema(CORPUS[0]), backend.json_schema(dict(reversed(list(CORPUS[0].items()))))
    assert len(backend._cache) == 1 and a.inner.m is not b.inner.m  # one compile, independent matchers


def test_unsupported_schema_is_named(engine_factory):
    eng = engine_factory("qwen3")
    backend = make_backend(eng.tokenizer, sorted(eng.eos_ids))
    with pytest.raises(GrammarError, match="maxProperties"):
        backend.json_schema({"type": "object", "properties": {"a": {"type": "string"}}, "maxProperties": 1})


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_api_reasoning_is_free_and_content_is_constrained(server):
    c = server.client()
    for stream in (False, True):
        kw = dict(model=server.model_id, messages=[{"role": "user", "content": "A person, as JSON"}],
                  max_tokens=200, temperature=1.0, seed=4,
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
                  extra_body={"reasoning": {"max_tokens": 12}})
        if stream:
            chunks = list(c.chat.completions.create(stream=True, **kw))
            content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            reasoning = "".join(getattr(ch.choices[0].delta, "reasoning", None) or ""
                                for ch in chunks if ch.choices)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        else:
            r = c.chat.completions.create(**kw)
            content, reasoning, finish = r.choices[0].message.content, r.choices[0].message.reasoning, [
                r.choices[0].finish_reason]
        assert finish == ["stop"]
        check(SCHEMA, content)
        assert reasoning  # the model thought freely first ...
        with pytest.raises(ValueError):
            json.loads(reasoning)  # ... in text that is not JSON


def test_api_json_object_and_errors(server):
    c = server.client()
    r = c.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "JSON please"}],
                                  max_tokens=200, temperature=1.0, seed=2, response_format={"type": "json_object"},
                                  extra_body={"reasoning": {"enabled": False}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = {"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}
    resp = httpx.post(server.base + "/v1/chat/completions", timeout=30, json={
        "model": server.model_id, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == "response_format.json_schema" and "min/maxProperties" in err["message"]
    resp = httpx.post(server.base + "/v1/chat/completions", timeout=30, json={
        "model": server.model_id, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "response_format.json_schema"


PERSON_SCHEMAS = [
    SCHEMA,
    {"type": "object", "properties": {"first_name": {"type": "string"}, "last_name": {"type": "string"}},
     "required": ["first_name", "last_name"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
     "required": ["name", "email"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "hobbies": {"type": "array",
                                                                               "items": {"type": "string"},
                                                                               "minItems": 1, "maxItems": 3}},
     "required": ["name", "hobbies"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "gender": {"enum": ["female", "male", "other"]}},
     "required": ["name", "gender"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}},
     "required": ["person"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "birthday": {"type": "string", "format": "date"}},
     "required": ["name", "birthday"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "height_m": {"type": "number", "minimum": 0.5,
                                                                                "maximum": 2.5}},
     "required": ["name", "height_m"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "employed": {"type": "boolean"},
                                      "company": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
     "required": ["name", "employed", "company"]},
    {"$defs": {"addr": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
     "type": "object", "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/addr"}},
     "required": ["name", "address"]},
]


@pytest.fixture(scope="module")
def default_served(default_gguf):
    """The default model as `thinkgate serve` loads it (weight mode `auto`: on this CPU the file's own blocks)."""
    from thinkgate.models.loader import load_model

    return load_model(str(default_gguf), weight_quant="auto", device="cpu")


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name", BACKENDS)
def test_real_model_person_records(default_served, name):
    from thinkgate.chat.template import render_chat
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine

    lm = default_served
    eng = LLMEngine(lm, EngineConfig(kv_cache_memory=256 * 2**20))
    backend = make_backend(lm.tokenizer, lm.eos_token_ids, name)
    prompt = lm.tokenizer.encode(render_chat(lm.tokenizer.chat_template, [
        {"role": "user", "content": "Invent a person and give their record as JSON."}]))
    for i, schema in enumerate(PERSON_SCHEMAS):
        eng.add_request(f"p{i}", prompt, SamplingParams(temperature=0, max_tokens=120),
                        grammar=backend.json_schema(schema))
    texts, reasons = run_all(eng)
    for i, schema in enumerate(PERSON_SCHEMAS):
        assert reasons[f"p{i}"] in ("grammar", "eos"), (i, reasons[f"p{i}"], texts[f"p{i}"])
        check(schema, texts[f"p{i}"])
