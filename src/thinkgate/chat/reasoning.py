"""Split Qwen3 output into reasoning and content, all at once (`parse`) or incrementally (`feed`).

Modes: 'open' (Thinking-2507: the prompt opened <think>, so output starts as reasoning), 'hybrid' (hybrid
Qwen3: reasoning only if the output opens <think>), 'none' (no reasoning). Reasoning is the text before
the first </think> with surrounding newlines stripped; content is what follows, leading newlines stripped.
Without </think>, everything after <think> is reasoning (truncated thinking). A tag split across deltas
never leaks: text that may be the start of a tag is held back until it is decided.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    def __init__(self, mode: str = "open", end_tags: tuple[str, ...] = ()):
        if mode not in ("open", "hybrid", "none"):
            raise ValueError(f"unknown reasoning mode {mode!r}")
        self.mode = mode
        # Extra texts that end reasoning and are kept as content (e.g. "<tool_call>" while thinking).
        self.end_tags = end_tags
        self.state = {"open": "reasoning", "hybrid": "start", "none": "content"}[mode]
        self.buf = ""  # undecided text
        self.pending_nl = ""  # newlines inside reasoning, released only if more reasoning follows
        self.reasoning_started = False
        self.content_started = mode == "none"
        self.entered = mode == "open"  # whether the output had a reasoning block at all

    # -- incremental ------------------------------------------------------------------------------
    def feed(self, delta: str) -> tuple[str, str]:
        r, c = [], []
        self.buf += delta
        while self.buf:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(OPEN):
                    self.buf, self.state, self.entered = s[len(OPEN):], "reasoning", True
                elif OPEN.startswith(s):
                    break  # could still become <think>
                else:
                    self.state = "content"
                    self.content_started = True
            elif self.state == "reasoning":
                tags = (CLOSE, *self.end_tags)
                hits = [(i, t) for t in tags if (i := self.buf.find(t)) != -1]
                if hits:
                    i, tag = min(hits)
                    r.append(self._reasoning_text(self.buf[:i], final=True))
                    self.buf = self.buf[i + len(CLOSE):] if tag == CLOSE else self.buf[i:]
                    self.state = "content"
                    continue
                hold = max(_partial_suffix(self.buf, t) for t in tags)
                r.append(self._reasoning_text(self.buf[: len(self.buf) - hold], final=False))
                self.buf = self.buf[len(self.buf) - hold:]
                break
            else:  # content
                if not self.content_started:
                    self.buf = self.buf.lstrip("\n")
                    if not self.buf:
                        break
                    self.content_started = True
                c.append(self.buf)
                self.buf = ""
        return "".join(r), "".join(c)

    def _reasoning_text(self, text: str, final: bool) -> str:
        if not self.reasoning_started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self.reasoning_started = True
        text = self.pending_nl + text
        stripped = text.rstrip("\n")
        self.pending_nl = "" if final else text[len(stripped):]
        return stripped

    def finish(self) -> tuple[str, str]:
        """Flush held text at the end of generation."""
        buf, self.buf = self.buf, ""
        if self.state == "start":
            self.state = "content"
            return "", buf.lstrip("\n") if not self.content_started else buf
        if self.state == "reasoning":
            return self._reasoning_text(buf, final=True), ""
        return "", buf

    # -- whole text -------------------------------------------------------------------------------
    def parse(self, text: str) -> tuple[str | None, str]:
        """(reasoning or None, content) for a complete output."""
        p = ReasoningParser(self.mode, self.end_tags)
        r1, c1 = p.feed(text)
        r2, c2 = p.finish()
        reasoning = r1 + r2
        return (reasoning if p.entered else None), c1 + c2
