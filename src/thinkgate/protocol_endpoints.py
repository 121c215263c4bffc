"""Request bodies of the endpoints beyond chat: OpenAI's Responses API (`POST /v1/responses`) and the legacy
text completions (`POST /v1/completions`), type-checked as `protocol.py` checks chat requests.

Both are served by turning them into a chat request that `thinkgate.params.validate_chat` range-checks once
(api/openai_responses.py, api/text_completions.py). Unknown top-level fields are ignored; the thinkgate and
OpenRouter extras of chat (top_k, min_p, repetition_penalty, seed, stop, logit_bias, ...) pass through to the
chat request, where they are checked under the same names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

# Chat request fields a Responses or text completion request may also carry (extra_body), as chat reads them.
CHAT_EXTRAS = ("top_k", "min_p", "top_a", "frequency_penalty", "presence_penalty", "repetition_penalty", "seed",
               "logit_bias", "stop", "stop_token_ids", "min_tokens", "ignore_eos", "chat_template_kwargs",
               "include_reasoning")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


def _number(v):
    # JSON numbers only: a string or a boolean is a type error, not something to coerce.
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError("must be a number")
    return v


# -- Responses ------------------------------------------------------------------------------------------
class InputPart(_Lenient):
    """A content part: input_text / output_text (text), or one this server cannot read (images, files)."""

    type: str
    text: str | None = None


class InputItem(_Lenient):
    """One item of `input`, any type: a message (role + content), a function_call, a function_call_output
    or a reasoning item. What each type needs is checked where the item is converted, naming `input[i]`."""

    type: str | None = None  # "message" when omitted
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    summary: list[InputPart] | None = None


class ResponsesTool(_Lenient):
    """Responses' flat tool shape: `{"type": "function", "name", "description", "parameters", "strict"}`."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ResponsesToolChoice(_Lenient):
    type: str
    name: str | None = None


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: str | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesReasoning(_Lenient):
    # "max" is OpenAI's newest level; it maps to chat's highest, "xhigh". max_tokens / enabled / exclude
    # are the chat extensions (a thinking budget in tokens, thinking off, reasoning not returned).
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    max_tokens: StrictInt | None = None
    enabled: StrictBool | None = None
    exclude: StrictBool | None = None


class CreateResponseRequest(_Lenient):
    model: str
    input: list[InputItem]  # a string is one user message
    instructions: str | None = None
    reasoning: ResponsesReasoning | None = None
    text: TextConfig | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = None
    max_tool_calls: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: StrictInt | None = None
    include: list[str] | None = None
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    store: StrictBool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: StrictBool | None = None
    prompt: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None

    _numbers = field_validator("temperature", "top_p", mode="before")(_number)

    @field_validator("input", mode="before")
    @classmethod
    def _one_message(cls, v):
        # Read as the items it stands for, so an error in a list of items names the item, not the union.
        return [{"type": "message", "role": "user", "content": v}] if isinstance(v, str) else v


# -- legacy text completions ----------------------------------------------------------------------------
class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class CompletionRequest(_Lenient):
    model: str
    # A string, strings (one completion each), token ids, or lists of token ids.
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    suffix: str | None = None
    max_tokens: StrictInt | None = 16  # OpenAI's default; null = as much as the context allows
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictInt | None = None  # the number of most likely tokens to list at each position
    echo: StrictBool | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: StrictInt | None = None
    user: str | None = None

    _numbers = field_validator("temperature", "top_p", "frequency_penalty", "presence_penalty",
                               mode="before")(_number)
