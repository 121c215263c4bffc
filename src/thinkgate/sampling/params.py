"""Sampling parameters as the engine takes them. Requests are validated (with errors naming the API
parameter) once, in `thinkgate.params`, before they reach a provider; `check()` here only asserts the
engine's own invariants, for callers that build SamplingParams directly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

# Values used when neither the request nor the model's generation_config sets a field.
BUILTIN_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    """None means "unset": the model's generation_config default (then BUILTIN_DEFAULTS) applies."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    top_a: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    ignore_eos: bool = False
    # Thinking budget: after this many reasoning tokens the engine closes the thinking block itself.
    reasoning_budget: int | None = None
    # Whether the engine may draft and verify tokens ahead for this request (when it runs with speculation).
    speculative: bool = True

    def check(self, vocab_size: int) -> None:
        """Raise ValueError if the sampler could not run these values (an engine invariant, not API validation)."""
        numbers = {"temperature": (self.temperature, 0, 2), "top_p": (self.top_p, 0, 1),
                   "min_p": (self.min_p, 0, 1), "top_a": (self.top_a, 0, 1),
                   "repetition_penalty": (self.repetition_penalty, 0, None)}
        for name, (v, lo, hi) in numbers.items():
            if v is not None and (not math.isfinite(v) or v < lo or (hi is not None and v > hi)):
                raise ValueError(f"sampling parameter {name}={v!r} is outside [{lo}, {hi}]")
        if (self.top_k or 0) < 0 or self.min_tokens < 0 or not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"negative or out-of-range count in {self}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} leaves nothing to generate")
        bad = [t for t in [*self.logit_bias, *self.stop_token_ids] if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad} are outside the vocabulary (0..{vocab_size - 1})")

    def resolved(self, defaults: dict | None = None) -> SamplingParams:
        """A copy with every unset field filled from the model's defaults, then the built-in ones."""
        filled = {}
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in BUILTIN_DEFAULTS:
                filled[f.name] = (defaults or {}).get(f.name, BUILTIN_DEFAULTS[f.name])
        return replace(self, **filled)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
