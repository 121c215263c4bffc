"""Serve a model from OpenAI-compatible upstreams (a vLLM or SGLang cluster, another gateway): our request
mapped to theirs, their stream mapped back to our events, retries and fallback before the first byte, a
circuit breaker per backend, and a usage record that is never silently zero.

Before the first byte a failure is retried (connection errors, 5xx, 429) with backoff, then the next backend
is tried; what is left is an ErrorEvent with an HTTP status (502 garbage, 504 timeout, 429 with Retry-After,
503 nothing to try) that the API returns as the response's status. After the first byte, an error ends the
stream with an error chunk and the tokens received are billed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import orjson

from thinkgate.chat.messages import check_parts
from thinkgate.chat.reasoning import ReasoningParser
from thinkgate.eager import eager_task
from thinkgate.errors import InvalidRequestError
from thinkgate.gateway.providers.base import (
    ChunkEvent,
    ErrorEvent,
    PreparedRequest,
    ProviderEvent,
    RequestContext,
    UsageEvent,
    UsageRecord,
)
from thinkgate.gateway.providers.h1 import H1Transport
from thinkgate.gateway.providers.sse_reader import sse_objects
from thinkgate.params import ChatParams

log = logging.getLogger(__name__)

# What a vLLM (or SGLang) OpenAI server takes, by our field name. Anything else the client set is dropped,
# or refused when the request says provider.require_parameters.
VLLM_PARAMETERS = frozenset({
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "seed", "logit_bias", "logprobs", "top_logprobs", "stop", "n",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "stop_token_ids", "min_tokens",
    "ignore_eos", "chat_template_kwargs", "user", "reasoning_effort",
})
# Ours alone: how we serve, never forwarded as such.
OURS = frozenset({"model", "messages", "stream", "stream_options", "structured_outputs", "provider"})
# What a chat template adds around the messages, as an upper bound for sizing holds: role markers per
# message, a system preamble, and the tool instructions a template writes when tools are given.
MESSAGE_OVERHEAD_TOKENS = 8
TEMPLATE_OVERHEAD_TOKENS = 64
TOOLS_OVERHEAD_TOKENS = 512
# An image's tokens cannot be known before the upstream's processor has seen it: holds count this many per
# image (a 1024x1024 picture is about 1300 tokens on Qwen2.5-VL, 765 on GPT-4o), never the URL's bytes; the
# capture bills the upstream's own count.
IMAGE_TOKENS = 1536


@dataclass(frozen=True)
class UpstreamBackend:
    name: str
    base_url: str
    remote_model: str
    api_key: str | None = None
    timeout_s: float = 600.0  # between two reads of the stream
    first_byte_timeout_s: float = 60.0
    think_in_content: bool = False  # reasoning comes as <think>...</think> inside `content`
    parameters: frozenset[str] = VLLM_PARAMETERS


@dataclass
class Breaker:
    """Opens after `threshold` consecutive failures; after `cooldown_s` one probe may pass (half-open): its
    success closes the breaker, its failure opens it again. One error never disables a backend."""

    threshold: int = 3
    cooldown_s: float = 30.0
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = time.monotonic()


@dataclass(frozen=True)
class UpstreamPrepared(PreparedRequest):
    body: dict = field(default_factory=dict)  # the upstream request, without max_tokens (set at send time)
    order: tuple[str, ...] = ()  # backend names to try, in order


class _Failure(Exception):
    """A try that failed before the first byte: retryable or not, and what to answer if it is the last."""

    def __init__(self, status: int, message: str, retryable: bool, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.message, self.retryable, self.retry_after = status, message, retryable, retry_after


class UpstreamProvider:
    # Its stream sends one request to a remote engine, which stops at once when it is closed: the API may start
    # it while the request's hold is still being placed (api/dispatch.py), and discard it if the hold refuses.
    starts_early = True

    def __init__(self, model_id: str, backends: list[UpstreamBackend], card: dict | None = None,
                 context_length: int = 32768, tokenizer=None, transport: httpx.AsyncBaseTransport | None = None,
                 retries: int = 2, backoff_s: float = 0.2, vision: bool = False):
        if not backends:
            raise ValueError(f"{model_id}: an upstream model needs at least one backend")
        self.model_id = model_id
        self.vision = vision  # image parts pass through; a text-only model refuses them with a 400
        self.backends = {b.name: b for b in backends}
        self.breakers = {b.name: Breaker() for b in backends}
        self.context_length = context_length
        self.tokenizer = tokenizer  # counts tokens when an upstream sends no usage (else an estimate)
        self.retries = retries
        self.backoff_s = backoff_s
        self._card = card or {}
        self._active = 0
        # The request goes straight to each backend's transport: httpx's client added ~0.15 ms a request on
        # this path (its auth and redirect steps, a cookie jar filled from every response) and nothing a gateway
        # uses. Its defaults that matter are kept: the timeouts (as the request's extension) and the headers.
        self.transports = {
            # Idle connections are dropped well before a uvicorn-served upstream's (vLLM, SGLang, thinkgate)
            # 5 s keep-alive, so a request rarely picks one the server is closing (that race is a connection
            # error before the first byte, retried like any other).
            b.name: transport or H1Transport(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0)
            for b in backends}
        self.timeouts = {b.name: httpx.Timeout(b.timeout_s, connect=10.0).as_dict() for b in backends}
        # Absolute, parsed once: httpx otherwise joins and re-parses the URL (a regex pass) on every request.
        self.urls = {b.name: httpx.URL(b.base_url.rstrip("/") + "/chat/completions") for b in backends}
        self.headers = {b.name: {"host": self.urls[b.name].netloc.decode("ascii"), **REQUEST_HEADERS,
                                 **({"authorization": f"Bearer {b.api_key}"} if b.api_key else {})}
                        for b in backends}

    def card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "thinkgate",
                "context_length": self.context_length, **self._card}

    def num_active(self) -> int:
        return self._active

    def health(self) -> dict:
        return {name: {"state": b.state, "consecutive_failures": b.failures} for name, b in self.breakers.items()}

    async def aclose(self) -> None:
        for t in {id(t): t for t in self.transports.values()}.values():  # a transport given once serves all
            await t.aclose()

    # -- prepare: map the request ----------------------------------------------------------------
    async def prepare(self, params: ChatParams) -> UpstreamPrepared:
        req = params.request
        check_parts(req.messages, self.model_id, self.vision)
        extra = req.model_extra or {}
        steer = extra.get("provider") if isinstance(extra.get("provider"), dict) else {}
        order = self._order(steer)
        body = self.map_request(params, self.backends[order[0]], bool(steer.get("require_parameters")))
        prompt = self._prompt_estimate(params)
        if prompt >= self.context_length:
            raise InvalidRequestError(f"this model's maximum context length is {self.context_length} tokens, but "
                                      f"the messages take about {prompt} tokens", param="messages",
                                      code="context_length_exceeded")
        room = self.context_length - prompt
        cap = min(params.max_tokens, room) if params.max_tokens is not None else room
        return UpstreamPrepared(params, "hybrid", prompt_tokens=prompt, max_tokens=cap, body=body, order=order)

    def _order(self, steer: dict) -> tuple[str, ...]:
        names = list(self.backends)
        wanted = [n for n in steer.get("order") or [] if n in self.backends]
        if wanted:
            names = wanted + [n for n in names if n not in wanted]
        if steer.get("allow_fallbacks") is False:
            names = names[:1]
        return tuple(names)

    def map_request(self, params: ChatParams, backend: UpstreamBackend, require: bool) -> dict:
        """Our validated request as the upstream's body: the client's fields it supports, ours never."""
        req = params.request
        sent = dict(req.model_dump(mode="json", exclude_none=True, by_alias=True))
        body = {"model": backend.remote_model, "messages": sent["messages"], "stream": True,
                "stream_options": {"include_usage": True}}
        for name, value in sent.items():
            if name in OURS or name in ("max_tokens", "max_completion_tokens"):
                continue
            if name in backend.parameters:
                body[name] = value
            elif require:
                raise InvalidRequestError(f"{name} is not supported by any backend of {self.model_id} "
                                          "(provider.require_parameters is set)", param=name)
        if params.reasoning_effort is not None and "reasoning_effort" in backend.parameters:
            body["reasoning_effort"] = params.reasoning_effort
        if params.thinking_enabled is False:
            body.setdefault("chat_template_kwargs", {}).setdefault("enable_thinking", False)
        if require and params.reasoning_max_tokens is not None:
            raise InvalidRequestError(f"reasoning.max_tokens is not supported by the backends of {self.model_id}",
                                      param="reasoning.max_tokens")
        return body

    def _prompt_estimate(self, params: ChatParams) -> int:
        """An upper bound of the prompt's tokens (what a hold is sized by): a BPE token is at least one byte."""
        msgs, images = _without_images(params)
        tools = params.request.model_dump(mode="json", exclude_none=True).get("tools")
        size = len(json.dumps(msgs, ensure_ascii=False).encode()) + len(json.dumps(tools or []).encode())
        overhead = TEMPLATE_OVERHEAD_TOKENS + (TOOLS_OVERHEAD_TOKENS if tools else 0)
        return size + MESSAGE_OVERHEAD_TOKENS * len(msgs) + overhead + IMAGE_TOKENS * images

    # -- stream ------------------------------------------------------------------------------------
    async def stream(self, prep: UpstreamPrepared, ctx: RequestContext) -> AsyncIterator[ProviderEvent]:
        self._active += 1
        run = _Run(self, prep, ctx)
        try:
            async for ev in run.events():
                yield ev
        finally:
            self._active -= 1
            await run.close()


class _Run:
    """One request against the backends."""

    def __init__(self, provider: UpstreamProvider, prep: UpstreamPrepared, ctx: RequestContext):
        self.p, self.prep, self.ctx = provider, prep, ctx
        self.response: httpx.Response | None = None
        self.backend: str | None = None
        n = prep.params.n
        tools = prep.params.use_tools
        self.parsers = [ReasoningParser("hybrid", end_tags=("<tool_call>",) if tools else ()) for _ in range(n)]
        self.text = [""] * n  # what each choice generated (for counting when usage is missing)
        self.finish: dict[int, tuple[str | None, str | None]] = {}
        self.usage: dict | None = None
        self.first_token: float | None = None

    async def close(self) -> None:
        if self.response is not None:
            await self.response.aclose()

    async def _close_when_cancelled(self) -> None:
        await self.ctx.cancelled.wait()
        await self.close()

    async def events(self) -> AsyncIterator[ProviderEvent]:
        # Until the first event (an upstream's prefill can take seconds, its retries longer) the client may
        # leave, or the API discard the run: the request is then closed at once, so the upstream stops too.
        connect = eager_task(self._connect())  # the request goes out in this step (thinkgate/eager.py)
        left = asyncio.ensure_future(self.ctx.cancelled.wait())
        try:
            await asyncio.wait((connect, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not connect.done():
                connect.cancel()
                await asyncio.wait((connect,))  # then stream()'s close() closes the response
        if connect.cancelled():
            yield UsageEvent(self._record("client_disconnect", prompt=0))
            return
        try:
            lines = connect.result()
        except _Failure as f:
            headers = {"Retry-After": f.retry_after} if f.retry_after else None
            yield ErrorEvent(f.message, type="upstream_error", code=f"upstream_{f.status}", status=f.status,
                             headers=headers)
            yield UsageEvent(self._record("error", prompt=0))
            return
        n = self.prep.params.n
        for i in range(n):
            yield ChunkEvent([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])
        ended_by, error = "finished", None
        # The events are read here, in the run's own task: a client that leaves closes the response from the
        # watcher's task, which wakes this read at once with an error (the upstream sees the connection close
        # and stops too). No task or queue per chunk.
        watcher = asyncio.ensure_future(self._close_when_cancelled())
        try:
            async for item in lines:
                for ev in self._map(item):
                    if isinstance(ev, ErrorEvent):
                        ended_by, error = "error", ev
                    else:
                        yield ev
                if error is not None:
                    break
        except Exception as e:
            if self.ctx.cancelled.is_set():
                ended_by = "client_disconnect"
            else:
                ended_by, error = "error", ErrorEvent(f"the upstream stream broke: {type(e).__name__}",
                                                      type="upstream_error", code="upstream_error", status=502)
        finally:
            if self.ctx.cancelled.is_set():
                await asyncio.wait([watcher])  # its close may be under way: let it finish rather than cut it
            else:
                watcher.cancel()
            await lines.aclose()
        if error is None and ended_by == "finished" and len(self.finish) < n:
            if self.ctx.cancelled.is_set():  # the close came between two reads and ended the body
                ended_by = "client_disconnect"
            else:
                ended_by, error = "error", ErrorEvent("the upstream stream ended before every choice finished",
                                                      type="upstream_error", code="upstream_error", status=502)
        if error is not None:
            yield error
        yield UsageEvent(self._record(ended_by))

    # -- before the first byte: retries, fallback, breaker -------------------------------------------
    async def _connect(self) -> AsyncIterator[dict]:
        last = _Failure(503, f"no backend of {self.p.model_id} is available now", retryable=False)
        for name in self.prep.order:
            breaker = self.p.breakers[name]
            for attempt in range(self.p.retries + 1):
                if not breaker.allow():
                    last = _Failure(503, f"backend {name} of {self.p.model_id} is failing: circuit open",
                                    retryable=True)
                    break
                try:
                    lines = await self._try(name)
                except _Failure as f:
                    breaker.failure()
                    log.warning("upstream %s of %s failed before the first byte: %s", name, self.p.model_id,
                                f.message)
                    last = f
                    if not f.retryable:
                        raise
                    if attempt < self.p.retries:
                        await asyncio.sleep(self.p.backoff_s * 2**attempt)
                    continue
                breaker.success()
                self.backend = name
                return lines
        raise last

    async def _try(self, name: str) -> AsyncIterator[dict]:
        backend = self.p.backends[name]
        body = _json_body({**self.prep.body, "max_tokens": self.prep.max_tokens})
        request = httpx.Request("POST", self.p.urls[name], headers={**self.p.headers[name],
                                                                   "content-length": str(len(body))},
                                stream=_SentBody(body, self.ctx.sent), extensions={"timeout": self.p.timeouts[name]})
        try:
            resp = await self.p.transports[name].handle_async_request(request)
        except httpx.TimeoutException:
            raise _Failure(504, f"upstream {name} timed out", retryable=True) from None
        except httpx.HTTPError as e:
            raise _Failure(502, f"upstream {name} unreachable: {type(e).__name__}", retryable=True) from None
        if resp.status_code != 200:
            text = (await resp.aread())[:500].decode("utf-8", "replace")
            await resp.aclose()
            if resp.status_code == 429:
                raise _Failure(429, f"upstream {name} is rate limited", True, resp.headers.get("retry-after", "1"))
            if resp.status_code >= 500:
                raise _Failure(502, f"upstream {name} answered {resp.status_code}", retryable=True)
            raise _Failure(502 if resp.status_code != 400 else 400,
                           f"upstream {name} refused the request ({resp.status_code}): {text}", retryable=False)
        if not getattr(resp.stream, "wakes_reader_on_close", False):
            resp.stream = _Pumped(resp.stream)
        self.response = resp
        lines = sse_objects(resp)
        try:  # the first event, within its own timeout: before it, failing over is still possible
            first = await asyncio.wait_for(anext(lines, None), backend.first_byte_timeout_s)
        except TimeoutError:
            await resp.aclose()
            raise _Failure(504, f"upstream {name} sent nothing in {backend.first_byte_timeout_s:g} s",
                           retryable=True) from None
        except (httpx.HTTPError, ValueError):
            await resp.aclose()
            raise _Failure(502, f"upstream {name} answered something that is not an event stream",
                           retryable=False) from None
        if first is None:
            await resp.aclose()
            raise _Failure(502, f"upstream {name} closed the stream at once", retryable=True)
        return _prepend(first, lines)

    # -- after: their chunks as our events -------------------------------------------------------
    def _map(self, obj: dict) -> list[ProviderEvent]:
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return [ErrorEvent(f"upstream error: {err.get('message', 'unknown')}", type="upstream_error",
                               code="upstream_error", status=502)]
        if obj.get("usage"):
            self.usage = obj["usage"]
        out: list[ProviderEvent] = []
        show = self.prep.params.show_reasoning
        for ch in obj.get("choices") or []:
            i = ch.get("index", 0)
            if not 0 <= i < len(self.text):
                return [ErrorEvent(f"upstream sent choice {i} of {len(self.text)}", type="upstream_error",
                                   code="upstream_error", status=502)]
            d = ch.get("delta") or {}
            delta: dict = {}
            reasoning = d.get("reasoning_content") or d.get("reasoning") or ""
            content = d.get("content") or ""
            if self.p.backends[self.backend].think_in_content and content:
                r, content = self.parsers[i].feed(content)
                reasoning += r
            if ch.get("finish_reason") and self.p.backends[self.backend].think_in_content:
                r, c = self.parsers[i].finish()
                reasoning, content = reasoning + r, content + c
            if reasoning or content or d.get("tool_calls"):
                self.first_token = self.first_token or time.monotonic()
            self.text[i] += reasoning + content + (json.dumps(d["tool_calls"]) if d.get("tool_calls") else "")
            if reasoning and show:
                delta["reasoning"] = delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
            if d.get("tool_calls"):
                delta["tool_calls"] = d["tool_calls"]
            if delta:
                out.append(ChunkEvent([{"index": i, "delta": delta, "logprobs": ch.get("logprobs"),
                                        "finish_reason": None}]))
            if ch.get("finish_reason"):
                native = ch.get("native_finish_reason") or ch.get("stop_reason") or ch["finish_reason"]
                self.finish[i] = (ch["finish_reason"], str(native))
                out.append(ChunkEvent([{"index": i, "delta": {}, "logprobs": None,
                                        "finish_reason": ch["finish_reason"], "native_finish_reason": str(native)}]))
        return out

    def _record(self, ended_by: str, prompt: int | None = None) -> UsageRecord:
        u = self.usage or {}
        counted = not u
        if counted:
            completion = sum(self._count(t) for t in self.text)
            prompt_tokens = self.prep.prompt_tokens if prompt is None else prompt
            if self.p.tokenizer is not None and prompt is None:
                msgs, images = _without_images(self.prep.params)
                prompt_tokens = self._count(json.dumps(msgs, ensure_ascii=False)) + IMAGE_TOKENS * images
            cached = reasoning = 0
        else:
            completion, prompt_tokens = int(u.get("completion_tokens") or 0), int(u.get("prompt_tokens") or 0)
            cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            reasoning = int((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        reason, native = self.finish.get(0, (None, None))
        if ended_by == "client_disconnect":
            native = "client_disconnect"
        return UsageRecord(
            request_id=self.ctx.request_id, model=self.p.model_id, choices=self.prep.params.n,
            prompt_tokens=prompt_tokens, cached_prompt_tokens=cached, completion_tokens=completion,
            reasoning_tokens=reasoning, finish_reason=reason, native_finish_reason=native, ended_by=ended_by,
            time_to_first_token_s=None if self.first_token is None else self.first_token - self.ctx.arrival,
            total_time_s=time.monotonic() - self.ctx.arrival,
            usage_source="upstream" if not counted else ("tokenizer" if self.p.tokenizer else "estimate"),
            backend=self.backend)

    def _count(self, text: str) -> int:
        if not text:
            return 0
        if self.p.tokenizer is not None:
            return len(self.p.tokenizer.encode(text))
        return math.ceil(len(text.encode()) / 4)  # no tokenizer: about 4 bytes a token, never zero


def _without_images(params: ChatParams) -> tuple[list[dict], int]:
    """The messages with each image part's URL left out (a data: URL's bytes are not its tokens), and the
    number of images."""
    msgs = params.request.model_dump(mode="json", exclude_none=True)["messages"]
    images = 0
    for m in msgs:
        if isinstance(m.get("content"), list):
            for k, part in enumerate(m["content"]):
                if part.get("type") == "image_url":
                    m["content"][k] = {"type": "image_url"}
                    images += 1
    return msgs, images


# What httpx's client sent (with our own user agent), and the content type.
REQUEST_HEADERS = {"accept": "*/*", "accept-encoding": "gzip, deflate", "connection": "keep-alive",
                   "user-agent": "thinkgate", "content-type": "application/json"}


def _json_body(body: dict) -> bytes:
    """The upstream request's JSON: orjson (faster than httpx's json.dumps), or the standard library for what orjson
    refuses: an integer past 64 bits, which an HTTP client cannot send us (our parser reads those as floats) but a
    caller in process can."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class _SentBody(httpx.AsyncByteStream):
    """A request body that sets `sent` once the connection has taken its last byte (RequestContext.sent)."""

    def __init__(self, body: bytes, sent: asyncio.Event):
        self.body, self.sent = body, sent

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        self.sent.set()


class _Pumped(httpx.AsyncByteStream):
    """Another transport's body (the tests give httpx.MockTransport), read by a task of its own so that closing
    it from another task wakes its reader at once, as the bodies of our transport (h1.py) do by themselves.
    Closing an async generator while its reader waits in it would fail instead."""

    def __init__(self, stream):
        self.stream = stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Future | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.task = asyncio.ensure_future(self._pump())
        while (item := await self.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _pump(self) -> None:
        try:
            async for part in self.stream:
                self.queue.put_nowait(part)
            self.queue.put_nowait(None)
        except Exception as e:
            self.queue.put_nowait(e)

    async def aclose(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait([self.task])
            self.queue.put_nowait(httpx.ReadError("the response was closed"))
        await self.stream.aclose()


async def _prepend(first: dict, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    yield first
    async for obj in rest:
        yield obj
