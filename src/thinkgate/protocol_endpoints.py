"""Request bodies of the endpoints beyond chat: OpenAI's Responses API (`POST /v1/responses`) and the legacy
text completions (`POST /v1/completions`), type-checked as `protocol.py` checks chat requests.

Both are served by turning them into a chat request that `thinkgate.params.validate_chat` range-checks once
(api/openai_responses.py, api/text_completions.py). Unknown top-level fields are ignored; the thinkgate and
OpenRouter extras of chat (protocol.SamplingExtras: top_k, min_p, seed, stop, logit_bias, ...) pass through to the
chat request, where they are checked under the same names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema, field_validator

from thinkgate.protocol import (
    Choices,
    MaxTokens,
    SamplingExtras,
    StreamOptions,
    Temperature,
    ThinkingBudget,
    TopLogprobs,
    TopP,
    number_only,
)

# Chat request fields a Responses or text completion request may also carry (extra_body), as chat reads them.
CHAT_EXTRAS = tuple(SamplingExtras.model_fields)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)




# -- Responses ------------------------------------------------------------------------------------------
class InputPart(_Lenient):
    """A content part: input_text / output_text (text), or one this server cannot read (images, files)."""

    type: str
    text: str | None = None


class InputItem(_Lenient):
    """One item of `input`, any type: a message (role + content), a function_call, a function_call_output
    or a reasoning item. What each type needs is checked where the item is converted, naming `input[i]`."""

    type: str | None = Field(None, description='"message" when omitted', json_schema_extra={
        "enum": ["message", "function_call", "function_call_output", "reasoning", None]})
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    summary: list[InputPart] | None = None


def _only(*values: str) -> Any:
    """A string the route accepts only as one of `values` (checked where the request is converted, with an
    error naming the parameter; the JSON schema says it)."""
    return Field(json_schema_extra={"enum": list(values)})


_NEEDS_NAME = ConfigDict(json_schema_extra={"required": ["type", "name"]})


class ResponsesTool(_Lenient):
    """Responses' flat tool shape: `{"type": "function", "name", "description", "parameters", "strict"}`."""

    model_config = _NEEDS_NAME
    type: str = _only("function")
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ResponsesToolChoice(_Lenient):
    model_config = _NEEDS_NAME
    type: str = _only("function")
    name: str | None = Field(None, json_schema_extra={"minLength": 1})


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
    max_tokens: ThinkingBudget = None
    enabled: StrictBool | None = None
    exclude: StrictBool | None = None


class CreateResponseRequest(SamplingExtras):
    model: str
    input: list[InputItem]  # a string is one user message
    instructions: str | None = None
    reasoning: ResponsesReasoning | None = None
    text: TextConfig | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: MaxTokens = None
    max_tool_calls: StrictInt | None = None
    temperature: Temperature = None
    top_p: TopP = None
    top_logprobs: TopLogprobs = None
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

    _floats = field_validator("temperature", "top_p", mode="before")(number_only)

    @field_validator("input", mode="before", json_schema_input_type=str | list[InputItem])
    @classmethod
    def _one_message(cls, v):
        # Read as the items it stands for, so an error in a list of items names the item, not the union.
        return [{"type": "message", "role": "user", "content": v}] if isinstance(v, str) else v


# -- legacy text completions ----------------------------------------------------------------------------
MAX_PROMPTS = 32


def _prompt_schema() -> dict:
    ids = {"type": "array", "items": {"type": "integer"}}
    return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                           "maxItems": MAX_PROMPTS},
                      {**ids, "minItems": 1}, {"type": "array", "items": ids, "minItems": 1, "maxItems": MAX_PROMPTS}],
            "description": f"a string, strings, token ids or lists of token ids (at most {MAX_PROMPTS} prompts)"}


class CompletionRequest(SamplingExtras):
    model: str
    # A string, strings (one completion each), token ids, or lists of token ids.
    prompt: Annotated[str | list[str] | list[StrictInt] | list[list[StrictInt]], WithJsonSchema(_prompt_schema())]
    suffix: str | None = None
    max_tokens: MaxTokens = 16  # OpenAI's default; null = as much as the context allows
    temperature: Temperature = None
    top_p: TopP = None
    n: Choices = None
    best_of: Choices = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: TopLogprobs = None  # the number of most likely tokens to list at each position
    echo: StrictBool | None = None
    user: str | None = None

    _floats = field_validator("temperature", "top_p", mode="before")(number_only)
