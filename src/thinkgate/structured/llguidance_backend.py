"""The default grammar backend: llguidance (small, no dependencies, fast enough on CPU)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import llguidance
import torch

from thinkgate.structured.backend import GrammarError, schema_key
from thinkgate.structured.bounds import (
    DEFAULT_BOUNDS,
    BoundedMatcher,
    NumberLexicon,
    bound_time_formats,
    bounds_for,
)


class LLGuidanceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher, vocab: int):
        self.m = matcher
        self.vocab = vocab

    def allowed_mask(self) -> torch.Tensor:
        raw = self.m.compute_logit_bias()  # one byte per token: 0 or 200
        mask = torch.frombuffer(bytearray(raw), dtype=torch.uint8).bool()
        if mask.numel() < self.vocab:
            mask = torch.cat([mask, torch.zeros(self.vocab - mask.numel(), dtype=torch.bool)])
        return mask[: self.vocab]

    def accept(self, token: int) -> bool:
        return self.m.consume_token(token)

    def rollback(self, n: int) -> None:
        self.m.rollback(n)

    def accepts_after(self, token: int, candidates: list[int]) -> bool:
        """One of `candidates` may follow `token` (the state is unchanged)."""
        return any(self.m.validate_tokens([token, c]) == 2 for c in candidates)

    def is_terminated(self) -> bool:
        return self.m.is_stopped()

    def is_accepting(self) -> bool:
        return self.m.is_accepting()


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer, eos_ids: list[int], cache_size: int = 256):
        self.vocab = tokenizer.vocab_size
        self.eos_ids = list(eos_ids)
        self.tok = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=self.vocab, eos_token=eos_ids)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._lexicon: NumberLexicon | None = None

    def number_lexicon(self) -> NumberLexicon:
        """The tokens' bytes as the number bounds read them (built on first use: ~0.5 s at 150k tokens)."""
        if self._lexicon is None:
            data = [self.tok.decode_bytes([i]) for i in range(self.vocab)]
            special = {i for i in range(self.vocab) if self.tok.is_special_token(i)}
            self._lexicon = NumberLexicon(data, special, self.vocab, self.eos_ids)
        return self._lexicon

    def json_schema(self, schema: dict, strict: bool = True) -> BoundedMatcher:
        bounds = bounds_for(schema)
        # Compact JSON (no whitespace between tokens) keeps outputs short and deterministic in shape, and
        # leaves no whitespace a model could repeat.
        options = {"whitespace_flexible": False}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(bound_time_formats(schema), defaults=options)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return self.bound(self._matcher(grammar, key="schema:" + schema_key(schema)), bounds)

    def json_object(self) -> BoundedMatcher:
        return self.json_schema({"type": "object"})

    def lark(self, grammar: str, schema: dict | None = None) -> BoundedMatcher:
        """`schema`: the JSON schema the grammar embeds with `%json`, whose values may need longer numbers."""
        bounds = bounds_for(schema) if schema is not None else DEFAULT_BOUNDS
        return self.bound(self._matcher(llguidance.LLMatcher.grammar_from_lark(grammar), key="lark:" + grammar),
                          bounds)

    def bound(self, matcher, bounds) -> BoundedMatcher:
        return BoundedMatcher(matcher, self.number_lexicon(), bounds)

    def _matcher(self, grammar: str, key: str) -> LLGuidanceMatcher:
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
        if proto is None:
            err = llguidance.LLMatcher.validate_grammar(grammar, self.tok)
            if err:
                raise GrammarError(_clean(err))
            proto = llguidance.LLMatcher(self.tok, grammar, log_level=0)
            if proto.is_error():
                raise GrammarError(_clean(proto.get_error()))
            with self._lock:
                self._cache[key] = proto
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return LLGuidanceMatcher(proto.deep_copy(), self.vocab)


def _clean(msg: str) -> str:
    return msg.strip().splitlines()[0][:500] if msg.strip() else "grammar rejected"
