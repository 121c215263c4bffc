"""Parse Qwen/Hermes tool calls out of the answer text, all at once (`parse`) or incrementally (`feed`).

Format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, possibly several, possibly after
some text. The scanner tracks JSON strings, so a `</tool_call>` inside an argument value does not end the
call. A call is released once it is complete (so streaming and non-streaming always agree); a call whose
JSON is malformed is returned as plain text, never dropped. `arguments` is the model's own JSON text of
the arguments object (valid JSON, checked), so concatenated stream fragments equal the final string.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

START, END = "<tool_call>", "</tool_call>"


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class ToolEvent:
    text: str = ""  # plain content
    call: ParsedToolCall | None = None


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def decode_call(body: str) -> ParsedToolCall | None:
    """The call in `body` (the text between the tags), or None if it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
        return ParsedToolCall(obj["name"], args)
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], _raw_arguments(body) or json.dumps(args, ensure_ascii=False))


def _tokens(text: str, start: int = 0):
    """(index, char) for every JSON structural character from `start` on; a string yields its closing
    quote as (index, '"', string_start), so callers see keys without re-scanning escapes."""
    in_str, esc, str_start = False, False, -1
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                yield i, '"', str_start
        elif ch == '"':
            in_str, str_start = True, i
        elif ch in "{}[],":
            yield i, ch, -1


def _raw_arguments(body: str) -> str | None:
    """The exact text of the top-level "arguments" object value, if the body has one."""
    depth, last_key = 0, None
    for i, ch, str_start in _tokens(body):
        if ch == '"':
            if depth == 1:
                last_key = body[str_start:i + 1]
        elif ch in "{[":
            if depth == 1 and ch == "{" and last_key == '"arguments"':
                end = _match_close(body, i)
                return body[i:end] if end else None
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 1:
            last_key = None
    return None


def _match_close(text: str, start: int) -> int | None:
    """End (exclusive) of the JSON object or array that opens at `start`."""
    depth = 0
    for i, ch, _ in _tokens(text, start):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class ToolCallParser:
    def __init__(self):
        self.buf = ""
        self.in_call = False
        self.body = ""
        self.scan = 0  # position in body scanned for the end tag
        self.in_str = False
        self.esc = False
        self.num_calls = 0
        self.malformed = False

    def feed(self, delta: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        self.buf += delta
        while self.buf:
            if not self.in_call:
                i = self.buf.find(START)
                if i == -1:
                    hold = _partial_suffix(self.buf, START)
                    self._text(events, self.buf[: len(self.buf) - hold])
                    self.buf = self.buf[len(self.buf) - hold:]
                    break
                self._text(events, self.buf[:i])
                self.buf = self.buf[i + len(START):]
                self.in_call, self.body, self.scan, self.in_str, self.esc = True, "", 0, False, False
            else:
                self.body += self.buf
                self.buf = ""
                end = self._find_end()
                if end is None:
                    break
                rest = self.body[end + len(END):]
                self._close(events, self.body[:end], complete=True)
                self.buf = rest
        return events

    def _find_end(self) -> int | None:
        b = self.body
        while self.scan < len(b):
            ch = b[self.scan]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif b.startswith(END, self.scan):
                return self.scan
            elif END.startswith(b[self.scan:]):
                return None  # maybe the start of the end tag: wait for more
            self.scan += 1
        return None

    def _close(self, events: list[ToolEvent], body: str, complete: bool) -> None:
        self.in_call = False
        call = decode_call(body.strip())
        if call is None:
            self.malformed = True
            self._text(events, START + body + (END if complete else ""), force=True)
            return
        self.num_calls += 1
        events.append(ToolEvent(call=call))

    def _text(self, events: list[ToolEvent], text: str, force: bool = False) -> None:
        if not text:
            return
        if self.num_calls and not force and not text.strip():
            return  # newlines between or after calls are formatting, not content
        events.append(ToolEvent(text=text))

    def finish(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self.in_call:
            self.body += self.buf
            self.buf = ""
            self._close(events, self.body, complete=False)  # a call cut short (stop string or length)
        elif self.buf:
            self._text(events, self.buf)
            self.buf = ""
        return events

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        p = ToolCallParser()
        events = p.feed(text) + p.finish()
        content = "".join(e.text for e in events)
        return content, [e.call for e in events if e.call]
