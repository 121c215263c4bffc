"""The chat completions request body (OpenAI + the seed page's OpenRouter-style fields).

Unknown top-level fields are ignored; known fields are type-checked here, then range-checked once by
`thinkgate.params.validate_chat`, which turns the request into frozen ChatParams for the providers. A number's
range is declared once, on its field (`Range`): the JSON schema of /openapi.json shows it and validate_chat
checks it (with a 400 that names the parameter, the range and the value), and so are the fields' descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema, field_validator

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 8
MAX_STOP = 4


@dataclass(frozen=True)
class Range:
    """A number field's allowed range, [lo, hi] or (lo, hi] (None: unbounded). Pydantic does not check it:
    `params.validate_chat` does, after the type checks, so the error names the range; the JSON schema shows it."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        for branch in schema.get("anyOf", [schema]):  # the number of `float | None`, not its null
            if branch.get("type") in ("number", "integer"):
                if self.lo is not None:
                    branch["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
                if self.hi is not None:
                    branch["maximum"] = self.hi
        return schema


def ranges(model: type[BaseModel]) -> dict[str, Range]:
    """The fields of `model` declared with a Range, in declaration order."""
    return {name: m for name, f in model.model_fields.items() for m in f.metadata if isinstance(m, Range)}


# Fields that more than one request type carries (chat, Responses, text completions), declared once.
MaxTokens = Annotated[StrictInt | None, Range(1)]
Temperature = Annotated[float | None, Range(0, 2)]
TopP = Annotated[float | None, Range(0, 1, lo_open=True)]
Penalty = Annotated[float | None, Range(-2, 2)]
TopLogprobs = Annotated[StrictInt | None, Range(0, MAX_TOP_LOGPROBS)]
Choices = Annotated[StrictInt | None, Range(1, MAX_CHOICES)]
ThinkingBudget = Annotated[StrictInt | None, Range(0)]
TOKEN_ID = Range(0)


def _stop_schema() -> dict:
    text = {"type": "string", "minLength": 1}
    return {"anyOf": [text, {"type": "array", "items": text, "maxItems": MAX_STOP}, {"type": "null"}]}


Stop = Annotated[str | list[str] | None, WithJsonSchema(_stop_schema())]
LOGIT_BIAS = Range(-100, 100)
TOKEN_ID_KEY = "^[0-9]+$"  # logit_bias keys: token ids written in decimal

class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # validated once, then read-only


def _doc(text: str, **kw) -> Any:
    return Field(None, description=text, **kw)


class ContentPart(_Lenient):
    type: str = Field(description='"text" (every model), "image_url" (vision models); other types are refused')
    text: str | None = _doc("the text of a text part")


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict = Field("{}", description="the arguments as a JSON string (or an object)")


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description='"developer" is treated as "system"')
    content: str | list[ContentPart] | None = _doc("a string, or parts whose texts are joined")
    name: str | None = None
    tool_calls: list[ToolCall] | None = _doc("an assistant turn's calls")
    tool_call_id: str | None = _doc("a tool message: the call it answers")
    reasoning: str | None = _doc("an assistant turn's reasoning (OpenRouter's name)")
    reasoning_content: str | None = _doc("an assistant turn's reasoning (DeepSeek's name)")


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64, description="letters, digits, _ - . ; unique among the tools")
    description: str | None = None
    parameters: dict[str, Any] | None = _doc("a JSON Schema of type object")
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema",
                                           description="the JSON Schema the content must match (required)")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="json_object / json_schema: the content is valid JSON (matching the schema), enforced by "
                    "constrained decoding after the reasoning ends")
    json_schema: JsonSchemaFormat | None = _doc('required with type "json_schema"')


class Reasoning(_Lenient):
    effort: Literal["minimal", "low", "medium", "high", "xhigh", "none"] | None = _doc(
        'a thinking budget as a share of the answer\'s room (low 0.2, medium 0.5, high 0.8); "none": no thinking')
    max_tokens: ThinkingBudget = _doc("a thinking budget in tokens")
    exclude: StrictBool | None = _doc("generate and bill the reasoning, but do not return it")
    enabled: StrictBool | None = _doc("false: no thinking (hybrid models)")


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = _doc("usage in an extra last chunk with empty choices")


def number_only(v):
    # JSON numbers only: a string or a boolean is a type error, not something to coerce.
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError("must be a number")
    return v


class SamplingExtras(_Lenient):
    """The sampling fields beyond OpenAI's (vLLM's and OpenRouter's), which a Responses or text completion
    request may carry too (the SDK's extra_body): declared here once for all three request types."""

    top_k: Annotated[StrictInt | None, Range(0)] = _doc("keep the k most likely tokens; 0 is off")
    min_p: Annotated[float | None, Range(0, 1)] = _doc("drop tokens with p < min_p * p_max")
    top_a: Annotated[float | None, Range(0, 1)] = _doc("drop tokens with p < top_a * p_max^2")
    frequency_penalty: Penalty = _doc("logit -= count in the output * value")
    presence_penalty: Penalty = _doc("logit -= value once a token is in the output")
    repetition_penalty: Annotated[float | None, Range(0, 2, lo_open=True)] = _doc(
        "tokens of prompt and output: positive logits / value, negative * value (default 1)")
    seed: StrictInt | None = _doc("same seed, request and server configuration: same output")
    logit_bias: dict[str, Annotated[float, LOGIT_BIAS]] | None = _doc(
        "token id -> a bias added to its logit before sampling",
        json_schema_extra={"propertyNames": {"pattern": TOKEN_ID_KEY}})
    stop: Stop = _doc("generation ends before the first match, which is not returned")
    stop_token_ids: list[Annotated[StrictInt, TOKEN_ID]] | None = _doc("token ids that end generation")
    min_tokens: Annotated[StrictInt | None, Range(0)] = _doc("tokens to generate before a stop may end it")
    ignore_eos: StrictBool | None = _doc("keep generating past the end-of-sequence token")
    chat_template_kwargs: dict[str, Any] | None = _doc("passed to the chat template (e.g. enable_thinking)")
    include_reasoning: StrictBool | None = _doc("false equals reasoning.exclude: true")
    speculative: StrictBool | None = _doc(
        "false: no n-gram speculative drafts for this request (the server drafts with serve --speculative ngram)")

    _numbers = field_validator("min_p", "top_a", "frequency_penalty", "presence_penalty", "repetition_penalty",
                               mode="before")(number_only)


class ChatCompletionRequest(SamplingExtras):
    model: str = Field(description="a served model's id (GET /v1/models)")
    messages: list[Message] = Field(min_length=1, description="the conversation, oldest first")
    stream: StrictBool = Field(False, description="an SSE stream of chat.completion.chunk, ending with [DONE]")
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens = _doc(
        "cap on generated tokens, reasoning included (default: the room left in the context)")
    max_completion_tokens: MaxTokens = _doc("as max_tokens, and wins over it")
    temperature: Temperature = _doc("0 is greedy (default: the model's)")
    top_p: TopP = _doc("nucleus sampling (default 1)")
    logprobs: StrictBool | None = _doc("return the log probabilities of the content tokens")
    top_logprobs: TopLogprobs = _doc("alternatives per position; needs logprobs")
    n: Choices = _doc("independent choices (default 1)")
    response_format: ResponseFormat | None = None
    structured_outputs: StrictBool | None = _doc("accepted (OpenRouter's capability flag), not forwarded")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = _doc(
        '"auto" by default with tools; "required" and a named function are enforced by constrained decoding')
    parallel_tool_calls: StrictBool | None = _doc("false: at most one call per turn")
    reasoning: Reasoning | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = _doc(
        "OpenAI's name for reasoning.effort (which wins)")
    verbosity: Literal["low", "medium", "high"] | None = _doc("low/high add one short instruction; medium nothing")
    user: str | None = _doc("an end-user id, kept with the usage record")

    _floats = field_validator("temperature", "top_p", mode="before")(number_only)
