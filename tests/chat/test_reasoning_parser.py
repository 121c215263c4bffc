"""Reasoning parser: full text, token by token and random chunks all agree."""

import random

import pytest

from thinkgate.chat.reasoning import ReasoningParser

FIXTURES = [
    # (mode, output text, expected reasoning, expected content)
    ("open", "Let me think.\nStep 1.\n</think>\n\nThe answer is 4.", "Let me think.\nStep 1.", "The answer is 4."),
    ("open", "</think>\n\nImmediate answer", "", "Immediate answer"),
    ("open", "Thinking that never ends\nmore", "Thinking that never ends\nmore", ""),
    ("open", "思考中……😀\n</think>\n\n答案是：四 ✓", "思考中……😀", "答案是：四 ✓"),
    ("open", "a < b and </thin k> is not a tag\n</think>\nok </think> stays", "a < b and </thin k> is not a tag",
     "ok </think> stays"),
    ("hybrid", "<think>\nhybrid reasoning\n</think>\n\nhybrid answer", "hybrid reasoning", "hybrid answer"),
    ("hybrid", "<think>\n\n</think>\n\nno thoughts", "", "no thoughts"),
    ("hybrid", "Just an answer, <think> later is content", None, "Just an answer, <think> later is content"),
    ("hybrid", "<think>truncated", "truncated", ""),
    ("none", "<think>not parsed</think> plain", None, "<think>not parsed</think> plain"),
    ("none", "\n\nleading newlines kept", None, "\n\nleading newlines kept"),
]


def _stream(mode, pieces):
    p = ReasoningParser(mode)
    r = c = ""
    for piece in pieces:
        a, b = p.feed(piece)
        r, c = r + a, c + b
    a, b = p.finish()
    return r + a, c + b


@pytest.mark.parametrize("mode,text,reasoning,content", FIXTURES)
def test_full_text(mode, text, reasoning, content):
    assert ReasoningParser(mode).parse(text) == (reasoning, content)


@pytest.mark.parametrize("mode,text,reasoning,content", FIXTURES)
def test_char_by_char_and_random_chunks(mode, text, reasoning, content):
    expect = (reasoning or "", content)
    assert _stream(mode, list(text)) == expect
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(30):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            pieces.append(text[i:i + n])
            i += n
        assert _stream(mode, pieces) == expect


def test_token_by_token_with_real_tokenizer(checkpoints):
    from thinkgate.engine.detokenizer import IncrementalDetokenizer
    from thinkgate.models.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(checkpoints["qwen3"])
    for mode, text, reasoning, content in FIXTURES:
        detok = IncrementalDetokenizer(tok, stop=[])
        deltas = []
        for i in tok.encode(text):  # the deltas the server streams: one token at a time
            detok.add(i)
            deltas.append(detok.take(final=False))
        assert "".join(deltas) == text
        assert _stream(mode, deltas) == (reasoning or "", content)


def test_tag_never_leaks_into_a_delta():
    p = ReasoningParser("open")
    out = [p.feed(x) for x in ["abc\n</", "thi", "nk>", "\n\nhello"]]
    assert all("<" not in r and "<" not in c for r, c in out)
    assert "".join(r for r, _ in out) == "abc" and "".join(c for _, c in out) == "hello"
