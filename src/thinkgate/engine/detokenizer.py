"""Incremental detokenization with stop strings.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is only released once it
decodes cleanly. Text that could still turn out to be the start of a stop string is held back too.
"""

from __future__ import annotations

from thinkgate.models.tokenizer import ModelTokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: ModelTokenizer, stop: list[str], skip_special: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far (after stop truncation)
        self.emitted = 0  # chars of self.text already released

    def add(self, token_id: int) -> str | None:
        """Append one token. Returns the stop string if one now matches (text is cut before it)."""
        self.ids.append(token_id)
        if self.skip_special and token_id in self.tokenizer.special_ids:
            return None
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return None  # an incomplete UTF-8 sequence: wait for the next token
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += new
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) != -1]
        if hits:
            i, s = min(hits)
            self.text = self.text[:i]
            return s
        return None

    def flush(self) -> None:
        """At the end, release bytes that never formed a whole character (as U+FFFD, like transformers)."""
        if self.read_offset < len(self.ids):
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
            full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special)
            self.text += full[len(prefix):]
            self.read_offset = len(self.ids)

    def take(self, final: bool) -> str:
        """New text to release; at the end everything left is released."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
