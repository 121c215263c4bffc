"""Tool-call parser: full text, token by token and random chunks agree on every fixture; calls stream as
they are written; cut and malformed calls never put call markup in the content."""

import random

import pytest

from thinkgate.chat.reasoning import ReasoningParser
from thinkgate.chat.tool_parser import ToolCallParser, collect
from thinkgate.engine.request import FinishReason, RequestOutput
from thinkgate.gateway.providers.choice_stream import ChoiceStream

FIXTURES = [
    # (text, expected content, expected [(name, arguments text)], malformed)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", '{"city": "Paris"}')], False),
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": '
     '{"y": [1, 2, {"z": null}]}}\n</tool_call>', "", [("a", '{"x": 1}'), ("b", '{"y": [1, 2, {"z": null}]}')],
     False),
    ('Let me check that.\n<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call>',
     "Let me check that.\n", [("lookup", '{"q": "x"}')], False),
    ('<tool_call>\n{"name": "write", "arguments": {"text": "a </tool_call> b \\" <tool_call> c", "n": {"d": {}}}}'
     '\n</tool_call>', "", [("write", '{"text": "a </tool_call> b \\" <tool_call> c", "n": {"d": {}}}')], False),
    ('<tool_call>\n{"name": "天气", "arguments": {"城市": "北京 😀", "温度": -3.5}}\n</tool_call>', "",
     [("天气", '{"城市": "北京 😀", "温度": -3.5}')], False),
    ('<tool_call>\n{"name":"compact","arguments":{"a":"}]"}}\n</tool_call>\n', "", [("compact", '{"a":"}]"}')],
     False),
    # Malformed JSON after the name: the call stays a call, as written, flagged.
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1,}}\n</tool_call>', "", [("f", '{"x": 1,}')], True),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 2}"}\n</tool_call>', "", [("f", '{"x": 2}')], False),
    ('<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>', "", [("g", "{}")], False),
    ('<tool_call>\n{"name": "h"}\n</tool_call>', "", [("h", "{}")], False),
    ('<tool_call>\n{"name": "p", "parameters": {"a": [1, {"b": "}"}]}}\n</tool_call>', "",
     [("p", '{"a": [1, {"b": "}"}]}')], False),
    ('<tool_call>\n{"arguments": {"a": 1}, "name": "rev"}\n</tool_call>', "", [("rev", '{"a": 1}')], False),
    ('<tool_call>\n{"name": "cut", "arguments": {"a": 1}}', "", [("cut", '{"a": 1}')], False),  # stopped at the tag
    # Cut short (the token limit): the call with the arguments written so far; no markup in the content.
    ('<tool_call>\n{"name": "cut", "arguments": {"a": "hello wor', "", [("cut", '{"a": "hello wor')], True),
    ('Sure.<tool_call>\n{"name": "cut", "argum', "Sure.", [("cut", "")], True),
    ('<tool_call>\n{"na', "", [], True),
    # A body that is no call at all, complete between its tags: the text, never dropped.
    ('<tool_call>\nnot a call\n</tool_call>', "<tool_call>\nnot a call\n</tool_call>", [], True),
    ("plain answer with < and <tool and tool_call>", "plain answer with < and <tool and tool_call>", [], False),
]


def _run(pieces):
    p = ToolCallParser()
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    content, calls = collect(events)
    return content, [(c.name, c.arguments) for c in calls], p.malformed


@pytest.mark.parametrize("text,content,calls,malformed", FIXTURES)
def test_full_text(text, content, calls, malformed):
    got_content, got_calls = ToolCallParser().parse(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
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


def test_arguments_stream_as_they_are_written():
    args = '{"text": "' + "word " * 40 + '", "n": 3}'
    text = f'<tool_call>\n{{"name": "write", "arguments": {args}}}\n</tool_call>'
    p = ToolCallParser()
    log = []  # (characters fed so far, event)
    for i, ch in enumerate(text):
        log += [(i + 1, e) for e in p.feed(ch)]
    log += [(len(text), e) for e in p.finish()]
    heads = [(n, e.call) for n, e in log if e.call]
    frags = [(n, e.arguments) for n, e in log if e.arguments]
    # The head as soon as the name's closing quote is read, before any argument.
    assert len(heads) == 1 and heads[0][0] == text.index('"write"') + len('"write"')
    assert heads[0][1].name == "write" and heads[0][1].arguments == ""
    # One fragment per character here, each as soon as it is written, all before the end tag arrives.
    assert "".join(f for _, f in frags) == args and len(frags) == len(args)
    assert frags[-1][0] == text.index(args) + len(args) < text.index("</tool_call>")


def _output(text, finished=False, reason=None):
    return RequestOutput(request_id="r", new_token_ids=[0], text=text, finished=finished, finish_reason=reason,
                         stop_reason=None, num_prompt_tokens=1, num_cached_tokens=0, num_output_tokens=1)


def test_choice_stream_sends_the_head_then_fragments_before_the_call_ends():
    cs = ChoiceStream(0, "none", True, tools=True)
    pieces = ["<tool_call>", "\n", '{"name', '": "', "look", 'up", "', 'arguments": {"', "q", '": "', "long ",
              "query ", "text", '"}}', "\n", "</tool_call>"]
    seen = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        seen.append(cs.deltas(_output(piece, last, FinishReason.EOS if last else None)))
    calls = [d["tool_calls"][0] for ds in seen for d in ds if "tool_calls" in d]
    assert all("content" not in d for ds in seen for d in ds)
    assert calls[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                        "function": {"name": "lookup", "arguments": ""}}
    assert seen.index([{"tool_calls": [calls[0]]}]) == 5  # when 'up"' completed the name
    frags = [c["function"]["arguments"] for c in calls[1:]]
    assert "".join(frags) == '{"q": "long query text"}' and len(frags) > 3
    assert not seen[-1] and not seen[-2]  # the newline and the end tag add nothing
    fin = cs.finish(_output("", True, FinishReason.EOS))
    assert fin["finish_reason"] == "tool_calls" and fin["native_finish_reason"] == "eos"


def test_choice_stream_cut_call_is_a_call_with_finish_length():
    cs = ChoiceStream(0, "none", True, tools=True)
    deltas = cs.deltas(_output('Checking.<tool_call>\n{"name": "f", "arguments": {"city": "Par'))
    deltas += cs.deltas(_output("i", True, FinishReason.LENGTH))
    assert [d["content"] for d in deltas if "content" in d] == ["Checking."]
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert args == '{"city": "Pari'
    fin = cs.finish(_output("", True, FinishReason.LENGTH))
    assert fin["finish_reason"] == "length" and fin["native_finish_reason"] == "max_tokens"


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
        assert content == "" and [(x.name, x.arguments) for x in calls] == [("f", '{"a": 1}')]
