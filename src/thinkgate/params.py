"""The one validation step: a parsed chat request becomes frozen, range-checked `ChatParams` before it is
routed, so every provider (our engine, an upstream) sees the same checks and the same errors.

`protocol.py` checks types (pydantic); this module checks ranges and how fields combine, with errors that
name the parameter. What depends on the model (its vocabulary, its context length, its template) is checked
by the provider that serves it, once, in `prepare()`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from thinkgate.chat.tools import validate_tools
from thinkgate.errors import InvalidRequestError
from thinkgate.protocol import (
    LOGIT_BIAS,
    MAX_STOP,
    TOKEN_ID,
    TOKEN_ID_KEY,
    ChatCompletionRequest,
    NamedToolChoice,
    Range,
    Reasoning,
    ranges,
)

_RANGES = ranges(ChatCompletionRequest)
_REASONING_RANGES = ranges(Reasoning)
# Fraction of the room left for the answer that each effort (`reasoning.effort`, else `reasoning_effort`)
# allows the thinking block.
EFFORT_FRACTION = {"none": 0.0, "minimal": 0.1, "low": 0.2, "medium": 0.5, "high": 0.8, "xhigh": 0.95}


def check_number(name: str, value, lo: float | None, hi: float | None, lo_open: bool = False,
                 integer: bool = False) -> None:
    """Raise a 400 naming `name` unless `value` is None or a finite number in [lo, hi] (or (lo, hi])."""
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


@dataclass(frozen=True)
class ChatParams:
    """A validated chat request. `request` keeps the typed body (messages, tools, response_format) for the
    provider to render or forward; the other fields are the checked, defaulted values to use."""

    request: ChatCompletionRequest
    n: int
    max_tokens: int | None  # max_completion_tokens, else max_tokens; None = as much as the context allows
    max_tokens_param: str  # which of the two the client sent (for errors that depend on the model)
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    top_a: float
    frequency_penalty: float
    presence_penalty: float
    repetition_penalty: float | None
    seed: int | None
    min_tokens: int
    ignore_eos: bool
    logit_bias: tuple[tuple[int, float], ...]
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    logprobs: bool
    top_logprobs: int
    use_tools: bool  # tools given and tool_choice is not "none": the answer may hold calls
    forced_tools: bool  # tool_choice "required" or a named function: the answer is calls only
    reasoning_max_tokens: int | None
    reasoning_effort: str | None
    thinking_enabled: bool | None  # reasoning.enabled (False also for an effort of "none")
    show_reasoning: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage
    speculative: bool = True  # extra body field: false keeps the engine from drafting tokens for this request

    @property
    def model(self) -> str:
        return self.request.model


def check_ranges(obj, fields: dict[str, Range], prefix: str = "") -> None:
    """Each field of `obj` declared with a Range (protocol.py), checked: a 400 naming it, its range and value."""
    for name, r in fields.items():
        check_number(prefix + name, getattr(obj, name), r.lo, r.hi, r.lo_open)


def validate_chat(req: ChatCompletionRequest) -> ChatParams:
    check_ranges(req, _RANGES)
    if req.max_completion_tokens is not None:
        max_tokens, max_name = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_name = req.max_tokens, "max_tokens"
    min_tokens = req.min_tokens or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(f"min_tokens ({min_tokens}) must not exceed {max_name} ({max_tokens})",
                                  param="min_tokens")
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP:
        raise InvalidRequestError(f"stop accepts at most {MAX_STOP} sequences, got {len(stop)}", param="stop")
    if any(s == "" for s in stop):
        raise InvalidRequestError("stop sequences must not be empty", param="stop")
    if any(t < TOKEN_ID.lo for t in req.stop_token_ids or ()):
        raise InvalidRequestError("stop_token_ids must hold token ids (>= 0)", param="stop_token_ids")
    bias = []
    for k, v in (req.logit_bias or {}).items():
        if not re.fullmatch(TOKEN_ID_KEY, k):
            raise InvalidRequestError(f"logit_bias key {k!r} is not a token id", param="logit_bias")
        check_number("logit_bias", v, LOGIT_BIAS.lo, LOGIT_BIAS.hi)
        bias.append((int(k), float(v)))
    r = req.reasoning
    if r is not None:
        check_ranges(r, _REASONING_RANGES, "reasoning.")
    validate_tools(req)
    use_tools = bool(req.tools) and req.tool_choice != "none"
    forced = use_tools and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice))
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.schema_ is None):
        raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                  param="response_format.json_schema")
    show = not (req.include_reasoning is False or (r is not None and r.exclude))
    # `reasoning.effort` wins over OpenAI's top-level `reasoning_effort`; "none" turns thinking off, as
    # `reasoning.enabled: false` does, unless `reasoning.enabled` says otherwise.
    effort = r.effort if r is not None and r.effort is not None else req.reasoning_effort
    enabled = r.enabled if r is not None else None
    if enabled is None and effort == "none":
        enabled = False
    speculative = req.speculative is not False
    return ChatParams(
        request=req, n=req.n if req.n is not None else 1, max_tokens=max_tokens, max_tokens_param=max_name,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, top_a=req.top_a or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        repetition_penalty=req.repetition_penalty, seed=req.seed, min_tokens=min_tokens,
        ignore_eos=bool(req.ignore_eos), logit_bias=tuple(bias), stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()), logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0, use_tools=use_tools, forced_tools=forced,
        reasoning_max_tokens=r.max_tokens if r is not None else None,
        reasoning_effort=effort, thinking_enabled=enabled, show_reasoning=show, stream=req.stream,
        include_usage=bool(req.stream_options is not None and req.stream_options.include_usage),
        speculative=speculative,
    )
