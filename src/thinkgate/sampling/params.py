"""Sampling parameters: every knob on the seed page, validated with errors that name the parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from thinkgate.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20

# Values used when neither the request nor the model's generation_config sets a field.
BUILTIN_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _num(name: str, value, lo: float | None, hi: float | None, lo_open=False, integer=False):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(f"{name} must be {kind}, got {value!r}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be finite, got {value!r}", param=name)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        rng = f"{lo_s}, {hi_s}]" if lo_s != "-inf" else f"<= {hi_s}"
        raise InvalidRequestError(f"{name} must be in {rng}, got {value!r}", param=name)


@dataclass
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

    def __post_init__(self):
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        _num("temperature", self.temperature, 0, 2)
        _num("top_p", self.top_p, 0, 1, lo_open=True)
        _num("top_k", self.top_k, 0, None, integer=True)
        _num("min_p", self.min_p, 0, 1)
        _num("top_a", self.top_a, 0, 1)
        _num("frequency_penalty", self.frequency_penalty, -2, 2)
        _num("presence_penalty", self.presence_penalty, -2, 2)
        _num("repetition_penalty", self.repetition_penalty, 0, 2, lo_open=True)
        _num("seed", self.seed, None, None, integer=True)
        _num("max_tokens", self.max_tokens, 1, None, integer=True)
        _num("min_tokens", self.min_tokens, 0, None, integer=True)
        _num("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, integer=True)
        _num("n", self.n, 1, 8, integer=True)
        _num("reasoning_budget", self.reasoning_budget, 0, None, integer=True)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", param="min_tokens")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a string or an array of strings", param="stop")
        if len(self.stop) > 4:
            raise InvalidRequestError(f"stop accepts at most 4 sequences, got {len(self.stop)}", param="stop")
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("stop sequences must not be empty", param="stop")
        for k, v in self.logit_bias.items():
            if not isinstance(k, int) or isinstance(k, bool):
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
            _num("logit_bias", v, -100, 100)
            if k < 0 or (vocab_size is not None and k >= vocab_size):
                raise InvalidRequestError(
                    f"logit_bias key {k} is not a token id of this model (0..{(vocab_size or 1) - 1})",
                    param="logit_bias")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise InvalidRequestError(f"stop_token_ids holds an invalid token id {t!r}", param="stop_token_ids")

    def resolved(self, defaults: dict | None = None) -> SamplingParams:
        """A copy with every unset field filled from the model's defaults, then the built-in ones."""
        out = replace(self)
        for f in fields(self):
            if getattr(out, f.name) is None and f.name in BUILTIN_DEFAULTS:
                value = (defaults or {}).get(f.name, BUILTIN_DEFAULTS[f.name])
                setattr(out, f.name, value)
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
