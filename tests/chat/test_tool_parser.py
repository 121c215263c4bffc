"""Tool-call parser: full text, token by token and random chunks agree on every fixture."""

import json
import random

import pytest

from thinkgate.chat.reasoning import ReasoningParser
from thinkgate.chat.tool_parser import ToolCallParser

FIXTURES = [
    # (text, expected content, expected [(name, arguments as parsed JSON)], malformed)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})], False),
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
     '{"y": [1, 2, {"z": null}]}}\n</tool_call>', "", [("a", {"x": 1}), ("b", {"y": [1, 2, {"z": None}]})], False),
    ('Let me check that.\n<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call>',
     "Let me check that.\n", [("lookup", {"q": "x"})], False),
    ('<tool_call>\n{"name": "write", "arguments": {"text": "a </tool_call> b \\" <tool_call> c", "n": {"d": {}}}}'
     '\n</tool_call>', "", [("write", {"text": 'a </tool_call> b " <tool_call> c', "n": {"d": {}}})], False),
    ('<tool_call>\n{"name": "天气", "arguments": {"城市": "北京 😀", "温度": -3.5}}\n</tool_call>', "",
     [("天气", {"城市": "北京 😀", "温度": -3.5})], False),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1,}}\n</tool_call>',
     '<tool_call>\n{"name": "f", "arguments": {"x": 1,}}\n</tool_call>', [], True),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 2}"}\n</tool_call>', "", [("f", {"x": 2})], False),
    ('<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>', "", [("g", {})], False),
    ('<tool_call>\n{"name": "cut", "arguments": {"a": 1}}', "", [("cut", {"a": 1})], False),  # stopped at the tag
    ("plain answer with < and <tool and tool_call>", "plain answer with < and <tool and tool_call>", [], False),
]


def _run(pieces):
    p = ToolCallParser()
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    content = "".join(e.text for e in events)
    calls = [(e.call.name, json.loads(e.call.arguments)) for e in events if e.call]
    return content, calls, p.malformed


@pytest.mark.parametrize("text,content,calls,malformed", FIXTURES)
def test_full_text(text, content, calls, malformed):
    got_content, got_calls = ToolCallParser().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls)


@pytest.mark.parametrize("text,content,calls,malformed", FIXTURES)
def test_char_by_char_and_random_chunks(text, content, calls, malformed):
    assert _run(list(text)) == (content, calls, malformed)
    rng = random.Random(len(text))
    for _ in range(30):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            pieces.append(text[i:i + n])
            i += n
        assert _run(pieces) == (content, calls, malformed)


def test_token_by_token(checkpoints):
    from thinkgate.engine.detokenizer import IncrementalDetokenizer
    from thinkgate.models.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(checkpoints["qwen3"])
    for text, content, calls, malformed in FIXTURES:
        d = IncrementalDetokenizer(tok, stop=[])
        deltas = []
        for i in tok.encode(text):
            d.add(i)
            deltas.append(d.take(final=False))
        assert _run(deltas) == (content, calls, malformed)


def test_call_after_think_and_call_inside_unfinished_reasoning():
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    for text, reasoning in ((f"thinking\n</think>\n\n{call}", "thinking"), (f"still thinking {call}", "still thinking")):
        rp = ReasoningParser("open", end_tags=("<tool_call>",))
        r, c = rp.feed(text)
        r2, c2 = rp.finish()
        assert (r + r2).strip() == reasoning
        content, calls = ToolCallParser().parse(c + c2)
        assert content == "" and [x.name for x in calls] == ["f"]
