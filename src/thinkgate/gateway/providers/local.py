"""Serve a chat request on our own engine: template -> tokens -> engine -> reasoning/tool split -> events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from thinkgate.chat.messages import check_parts, to_template_messages
from thinkgate.chat.template import render_chat, thinking_mode
from thinkgate.chat.tools import tool_call_lark, tool_calls_schema
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.engine.request import FinishReason, RequestOutput
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
from thinkgate.gateway.providers.choice_stream import ChoiceStream
from thinkgate.gateway.providers.merge import merge_prompt_streams, sub_context
from thinkgate.params import EFFORT_FRACTION, ChatParams
from thinkgate.sampling.params import SamplingParams
from thinkgate.structured.backend import GrammarError, make_backend, resolve_grammar_backend

log = logging.getLogger(__name__)
SUPPORTED_PARAMETERS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "seed", "logit_bias", "logprobs", "top_logprobs", "stop", "n",
    "response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls", "reasoning",
    "include_reasoning", "verbosity", "stream", "chat_template_kwargs",
]
_CANCEL = object()  # queued when the client goes away


@dataclass(frozen=True)
class LocalPrepared(PreparedRequest):
    prompt_ids: list[int]
    sampling: SamplingParams
    grammars: list | None  # one matcher per choice when the answer is constrained

    def capped(self, max_tokens: int) -> LocalPrepared:
        cap = min(self.max_tokens, max_tokens)
        return replace(self, max_tokens=cap, sampling=replace(self.sampling, max_tokens=cap))


@dataclass(frozen=True)
class TextPrepared(PreparedRequest):
    """A text completion: raw prompts, no chat template, one LocalPrepared per prompt (`params.n` counts the
    choices of all prompts; each part's own params keep the request's n)."""

    parts: tuple[LocalPrepared, ...]
    texts: tuple[str, ...]  # each prompt as text (what `echo` shows)

    def capped(self, max_tokens: int) -> TextPrepared:
        parts = tuple(p.capped(max_tokens) for p in self.parts)
        return replace(self, parts=parts, max_tokens=max(p.max_tokens for p in parts))


class LocalProvider:
    def __init__(self, engine: AsyncEngine, model_id: str, description: str = "", *, name: str | None = None,
                 context_length: int | None = None, pricing: dict | None = None):
        """`context_length` (the catalog's) lowers the engine's limit; `pricing` is the card's (catalog.pricing_card)."""
        self.engine = engine
        self.model_id = model_id
        self.tokenizer = engine.tokenizer
        self.max_model_len = min(engine.engine.max_model_len, context_length or engine.engine.max_model_len)
        self.description = description
        self.name = name or model_id
        self.pricing = pricing or {"prompt": "0", "completion": "0", "currency": "CNY", "unit": "1K tokens"}
        self._grammar_backend = None

    def card(self) -> dict:
        return {
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "thinkgate",
            "name": self.name, "description": self.description, "context_length": self.max_model_len,
            "pricing": self.pricing,
            "supported_parameters": SUPPORTED_PARAMETERS,
        }

    def num_active(self) -> int:
        return self.engine.num_active()

    @property
    def grammar_backend(self):
        if self._grammar_backend is None:  # building the token trie takes ~1 s for a 151k vocabulary
            engine = self.engine.engine
            name = resolve_grammar_backend(engine.config.grammar_backend, engine.runner.device.type)
            self._grammar_backend = make_backend(self.tokenizer, list(engine.eos_ids), name)
        return self._grammar_backend

    # -- prepare: what depends on this model ------------------------------------------------------
    async def prepare(self, params: ChatParams) -> LocalPrepared:
        template = self.tokenizer.chat_template
        if not template:
            raise InvalidRequestError("this model has no chat template", param="model")
        self._check_token_ids(params)
        req = params.request
        check_parts(req.messages, self.model_id)  # our engine reads text only
        kwargs = dict(req.chat_template_kwargs or {})
        if params.thinking_enabled is False:
            kwargs.setdefault("enable_thinking", False)
        kwargs.setdefault("eos_token", self.tokenizer.eos_token)
        messages = to_template_messages(req.messages, req.verbosity)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if params.use_tools else None
        # Rendering and tokenizing a long conversation takes milliseconds: keep it off the event loop.
        prompt = await asyncio.to_thread(render_chat, template, messages, tools, True, **kwargs)
        ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the messages "
                f"take {len(ids)} tokens (leaving no room to generate)", param="messages",
                code="context_length_exceeded")
        mode = thinking_mode(prompt, template)
        sampling = self._sampling_params(params, len(ids), mode)
        grammars = await asyncio.to_thread(self._grammars, params)
        return LocalPrepared(params, mode, len(ids), sampling.max_tokens, ids, sampling, grammars)

    def _check_token_ids(self, params: ChatParams) -> None:
        vocab = self.tokenizer.vocab_size
        for token, _ in params.logit_bias:
            if token >= vocab:
                raise InvalidRequestError(f"logit_bias key {token} is not a token id of this model (0..{vocab - 1})",
                                          param="logit_bias")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids holds an id outside this model's vocabulary (0..{vocab - 1})",
                                      param="stop_token_ids")

    def _grammars(self, params: ChatParams) -> list | None:
        """Compile the answer's constraint now, so a bad schema is a 400 before anything is queued."""
        req = params.request
        rf = req.response_format
        if params.forced_tools:
            tok = self.tokenizer
            lark = tool_call_lark(req, tok.token_id("<tool_call>"), tok.token_id("</tool_call>"))
            make, param = (lambda: self.grammar_backend.lark(lark, tool_calls_schema(req))), "tools"
        elif rf is not None and rf.type == "json_object":
            make, param = self.grammar_backend.json_object, "response_format"
        elif rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.schema_
            make, param = (lambda: self.grammar_backend.json_schema(schema)), "response_format.json_schema"
        else:
            return None
        try:
            return [make() for _ in range(params.n)]
        except GrammarError as e:
            raise InvalidRequestError(f"unsupported or invalid schema: {e}", param=param) from None

    def _sampling_params(self, params: ChatParams, n_prompt: int, mode: str) -> SamplingParams:
        room = self.max_model_len - n_prompt
        cap = min(params.max_tokens, room) if params.max_tokens is not None else room  # a cap, not a demand
        budget = None
        if mode != "none":
            if params.reasoning_max_tokens is not None:
                budget = params.reasoning_max_tokens
            elif params.reasoning_effort is not None:
                budget = int(EFFORT_FRACTION[params.reasoning_effort] * cap)
            elif params.thinking_enabled is False and mode == "open":
                budget = 0
        req = params.request
        stop = list(params.stop)
        if params.use_tools and req.parallel_tool_calls is False and req.tool_choice in (None, "auto"):
            stop.append("</tool_call>")  # end the turn after the first call
        return SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
            top_a=params.top_a, frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            repetition_penalty=params.repetition_penalty, seed=params.seed, max_tokens=cap,
            min_tokens=params.min_tokens, logit_bias=dict(params.logit_bias), stop=stop,
            stop_token_ids=list(params.stop_token_ids), logprobs=params.logprobs, top_logprobs=params.top_logprobs,
            n=params.n, ignore_eos=params.ignore_eos, reasoning_budget=budget, speculative=params.speculative,
        )

    # -- text completions: raw prompts (text or token ids), no chat template --------------------------
    async def prepare_text(self, params: ChatParams, prompts: list[str | list[int]]) -> TextPrepared:
        """`params` are the request's sampling settings (its chat form, validated; no messages are read)."""
        self._check_token_ids(params)
        vocab = self.tokenizer.vocab_size
        parts, texts = [], []
        for k, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
            elif any(not 0 <= t < vocab for t in prompt):
                raise InvalidRequestError(f"prompt {k} holds a token id outside this model's vocabulary "
                                          f"(0..{vocab - 1})", param="prompt")
            else:
                ids = list(prompt)
            if not ids:
                raise InvalidRequestError(f"prompt {k} is empty: a completion needs at least one prompt token",
                                          param="prompt")
            if len(ids) >= self.max_model_len:
                raise InvalidRequestError(
                    f"this model's maximum context length is {self.max_model_len} tokens, but prompt {k} takes "
                    f"{len(ids)} tokens (leaving no room to generate)", param="prompt", code="context_length_exceeded")
            sampling = self._sampling_params(params, len(ids), "none")
            parts.append(LocalPrepared(params, "none", len(ids), sampling.max_tokens, ids, sampling, None))
            texts.append(prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=False))
        return TextPrepared(replace(params, n=params.n * len(parts)), "none", sum(p.prompt_tokens for p in parts),
                            max(p.max_tokens for p in parts), tuple(parts), tuple(texts))

    def _stream_text(self, prep: TextPrepared, ctx: RequestContext) -> AsyncIterator[ProviderEvent]:
        if len(prep.parts) == 1:
            return self.stream(prep.parts[0], ctx)
        streams = [self.stream(part, sub_context(ctx, k)) for k, part in enumerate(prep.parts)]
        return merge_prompt_streams(streams, prep.parts[0].params.n, ctx, self.model_id)

    # -- stream: engine outputs -> events, always ending with the usage record ----------------------
    async def stream(self, prep: LocalPrepared | TextPrepared, ctx: RequestContext) -> AsyncIterator[ProviderEvent]:
        if isinstance(prep, TextPrepared):
            async for ev in self._stream_text(prep, ctx):
                yield ev
            return
        n = prep.params.n
        queue: asyncio.Queue = asyncio.Queue()
        prefilled = asyncio.Event()  # choice 0 has its prompt in the cache: the others reuse it
        started = [False] * n  # the choice's request went to the engine (it will end with a final output)
        tasks = [asyncio.create_task(self._pump(i, prep, ctx, queue, prefilled, started)) for i in range(n)]
        watcher = asyncio.create_task(_queue_when_set(ctx.cancelled, queue))
        choices = [ChoiceStream(i, prep.reasoning_mode, prep.params.show_reasoning, prep.params.use_tools)
                   for i in range(n)]
        last: list[RequestOutput | None] = [None] * n
        pending = set(range(n))
        ended_by, error, first_token = "finished", None, None

        def stop_all() -> None:
            """Abort what reached the engine (its final output still comes, with its counts); drop the rest."""
            for i in list(pending):
                if started[i]:
                    self.engine.abort(f"{ctx.request_id}-{i}")
                else:
                    tasks[i].cancel()
                    pending.discard(i)

        try:
            for i in range(n):
                yield ChunkEvent([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}])
            while pending:
                item = await queue.get()
                if item is _CANCEL:
                    if ended_by == "finished":
                        ended_by = "client_disconnect"
                    stop_all()
                    continue
                i, out = item
                if isinstance(out, BaseException):  # the choice never reached the engine
                    pending.discard(i)
                    log.error("request %s choice %d failed: %r", ctx.request_id, i, out)
                    if ended_by == "finished":
                        ended_by = "error"
                        error = ErrorEvent(f"internal error: {type(out).__name__}")
                        stop_all()
                    continue
                last[i] = out
                if first_token is None and out.new_token_ids:
                    first_token = time.monotonic()
                if out.finished:
                    pending.discard(i)
                if ended_by != "finished":
                    continue  # only counting what was generated now
                try:
                    events = self._events(choices[i], out, prep)
                except Exception as e:  # our own output handling failed: stop, still account the tokens
                    log.exception("request %s: output handling failed", ctx.request_id)
                    ended_by, error = "error", ErrorEvent(f"internal error: {type(e).__name__}")
                    stop_all()
                    continue
                for ev in events:
                    if isinstance(ev, ErrorEvent) and ended_by == "finished":
                        ended_by = "error"
                    yield ev
            if error is not None:
                yield error
            yield UsageEvent(self._record(prep, ctx, choices, last, ended_by, first_token))
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()

    def _events(self, choice: ChoiceStream, out: RequestOutput, prep: LocalPrepared) -> list[ProviderEvent]:
        lp = self._logprobs(out) if prep.sampling.logprobs else None
        deltas = choice.deltas(out)
        events: list[ProviderEvent] = [
            ChunkEvent([{"index": choice.index, "delta": delta, "logprobs": lp if k == 0 else None,
                         "finish_reason": None}])
            for k, delta in enumerate(deltas or ([{}] if lp else []))]
        if out.finished:
            fin = choice.finish(out)
            if out.finish_reason == FinishReason.ERROR:
                events.append(ErrorEvent(str(out.stop_reason), choice=fin))
            else:
                events.append(ChunkEvent([fin]))
        return events

    async def _pump(self, i: int, prep: LocalPrepared, ctx: RequestContext, queue: asyncio.Queue,
                    prefilled: asyncio.Event, started: list[bool]) -> None:
        params = prep.sampling
        if prep.params.n > 1 and params.seed is not None:
            params = replace(params, seed=params.seed + i)  # independent choices, still reproducible
        grammar = prep.grammars[i] if prep.grammars else None
        try:
            if i > 0:
                # Start after choice 0's prefill, so the prompt is computed once and shared through the
                # prefix cache instead of n times in the same step.
                await prefilled.wait()
            # No await between this mark and the engine taking the request (generate registers it
            # synchronously on the first iteration), so a cancel either sees it unstarted or aborts it.
            started[i] = True
            async for out in self.engine.generate(f"{ctx.request_id}-{i}", prep.prompt_ids, params,
                                                  reasoning_open=prep.reasoning_mode == "open", grammar=grammar):
                if i == 0:
                    prefilled.set()
                queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # surfaces in the consumer
            queue.put_nowait((i, e))
        finally:
            if i == 0:
                prefilled.set()

    def _record(self, prep: LocalPrepared, ctx: RequestContext, choices: list[ChoiceStream],
                last: list[RequestOutput | None], ended_by: str, first_token: float | None) -> UsageRecord:
        outs = [o for o in last if o is not None]
        head = last[0]
        fin = choices[0].finish(head) if head is not None and head.finished else None
        return UsageRecord(
            request_id=ctx.request_id, model=self.model_id, choices=prep.params.n,
            prompt_tokens=outs[0].num_prompt_tokens if outs else 0,
            cached_prompt_tokens=outs[0].num_cached_tokens if outs else 0,
            completion_tokens=sum(o.num_output_tokens for o in outs),
            reasoning_tokens=sum(o.num_reasoning_tokens for o in outs),
            finish_reason=fin["finish_reason"] if fin else None,
            native_finish_reason=fin["native_finish_reason"] if fin else None, ended_by=ended_by,
            time_to_first_token_s=first_token - ctx.arrival if first_token is not None else None,
            total_time_s=time.monotonic() - ctx.arrival)

    def _logprobs(self, out: RequestOutput) -> dict | None:
        entries = []
        for token, logprob, top, is_reasoning in out.logprobs or []:
            if is_reasoning or token in self.tokenizer.special_ids:
                continue
            entries.append({**self._token_info(token, logprob),
                            "top_logprobs": [self._token_info(t, lp) for t, lp in top]})
        return {"content": entries, "refusal": None} if entries else None

    def _token_info(self, token: int, logprob: float) -> dict:
        b = self.tokenizer.token_bytes(token)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}


async def _queue_when_set(event: asyncio.Event, queue: asyncio.Queue) -> None:
    await event.wait()
    queue.put_nowait(_CANCEL)
