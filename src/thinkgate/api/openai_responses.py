"""OpenAI's Responses API (`POST /v1/responses`) over the same providers as chat.

A Responses request becomes a chat request (instructions + input items -> messages, flat function tools ->
chat tools, `text.format` -> response_format, `reasoning` -> the thinking budget, `max_output_tokens` ->
the completion cap), is validated once by `validate_chat` and started through the app's dispatcher, so the
usage record reaches the same hook, the gateway's checks apply and a client that goes away stops the run.
The provider's chunks become output items (reasoning, message, function_call, in the order the model writes
them) and the Responses stream events; a non-streamed response is the last event's `response`, built by the
same code.

Storage: nothing is stored. `store` is accepted (true is OpenAI's default, so rejecting it would break every
client) and the response says `"store": false`, as vLLM does without a response store;
`previous_response_id`, `conversation`, `background` and item references need stored responses and are a
400 naming the parameter. Reasoning comes back in full as a reasoning item's `reasoning_text` content (no
summary is written; `reasoning.summary` is echoed and its `summary` list stays empty).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from thinkgate.api.delivery import accepted, collected, streamed
from thinkgate.api.openapi import GENERATES, documented
from thinkgate.api.provider_run import KEEPALIVE
from thinkgate.api.requests import validation_error
from thinkgate.config import ServerConfig
from thinkgate.errors import InvalidRequestError, error_body
from thinkgate.gateway.providers.base import ChunkEvent, ErrorEvent, ProviderEvent, RequestContext, UsageEvent
from thinkgate.params import ChatParams, validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.protocol_endpoints import CHAT_EXTRAS, CreateResponseRequest, InputPart
from thinkgate.protocol_responses import ResponseObject, ResponseStreamEvent

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_TEXT_PARTS = ("input_text", "output_text", "text")
_NEEDS_STORE = "needs stored responses, and this server stores none: send the whole conversation in `input`"


# -- request: Responses -> chat ---------------------------------------------------------------------------
def _missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(f"missing required parameter: {param}", param=param)


def _text(content: str | list[InputPart] | None, param: str, kinds: tuple[str, ...] = _TEXT_PARTS) -> str:
    if content is None:
        raise _missing(param)
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if part.type not in kinds or part.text is None:
            raise InvalidRequestError(f"{param}[{j}] has type {part.type!r}; this model reads only text parts "
                                      f"({', '.join(kinds)})", param=f"{param}[{j}]")
        out.append(part.text)
    return "".join(out)


def _messages(req: CreateResponseRequest) -> list[dict]:
    msgs: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if not req.input:
        raise InvalidRequestError("input must hold at least one item", param="input")
    reasoning = None  # a reasoning item's text, for the assistant turn that follows it
    for i, item in enumerate(req.input):
        at = f"input[{i}]"
        kind = item.type or "message"
        if kind == "message":
            if item.role is None:
                raise _missing(at + ".role")
            msgs.append({"role": item.role, "content": _text(item.content, at + ".content")})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if getattr(item, name) is None:
                    raise _missing(f"{at}.{name}")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if msgs and msgs[-1]["role"] == "assistant":  # calls of one turn: one assistant message
                msgs[-1].setdefault("tool_calls", []).append(call)
                continue
            msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.call_id is None:
                raise _missing(at + ".call_id")
            msgs.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, at + ".output")})
        elif kind == "reasoning":
            parts = item.content if isinstance(item.content, list) and item.content else item.summary
            reasoning = _text(parts or [], at + ".content", ("reasoning_text", "summary_text"))
            continue
        elif kind == "item_reference":
            raise InvalidRequestError(f"{at} is an item reference, which {_NEEDS_STORE}", param=at)
        else:
            raise InvalidRequestError(f"{at}.type {kind!r} is not served here (message, function_call, "
                                      "function_call_output and reasoning are)", param=at + ".type")
        if reasoning is not None and msgs[-1]["role"] == "assistant":
            msgs[-1]["reasoning_content"] = reasoning
        reasoning = None
    return msgs


def _refuse_unserved(req: CreateResponseRequest) -> None:
    for name in ("previous_response_id", "conversation"):
        if getattr(req, name) is not None:
            raise InvalidRequestError(f"{name} {_NEEDS_STORE}", param=name)
    if req.background:
        raise InvalidRequestError(f"background {_NEEDS_STORE}", param="background")
    if req.prompt is not None:
        raise InvalidRequestError("prompt (a stored prompt template) is not served here: send instructions and "
                                  "input", param="prompt")
    if req.truncation == "auto":
        raise InvalidRequestError("truncation 'auto' is not served here: the input must fit the context",
                                  param="truncation")


def to_chat_request(req: CreateResponseRequest) -> ChatCompletionRequest:
    """The chat request that asks the provider for this response (400 naming the Responses parameter)."""
    _refuse_unserved(req)
    body: dict = {"model": req.model, "messages": _messages(req), "stream": bool(req.stream),
                  "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
                  "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls, "user": req.user,
                  "top_logprobs": req.top_logprobs}
    if LOGPROBS_INCLUDE in (req.include or ()) or req.top_logprobs:
        body["logprobs"] = True
    tools = []
    for i, t in enumerate(req.tools or ()):
        if t.type != "function":
            raise InvalidRequestError(f"tools[{i}].type {t.type!r} is not served here: only function tools are",
                                      param=f"tools[{i}].type")
        if t.name is None:
            raise _missing(f"tools[{i}].name")
        fn = {"name": t.name, "description": t.description, "parameters": t.parameters, "strict": t.strict}
        tools.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    body["tools"] = tools or None
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        if choice.type != "function" or not choice.name:
            raise InvalidRequestError("tool_choice must be none, auto, required or {type: function, name}",
                                      param="tool_choice")
        choice = {"type": "function", "function": {"name": choice.name}}
    body["tool_choice"] = choice
    text = req.text
    fmt = text.format if text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise _missing("text.format.schema")
        schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    body["verbosity"] = text.verbosity if text is not None else None
    r = req.reasoning
    if r is not None:
        effort = "xhigh" if r.effort == "max" else r.effort
        body["reasoning"] = {"effort": effort, "max_tokens": r.max_tokens, "enabled": r.enabled, "exclude": r.exclude}
    body.update({k: getattr(req, k) for k in CHAT_EXTRAS if getattr(req, k) is not None})
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        raise responses_error(validation_error(e)) from None


def _responses_param(param: str) -> str:
    """The Responses name of a chat parameter an error names."""
    if param.startswith("messages"):
        return "input"
    if param.startswith("response_format"):
        return "text.format"
    if param.startswith("tool_choice"):
        return "tool_choice"
    renames = {"max_completion_tokens": "max_output_tokens", "verbosity": "text.verbosity"}
    return renames.get(param) or re.sub(r"^(tools\[\d+\])\.function\.", r"\1.", param)


def responses_error(e: InvalidRequestError) -> InvalidRequestError:
    if e.param is None or _responses_param(e.param) == e.param:
        return e
    new = _responses_param(e.param)
    return type(e)(e.message.replace(e.param, new), param=new, code=e.code)


def validate_response_request(req: CreateResponseRequest) -> ChatParams:
    try:
        return validate_chat(to_chat_request(req))
    except InvalidRequestError as e:
        raise responses_error(e) from None


# -- response: provider events -> output items and stream events ---------------------------------------------
def echo_fields(req: CreateResponseRequest, model: str) -> dict:
    """The request settings a Response object repeats."""
    tools = [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
              "strict": t.strict} for t in req.tools or ()]
    choice = req.tool_choice or "auto"
    if not isinstance(choice, str):
        choice = {"type": choice.type, "name": choice.name}
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        fmt_out = {"type": fmt.type if fmt is not None else "text"}
    else:
        fmt_out = {"type": "json_schema", "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
        if fmt.description is not None:
            fmt_out["description"] = fmt.description
    text = {"format": fmt_out}
    if req.text is not None and req.text.verbosity is not None:
        text["verbosity"] = req.text.verbosity
    r = req.reasoning
    echo = {"instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": model,
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": r.effort if r else None, "summary": r.summary if r else None},
            "store": False, "background": False, "temperature": req.temperature, "top_p": req.top_p,
            "top_logprobs": req.top_logprobs, "text": text, "tool_choice": choice, "tools": tools,
            "truncation": "disabled", "max_tool_calls": req.max_tool_calls, "metadata": req.metadata or {}}
    for name in ("user", "safety_identifier", "prompt_cache_key"):  # strings, or absent
        if getattr(req, name) is not None:
            echo[name] = getattr(req, name)
    return echo


def responses_usage(chat_usage: dict) -> dict:
    """A chat `usage` object (UsageRecord.openai_usage) in the Responses shape."""
    out = {"input_tokens": chat_usage["prompt_tokens"],
           "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
                                    "cache_write_tokens": 0},
           "output_tokens": chat_usage["completion_tokens"],
           "output_tokens_details": {"reasoning_tokens": chat_usage["completion_tokens_details"]["reasoning_tokens"]},
           "total_tokens": chat_usage["total_tokens"]}
    if "cost" in chat_usage:
        out["cost"] = chat_usage["cost"]
    return out


@dataclass
class _Item:
    kind: str  # reasoning | message | function_call
    id: str
    index: int  # its place in `output`
    text: list[str] = field(default_factory=list)  # reasoning, message text, or call arguments
    logprobs: list[dict] = field(default_factory=list)
    call_id: str | None = None
    name: str | None = None
    status: str = "in_progress"

    def part(self) -> dict:
        text = "".join(self.text)
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(self.logprobs)}

    def body(self) -> dict:
        """The item as `output` shows it: empty while in progress (as OpenAI's output_item.added), whole after."""
        done = self.status != "in_progress"
        if self.kind == "function_call":
            return {"type": "function_call", "id": self.id, "call_id": self.call_id, "name": self.name,
                    "arguments": "".join(self.text) if done else "", "status": self.status}
        content = [self.part()] if done else []
        if self.kind == "reasoning":
            return {"type": "reasoning", "id": self.id, "summary": [], "content": content, "status": self.status}
        return {"type": "message", "id": self.id, "role": "assistant", "status": self.status, "content": content}


class ResponseStream:
    """One response's output, built from provider events, and the stream events that tell it. `error` is the
    provider's error event when the response failed."""

    def __init__(self, ctx: RequestContext, echo: dict):
        self.ctx = ctx
        self.echo = echo
        self.seq = 0
        self.items: list[_Item] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item] = {}  # a tool call's index in the chat deltas -> its item
        self.held = ""  # whitespace before any message text: kept only if text follows
        self.finish: str | None = None
        self.error: ErrorEvent | None = None

    def event(self, type_: str, **fields) -> dict:
        ev = {"type": type_, **fields, "sequence_number": self.seq}
        self.seq += 1
        return ev

    def response(self, status: str, usage: dict | None = None) -> dict:
        out = {"id": self.ctx.request_id, "object": "response", "created_at": self.ctx.created, "status": status,
               "completed_at": int(time.time()) if status == "completed" else None,
               "error": {"code": "server_error", "message": self.error.message} if status == "failed" else None,
               "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
               **self.echo, "output": [it.body() for it in self.items]}
        if usage is not None:  # an object in the schema, never null: absent until the end
            out["usage"] = usage
        return out

    async def events(self, provider_events: AsyncIterator[ProviderEvent]) -> AsyncIterator[dict]:
        yield self.event("response.created", response=self.response("in_progress"))
        yield self.event("response.in_progress", response=self.response("in_progress"))
        usage = None
        try:
            async for ev in provider_events:
                if ev is KEEPALIVE:
                    yield ev
                elif isinstance(ev, ChunkEvent):
                    for choice in ev.choices:
                        for out in self._choice(choice):
                            yield out
                elif isinstance(ev, ErrorEvent):
                    self.error = ev
                elif isinstance(ev, UsageEvent):
                    usage = responses_usage(ev.record.openai_usage())
        except Exception as e:  # the run failed (logged there): the response fails, the stream still ends well
            self.error = ErrorEvent(f"internal error: {type(e).__name__}")
        status = "failed" if self.error else "incomplete" if self.finish == "length" else "completed"
        for out in self._close("incomplete" if status != "completed" else "completed"):
            yield out
        yield self.event(f"response.{status}", response=self.response(status, usage))

    def _choice(self, choice: dict) -> list[dict]:
        d = choice.get("delta") or {}
        out = []
        if d.get("reasoning"):
            out += self._add_text("reasoning", d["reasoning"])
        if d.get("content"):
            out += self._message_text(d["content"], (choice.get("logprobs") or {}).get("content") or [])
        for tc in d.get("tool_calls") or ():
            out += self._call_delta(tc)
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        return out

    def _start(self, kind: str, prefix: str, **kw) -> list[dict]:
        out = self._close("completed")
        item = _Item(kind, prefix + uuid.uuid4().hex, len(self.items), **kw)
        self.items.append(item)
        self.open = item
        out.append(self.event("response.output_item.added", output_index=item.index, item=item.body()))
        if kind != "function_call":
            out.append(self.event("response.content_part.added", item_id=item.id, output_index=item.index,
                                  content_index=0, part=item.part()))
        return out

    def _add_text(self, kind: str, text: str, logprobs: list[dict] | None = None) -> list[dict]:
        out = self._start(kind, "rs_" if kind == "reasoning" else "msg_") if self.open is None or \
            self.open.kind != kind else []
        item = self.open
        item.text.append(text)
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        if kind == "reasoning":
            out.append(self.event("response.reasoning_text.delta", **where, delta=text))
        else:
            item.logprobs.extend(logprobs or ())
            out.append(self.event("response.output_text.delta", **where, delta=text, logprobs=logprobs or []))
        return out

    def _message_text(self, text: str, logprobs: list[dict]) -> list[dict]:
        if self.open is None or self.open.kind != "message":
            if not text.strip():
                self.held += text
                return []
            text, self.held = self.held + text, ""
        return self._add_text("message", text, logprobs)

    def _call_delta(self, tc: dict) -> list[dict]:
        fn = tc.get("function") or {}
        out = []
        if tc.get("id"):  # a new call: its id and name come first
            out = self._start("function_call", "fc_", call_id=tc["id"], name=fn.get("name") or "")
            self.calls[tc["index"]] = self.open
        item = self.calls.get(tc.get("index"))
        if item is not None and fn.get("arguments"):
            item.text.append(fn["arguments"])
            out.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                  output_index=item.index, delta=fn["arguments"]))
        return out

    def _close(self, status: str) -> list[dict]:
        item, self.open = self.open, None
        self.held = ""
        if item is None:
            return []
        item.status = status
        where = {"item_id": item.id, "output_index": item.index}
        text = "".join(item.text)
        if item.kind == "function_call":
            out = [self.event("response.function_call_arguments.done", **where, name=item.name, arguments=text)]
        else:
            if item.kind == "reasoning":
                out = [self.event("response.reasoning_text.done", **where, content_index=0, text=text)]
            else:
                out = [self.event("response.output_text.done", **where, content_index=0, text=text,
                                  logprobs=list(item.logprobs))]
            out.append(self.event("response.content_part.done", **where, content_index=0, part=item.part()))
        out.append(self.event("response.output_item.done", output_index=item.index, item=item.body()))
        return out


# -- the route -----------------------------------------------------------------------------------------------
def add_responses_routes(app: FastAPI, bases: tuple[str, ...], config: ServerConfig) -> None:
    async def create_response(request: Request):
        dispatch, caller, req = await accepted(request, CreateResponseRequest, config.max_body_bytes)
        params = validate_response_request(req)
        try:
            started = await dispatch.start(caller, params, id_prefix="resp_")
        except InvalidRequestError as e:
            raise responses_error(e) from None
        out = ResponseStream(started.ctx, echo_fields(req, started.provider.model_id))
        if params.stream:
            return streamed(out.events(started.run), started, config.keepalive_s, typed_events=True)
        events = await collected(request, started, out.events(started.run))
        if events is None:
            return Response(status_code=499)
        if out.error is not None:
            return JSONResponse(error_body(out.error.message, out.error.type, code=out.error.code),
                                status_code=out.error.status)
        return Response(orjson.dumps(events[-1]["response"]), media_type="application/json",
                        headers=started.headers)

    for base in bases:
        app.add_api_route(f"{base}/responses", create_response, methods=["POST"],
                          **documented(CreateResponseRequest, ResponseObject, stream=ResponseStreamEvent,
                                       errors=GENERATES))
