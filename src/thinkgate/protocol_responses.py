"""What the API answers, as pydantic models for /openapi.json (api/openapi.py): the OpenAI error body, chat
completions and their stream chunks, models, Responses, text completions, and the health answer.

The routes build these bodies as dicts (api/responses.py, api/openai_responses.py, api/text_completions.py);
these models only describe them, and tests/api/test_openapi.py checks real answers against the document made
from them (schemathesis checks every answer it gets). Fields the API always writes are required (nullable
where they may be null); objects may carry more fields than listed, as OpenAI's own schemas allow.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors ------------------------------------------------------------------------------------------------
class ErrorDetail(_Body):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, insufficient_quota, "
                                  "permission_error, not_found_error, rate_limit_error, server_error, ...")
    param: str | None = Field(description="the request parameter the error is about")
    code: str | None = Field(description="the case, e.g. model_not_found, context_length_exceeded, queue_full")


class ErrorResponse(_Body):
    """Every error this server answers with, as OpenAI writes it; the HTTP status is the response's."""

    error: ErrorDetail


# -- chat completions --------------------------------------------------------------------------------------
class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Body):
    content: list[TokenLogprob] | None
    refusal: None = None


class FunctionCallOut(_Body):
    name: str
    arguments: str = Field(description="a JSON string")


class ToolCallOut(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | None = Field(description="null for a message of tool calls only")
    refusal: None
    reasoning: str | None = Field(description="the thinking text (null when hidden or not produced)")
    reasoning_content: str | None = Field(description="the same text under DeepSeek's name")
    tool_calls: list[ToolCallOut] | None = None


FINISH = ("stop, length, tool_calls, content_filter or error; native_finish_reason keeps the engine's own "
          "(eos, stop_sequence, max_tokens, abort, ...)")


class Choice(_Body):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None = Field(description=FINISH)
    native_finish_reason: str | None


class PromptTokensDetails(_Body):
    cached_tokens: int


class CompletionTokensDetails(_Body):
    reasoning_tokens: int


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int = Field(description="reasoning included")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails
    cost: float = Field(description="CNY, from the catalog's prices")


class ChatCompletion(_Body):
    """A chat completion; with `stream: true`, an SSE stream of ChatCompletionChunk ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None


class ToolCallDelta(_Body):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, Any] | None = Field(None, description="name (first delta), arguments (pieces)")


class Delta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Body):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = Field(None, description=FINISH)
    native_finish_reason: str | None = None


class ChatCompletionChunk(_Body):
    """One `data:` line of a stream (`stream: true`); the stream ends with `data: [DONE]`. An error after the
    stream began is a chunk with `error` and a choice whose finish_reason is "error"."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, description="on the last chunk (an extra one with empty choices when "
                                                  "stream_options.include_usage is set)")
    error: ErrorDetail | None = None


# -- models ------------------------------------------------------------------------------------------------
class ModelCard(_Body):
    """A served model."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = None
    pricing: dict[str, Any] | None = Field(None, description="CNY per 1000 tokens")
    supported_parameters: list[str] | None = None


class ModelList(_Body):
    """The models served now."""

    object: Literal["list"]
    data: list[ModelCard]


# -- Responses ---------------------------------------------------------------------------------------------
class OutputItem(_Body):
    type: Literal["message", "reasoning", "function_call"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] | None = None
    content: list[dict[str, Any]] | None = Field(None, description="output_text or reasoning_text parts")
    summary: list[dict[str, Any]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


class ResponseUsage(_Body):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int
    cost: float | None = None


class ResponseObject(_Body):
    """A Response (OpenAI's Responses API); with `stream: true`, SSE events `response.created` ...
    `response.completed` whose last carries this object."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    completed_at: int | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None


class ResponseStreamEvent(_Body):
    """One event of a streamed Response: `event: <type>` then `data: <this>`, from response.created to
    response.completed (or .incomplete, .failed), which carries the whole Response; no [DONE] follows."""

    type: str = Field(description="response.created, response.output_item.added, response.output_text.delta, ...")
    sequence_number: int
    response: ResponseObject | None = None


# -- text completions --------------------------------------------------------------------------------------
class TextLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(_Body):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str | None = Field(description=FINISH)
    native_finish_reason: str | None = None


class TextCompletion(_Body):
    """A text completion; with `stream: true`, SSE chunks of this shape ending with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


# -- health ------------------------------------------------------------------------------------------------
class Health(_Body):
    """Liveness: the server answers."""

    status: Literal["ok"]
    models: list[str]
    active_requests: int
