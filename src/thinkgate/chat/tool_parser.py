"""Parse Qwen/Hermes tool calls out of the answer text, as it is written (`feed`, `finish`) or at once (`parse`).

Format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, possibly several, possibly after
some text. Events come as OpenAI streams a call: its head (id and name) as soon as the name is complete, then
its arguments in fragments as the model writes them; the fragments concatenate to the model's own JSON text
of the arguments object. The scanner tracks JSON strings, so a `</tool_call>` inside an argument value does
not end the call.

A call that began (its name was read) stays a call: cut short (token limit, stop string), it keeps the
arguments written so far; if its JSON turns out malformed, it keeps what was streamed and `malformed` is
set. A body that does not begin like a call (`{"name": "...", "arguments": {`; also `"parameters"`) is
decoded whole at its end tag: returned as a call if it is one, else as plain text with its tags (it is no
call, and text is never dropped) and `malformed` is set; such a body cut short before its end is dropped,
so no half-written call markup ever reaches the content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

START, END = "<tool_call>", "</tool_call>"
_WS = " \t\r\n"
_KEYS = ('"arguments"', '"parameters"')
_HEAD = ("{", ('"name"',), ":", None, ",", _KEYS, ":")  # None: the name's string
MAX_NAME = 256  # characters: an unclosed name string longer than this is no call head


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class ToolEvent:
    text: str = ""  # plain content
    call: ParsedToolCall | None = None  # a call begins: its id and name (its arguments follow as fragments)
    arguments: str = ""  # the next fragment of the current call's arguments


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
    key = "arguments" if "arguments" in obj else "parameters"
    args = obj.get(key, {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
        return ParsedToolCall(obj["name"], args)
    if not isinstance(args, dict):
        return None
    return ParsedToolCall(obj["name"], _raw_arguments(body, f'"{key}"') or json.dumps(args, ensure_ascii=False))


def collect(events: list[ToolEvent]) -> tuple[str, list[ParsedToolCall]]:
    """The content and the calls (arguments joined) that a list of events spells."""
    content, calls = [], []
    for e in events:
        content.append(e.text)
        if e.call is not None:
            calls.append(ParsedToolCall(e.call.name, "", e.call.id))
        if e.arguments:
            calls[-1].arguments += e.arguments
    return "".join(content), calls


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


def _raw_arguments(body: str, key: str = '"arguments"') -> str | None:
    """The exact text of the top-level `key` object value, if the body has one."""
    depth, last_key = 0, None
    for i, ch, str_start in _tokens(body):
        if ch == '"':
            if depth == 1:
                last_key = body[str_start:i + 1]
        elif ch in "{[":
            if depth == 1 and ch == "{" and last_key == key:
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


def _string_end(text: str, start: int, stop: int) -> int | None:
    """End (exclusive) of the JSON string that opens at `start`, if it closes before `stop`."""
    esc = False
    for i in range(start + 1, stop):
        ch = text[i]
        if esc:
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == '"':
            return i + 1
    return None


class _Strings:
    """Whether a JSON text is inside a string, read one character at a time."""

    def __init__(self):
        self.in_str = self.esc = False

    def quoted(self, ch: str) -> bool:
        """True if `ch` belongs to a string (its quotes included)."""
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
            return True
        self.in_str = ch == '"'
        return self.in_str


class _Call:
    """One call being read: its body so far and where each scan of it stands."""

    def __init__(self):
        self.body = ""
        self.scan, self.strings = 0, _Strings()  # the search for the end tag
        self.mode = "head"  # head -> args -> tail as it is written; "whole": decoded at the end
        self.step, self.pos = 0, 0  # where reading the head (`_HEAD`) stands
        self.head: ParsedToolCall | None = None
        self.args_start = self.sent = 0  # the arguments object starts at args_start; body[:sent] was sent
        self.depth, self.arg_strings = 0, _Strings()  # the scan of the arguments (up to `sent`)

    def find_end(self) -> int | None:
        """Where the end tag starts, or None; `scan` stops short of what may be the start of the tag."""
        b = self.body
        while self.scan < len(b):
            if not self.strings.quoted(b[self.scan]):
                if b.startswith(END, self.scan):
                    return self.scan
                if END.startswith(b[self.scan:]):
                    return None  # maybe the start of the end tag: wait for more (the scan stays here)
            self.scan += 1
        return None

    def read_head(self, stop: int) -> bool:
        """Read the head in body[:stop]; True when the name has just been read (the head is due)."""
        b, named = self.body, False
        while self.step < len(_HEAD):
            while self.pos < stop and b[self.pos] in _WS:
                self.pos += 1
            if self.pos >= stop:
                return named
            want = _HEAD[self.step]
            if want is None:  # the name
                end = _string_end(b, self.pos, stop) if b[self.pos] == '"' else -1
                if end is None:
                    if stop - self.pos > MAX_NAME:
                        self.mode = "whole"
                    return named
                try:
                    name = json.loads(b[self.pos:end]) if end > 0 else None
                except ValueError:
                    name = None
                if not name:
                    self.mode = "whole"
                    return named
                self.head, named, self.pos = ParsedToolCall(name, ""), True, end
            else:
                seg = b[self.pos:stop]
                hit = next((w for w in want if seg.startswith(w)), None)
                if hit is None:
                    if not any(w.startswith(seg) for w in want):
                        self.mode = "whole"
                    return named
                self.pos += len(hit)
            self.step += 1
        while self.pos < stop and b[self.pos] in _WS:
            self.pos += 1
        if self.pos < stop:
            if b[self.pos] == "{":
                self.mode, self.args_start, self.sent = "args", self.pos, self.pos
            else:
                self.mode = "whole"  # arguments as a string, or something else: decoded at the end
        return named

    def read_args(self, stop: int) -> str:
        """The arguments text written since the last call, up to `stop` or the object's end."""
        b, start = self.body, self.sent
        i = start
        while i < stop:
            ch = b[i]
            i += 1
            if self.arg_strings.quoted(ch):
                continue
            if ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.mode = "tail"
                    break
        self.sent = i
        return b[start:i]


class ToolCallParser:
    def __init__(self):
        self.buf = ""
        self.call: _Call | None = None
        self.num_calls = 0
        self.malformed = False  # a call's JSON was malformed (returned as text, or cut, or as written)

    def feed(self, delta: str) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        self.buf += delta
        while self.buf:
            if self.call is None:
                i = self.buf.find(START)
                if i == -1:
                    hold = _partial_suffix(self.buf, START)
                    self._text(events, self.buf[: len(self.buf) - hold])
                    self.buf = self.buf[len(self.buf) - hold:]
                    break
                self._text(events, self.buf[:i])
                self.buf = self.buf[i + len(START):]
                self.call = _Call()
            else:
                c = self.call
                c.body += self.buf
                self.buf = ""
                end = c.find_end()
                self._advance(events, c.scan if end is None else end)
                if end is None:
                    break
                self.buf = c.body[end + len(END):]
                self._close(events, c.body[:end], complete=True)
        return events

    def _advance(self, events: list[ToolEvent], stop: int) -> None:
        """Events for what body[:stop] (known not to hold the end tag) adds: the head, argument fragments."""
        c = self.call
        if c.mode == "head" and c.read_head(stop):
            self.num_calls += 1
            events.append(ToolEvent(call=c.head))
        if c.mode == "args":
            fragment = c.read_args(stop)
            if fragment:
                events.append(ToolEvent(arguments=fragment))

    def _close(self, events: list[ToolEvent], body: str, complete: bool) -> None:
        c, self.call = self.call, None
        call = decode_call(body.strip())
        if c.head is None:  # nothing was sent: the whole call now, or the text if it is none
            if call is None:
                self.malformed = True
                if complete:
                    self._text(events, START + body + END, force=True)
                return
            self.num_calls += 1
            events.append(ToolEvent(call=ParsedToolCall(call.name, "", call.id)))
            if call.arguments:
                events.append(ToolEvent(arguments=call.arguments))
        elif c.mode in ("head", "whole"):  # the arguments were not read as they came: send them whole
            if call is None:
                self.malformed = True
            elif call.arguments:
                events.append(ToolEvent(arguments=call.arguments))
        elif call is None or call.arguments != body[c.args_start:c.sent]:
            self.malformed = True  # the arguments stay as written (the client has them already)

    def _text(self, events: list[ToolEvent], text: str, force: bool = False) -> None:
        if not text:
            return
        if self.num_calls and not force and not text.strip():
            return  # newlines between or after calls are formatting, not content
        events.append(ToolEvent(text=text))

    def finish(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self.call is not None:  # a call cut short (token limit or stop string)
            c = self.call
            c.body += self.buf
            self.buf = ""
            self._advance(events, len(c.body))
            self._close(events, c.body, complete=False)
        elif self.buf:
            self._text(events, self.buf)
            self.buf = ""
        return events

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        p = ToolCallParser()
        return collect(p.feed(text) + p.finish())
