"""Issue 21: a constrained answer cannot loop to the token cap. Both grammar backends and the tool-call grammar
bound a number's digits (16 before the point, 16 after, 3 in an exponent, more where the schema needs it)
and allow no whitespace between JSON tokens."""

import httpx
import jsonschema
import pytest

from tests.structured.schema_corpus import CORPUS
from thinkgate.chat.tools import tool_call_lark, tool_calls_schema
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.structured.backend import GrammarError, make_backend, xgrammar_installed
from thinkgate.structured.bounds import DEFAULT_BOUNDS, ESC, MAX_DIGITS, STR, NumberBounds, bounds_for

BACKENDS = ["llguidance", pytest.param("xgrammar", marks=pytest.mark.skipif(
    not xgrammar_installed(), reason="xgrammar is not installed (optional extra thinkgate[xgrammar])"))]
NUMBERS = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"}},
           "required": ["n", "x"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok(engine_factory):
    return engine_factory("qwen3").tokenizer


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, engine_factory):
    eng = engine_factory("qwen3")
    return make_backend(eng.tokenizer, sorted(eng.eos_ids), request.param)


def feed(tok, m, text: str) -> bool:
    """Feed `text` token by token; False as soon as the mask refuses a token."""
    for t in tok.encode(text):
        if not m.allowed_mask()[t] or not m.accept(t):
            return False
    return True


def token_set(tok, pred) -> list[int]:
    return [i for i in range(tok.vocab_size) if (b := tok.token_bytes(i)) and pred(b)]


def digits(tok):
    return token_set(tok, lambda b: b[:1].isdigit())


def whitespace(tok):
    return token_set(tok, lambda b: b[:1] in (b" ", b"\n", b"\t", b"\r"))


@pytest.mark.parametrize("prefix,bound", [('{"n":', 16), ('{"n":-', 16), ('{"n":1,"x":2.', 16), ('{"n":1,"x":2e', 3),
                                          ('{"n":1,"x":-2.5E-', 3)])
def test_a_digit_past_the_bound_is_refused(tok, backend, prefix, bound):
    m = backend.json_schema(NUMBERS)
    assert feed(tok, m, prefix + "1" * (bound - 1))
    assert m.allowed_mask()[digits(tok)].any()  # the last allowed digit
    assert feed(tok, m, "1")
    assert not m.allowed_mask()[digits(tok)].any()  # a 17th integer digit (4th exponent digit) is refused
    assert feed(tok, m, "1" * (bound + 1)) is False


def test_the_bound_holds_in_json_object_and_top_level_numbers(tok, backend):
    m = backend.json_object()
    assert feed(tok, m, '{"a":[' + "9" * 16) and not m.allowed_mask()[digits(tok)].any()
    m = backend.json_schema({"type": "integer"})
    assert feed(tok, m, "-" + "9" * 16) and not m.allowed_mask()[digits(tok)].any()
    assert m.is_accepting()


def test_digits_in_strings_are_not_numbers(tok, backend):
    schema = {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["s", "n"], "additionalProperties": False}
    m = backend.json_schema(schema)
    assert feed(tok, m, '{"s":"' + "1" * 40 + '\\"12","n":' + "1" * 16 + "}")


def test_rollback_restores_the_count(tok, backend):
    m = backend.json_schema(NUMBERS)
    assert feed(tok, m, '{"n":' + "1" * 16)
    m.rollback(1)
    assert m.allowed_mask()[digits(tok)].any() and feed(tok, m, "2") and not m.allowed_mask()[digits(tok)].any()


@pytest.mark.parametrize("make,text", [
    (lambda b: b.json_schema(NUMBERS), '{"n":12,"x":-0.5}'),
    (lambda b: b.json_object(), '{"a":[1,{"b":null}],"c":"d"}'),
    (lambda b: b.json_schema({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}}),
     '{"a":["x","y"]}'),
])
def test_no_whitespace_between_tokens(tok, backend, make, text):
    m, ws = make(backend), whitespace(tok)
    assert not m.allowed_mask()[ws].any()  # none before the value
    for t in tok.encode(text):
        assert m.allowed_mask()[t] and m.accept(t)
        if m.state[0] not in (STR, ESC):  # between tokens (in a string, a space is content)
            assert not m.allowed_mask()[ws].any()  # a run of whitespace past the bound (none) is refused
    assert m.is_accepting()


def tool_request(schema: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]})


def test_tool_call_arguments_are_bounded_too(tok, backend):
    req = tool_request({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    m = backend.lark(tool_call_lark(req, tok.token_id("<tool_call>"), tok.token_id("</tool_call>")),
                     tool_calls_schema(req))
    assert feed(tok, m, '<tool_call>\n{"name":"f","arguments":')
    assert not m.allowed_mask()[whitespace(tok)].any()
    assert feed(tok, m, '{"n":' + "7" * 16)
    assert not m.allowed_mask()[digits(tok)].any()
    assert feed(tok, m, '}}\n</tool_call>') and m.is_accepting()


def greedy(tok, m, prefer: str, limit: int = 80) -> str:
    """A model that loves one digit: it where allowed, else any digit, else the point (once); else stop."""
    want, point, out = tok.encode(prefer)[0], tok.encode(".")[0], []
    for _ in range(limit):
        allowed = set(m.allowed_mask().nonzero().flatten().tolist())
        digit = next((a for a in sorted(allowed) if tok.token_bytes(a)[:1].isdigit()), None)
        t = want if want in allowed else digit if digit is not None else point if point in allowed else None
        if t is None:
            break
        assert m.accept(t)
        out.append(t)
        point = None if t == point else point
    assert m.is_accepting()
    return tok.decode(out)


@pytest.mark.parametrize("schema,prefer", [
    ({"type": "number", "exclusiveMinimum": 0}, "0"),  # 0.000... must end in a nonzero 16th digit
    ({"type": "integer", "minimum": 2 * 10**15}, "0"),  # 1000... needs a 17th digit (the bound allows it)
])
def test_a_last_digit_after_which_the_number_cannot_end_is_refused(tok, backend, schema, prefer):
    text = greedy(tok, backend.json_schema(schema), prefer)
    jsonschema.validate(float(text) if "." in text else int(text), schema)
    whole, _, frac = text.partition(".")
    assert len(whole) <= bounds_for(schema).int_digits and len(frac) <= 16


def test_bounds_rise_to_what_a_schema_needs():
    assert bounds_for({"type": "integer"}) == DEFAULT_BOUNDS == NumberBounds(16, 16, 3)
    assert bounds_for({"type": "integer", "maximum": 10**30}).int_digits == 16  # allows small values too
    assert bounds_for({"type": "integer", "minimum": 2 * 10**15}).int_digits == 17
    assert bounds_for({"type": "integer", "maximum": -(10**20)}).int_digits == 22
    assert bounds_for({"enum": [1, 10**19]}).int_digits == 20
    assert bounds_for({"const": 0.1}).frac_digits == 17  # xgrammar writes 0.10000000000000001
    assert bounds_for({"type": "number", "multipleOf": 1e-20}).frac_digits == 20
    assert bounds_for({"type": "number", "minimum": 1e-18, "maximum": 2e-18}).frac_digits == 19
    assert bounds_for({"properties": {"s": {"type": "string", "maxLength": 10**20}}}) == DEFAULT_BOUNDS


def test_every_corpus_schema_gets_the_default_bounds():
    # The corpus answers (test_structured.py validates each, with both backends) are made under these bounds.
    assert {bounds_for(s) for s in CORPUS} == {DEFAULT_BOUNDS}


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "integer", "minimum": 10**45}, "minimum"),
    ({"type": "number", "exclusiveMaximum": -1e50}, "maximum"),
    ({"const": 1.5e300}, "const"),
    ({"properties": {"v": {"enum": [1, 10**41]}}}, "enum"),
    ({"type": "number", "minimum": 1e-45, "maximum": 2e-45}, "minimum"),
])
def test_a_schema_needing_more_than_the_ceiling_is_refused_by_name(backend, schema, keyword):
    with pytest.raises(GrammarError, match=f"{keyword}.*structured outputs allow at most {MAX_DIGITS}"):
        backend.json_schema(schema)


def test_the_api_says_so_naming_the_parameter(server):
    big = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**45}}, "required": ["n"]}
    for extra, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": big}}},
         "response_format.json_schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": big}}], "tool_choice": "required"},
         "tools"),
    ]:
        r = httpx.post(server.base + "/v1/chat/completions", timeout=30, json={
            "model": server.model_id, "messages": [{"role": "user", "content": "x"}], **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "46 digits before the decimal point" in err["message"], err
