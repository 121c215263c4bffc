"""Serve a chat request on our own engine: template -> tokens -> engine -> reasoning/tool split -> chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from thinkgate.chat.messages import to_template_messages
from thinkgate.chat.template import render_chat, thinking_mode
from thinkgate.chat.tools import tool_call_lark, validate_tools
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.engine.request import FinishReason, RequestOutput
from thinkgate.errors import InvalidRequestError
from thinkgate.gateway.providers.choice_stream import ChoiceStream
from thinkgate.protocol import ChatCompletionRequest, NamedToolChoice
from thinkgate.sampling.params import SamplingParams
from thinkgate.structured.backend import GrammarError, make_backend, resolve_grammar_backend

EFFORT_FRACTION = {"none": 0.0, "minimal": 0.1, "low": 0.2, "medium": 0.5, "high": 0.8, "xhigh": 0.95}
SUPPORTED_PARAMETERS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "top_a", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "seed", "logit_bias", "logprobs", "top_logprobs", "stop", "n",
    "response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls", "reasoning",
    "include_reasoning", "verbosity", "stream", "chat_template_kwargs",
]


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    mode: str  # reasoning mode of the output: open | hybrid | none
    show_reasoning: bool
    n: int
    tools: bool  # parse tool calls out of the answer
    grammars: list | None  # one matcher per choice when the answer is constrained


class LocalProvider:
    def __init__(self, engine: AsyncEngine, model_id: str, description: str = ""):
        self.engine = engine
        self.model_id = model_id
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.description = description
        self._grammar_backend = None

    def card(self) -> dict:
        return {
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "thinkgate",
            "name": self.model_id, "description": self.description, "context_length": self.max_model_len,
            "pricing": {"prompt": "0", "completion": "0", "currency": "CNY", "unit": "1K tokens"},
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

    async def prepare(self, req: ChatCompletionRequest) -> Prepared:
        template = self.tokenizer.chat_template
        if not template:
            raise InvalidRequestError("this model has no chat template", param="model")
        validate_tools(req)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        kwargs = dict(req.chat_template_kwargs or {})
        if req.reasoning is not None and req.reasoning.enabled is False:
            kwargs.setdefault("enable_thinking", False)
        kwargs.setdefault("eos_token", self.tokenizer.eos_token)
        messages = to_template_messages(req.messages, req.verbosity)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        # Rendering and tokenizing a long conversation takes milliseconds: keep it off the event loop.
        prompt = await asyncio.to_thread(render_chat, template, messages, tools, True, **kwargs)
        ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the messages "
                f"take {len(ids)} tokens (leaving no room to generate)", param="messages",
                code="context_length_exceeded")
        mode = thinking_mode(prompt, template)
        params = self._sampling_params(req, len(ids), mode)
        if use_tools and req.parallel_tool_calls is False and req.tool_choice in (None, "auto"):
            params.stop = params.stop + ["</tool_call>"]  # end the turn after the first call
        n = req.n or 1
        grammars = await asyncio.to_thread(self._grammars, req, use_tools, n)
        show = not (req.include_reasoning is False or (req.reasoning is not None and req.reasoning.exclude))
        return Prepared(ids, params, mode, show, n, use_tools, grammars)

    def _grammars(self, req: ChatCompletionRequest, use_tools: bool, n: int) -> list | None:
        """Compile the answer's constraint now, so a bad schema is a 400 before anything is queued."""
        rf = req.response_format
        forced_tools = use_tools and (req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice))
        if forced_tools:
            tok = self.tokenizer
            lark = tool_call_lark(req, tok.token_id("<tool_call>"), tok.token_id("</tool_call>"))
            make, param = (lambda: self.grammar_backend.lark(lark)), "tools"
        elif rf is not None and rf.type == "json_object":
            make, param = self.grammar_backend.json_object, "response_format"
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                          param="response_format.json_schema")
            schema = rf.json_schema.schema_
            make, param = (lambda: self.grammar_backend.json_schema(schema)), "response_format.json_schema"
        else:
            return None
        try:
            return [make() for _ in range(n)]
        except GrammarError as e:
            raise InvalidRequestError(f"unsupported or invalid schema: {e}", param=param) from None

    def _sampling_params(self, req: ChatCompletionRequest, n_prompt: int, mode: str) -> SamplingParams:
        bias = {}
        for k, v in (req.logit_bias or {}).items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise InvalidRequestError(f"logit_bias key {k!r} is not a token id", param="logit_bias") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequestError(f"{name} must be >= 1, got {max_tokens}", param=name)
        room = self.max_model_len - n_prompt
        cap = min(max_tokens, room) if max_tokens is not None else room  # a cap, not a demand
        budget = None
        r = req.reasoning
        if mode != "none" and r is not None:
            if r.max_tokens is not None:
                if r.max_tokens < 0:
                    raise InvalidRequestError(f"reasoning.max_tokens must be >= 0, got {r.max_tokens}",
                                              param="reasoning.max_tokens")
                budget = r.max_tokens
            elif r.effort is not None:
                budget = int(EFFORT_FRACTION[r.effort] * cap)
            elif r.enabled is False and mode == "open":
                budget = 0
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        p = SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            top_a=req.top_a or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0, repetition_penalty=req.repetition_penalty,
            seed=req.seed, max_tokens=cap, min_tokens=req.min_tokens or 0, logit_bias=bias, stop=stop,
            stop_token_ids=list(req.stop_token_ids or []), logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0, n=req.n if req.n is not None else 1,
            ignore_eos=bool(req.ignore_eos), reasoning_budget=budget,
        )
        p.validate(vocab_size=self.tokenizer.vocab_size)
        return p

    async def stream(self, req: ChatCompletionRequest, prep: Prepared, completion_id: str,
                     created: int) -> AsyncIterator[dict]:
        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_id, "choices": choices, **extra}

        queue: asyncio.Queue = asyncio.Queue()
        prefilled = asyncio.Event()  # choice 0 has its prompt in the cache: the others reuse it
        tasks = [asyncio.create_task(self._pump(i, prep, completion_id, queue, prefilled)) for i in range(prep.n)]
        choices = [ChoiceStream(i, prep.mode, prep.show_reasoning, prep.tools) for i in range(prep.n)]
        last: list[RequestOutput | None] = [None] * prep.n
        try:
            for i in range(prep.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            done = 0
            while done < prep.n:
                i, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                last[i] = out
                lp = self._logprobs(out) if prep.params.logprobs else None
                deltas = choices[i].deltas(out)
                for k, delta in enumerate(deltas or ([{}] if lp else [])):
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp if k == 0 else None,
                                  "finish_reason": None}])
                if out.finished:
                    done += 1
                    fin = choices[i].finish(out)
                    if out.finish_reason == FinishReason.ERROR:
                        yield chunk([fin], error={"message": str(out.stop_reason), "type": "server_error",
                                                  "code": 500})
                    else:
                        yield chunk([fin])
            yield chunk([], usage=self._usage(last))
        finally:
            for t in tasks:
                t.cancel()

    async def _pump(self, i: int, prep: Prepared, completion_id: str, queue: asyncio.Queue,
                    prefilled: asyncio.Event) -> None:
        params = prep.params
        if prep.n > 1 and params.seed is not None:
            params = replace(params, seed=params.seed + i)  # independent choices, still reproducible
        grammar = prep.grammars[i] if prep.grammars else None
        try:
            if i > 0:
                # Start after choice 0's prefill, so the prompt is computed once and shared through the
                # prefix cache instead of n times in the same step.
                await prefilled.wait()
            async for out in self.engine.generate(f"{completion_id}-{i}", prep.prompt_ids, params,
                                                  reasoning_open=prep.mode == "open", grammar=grammar):
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

    @staticmethod
    def _usage(outs: list[RequestOutput | None]) -> dict:
        outs = [o for o in outs if o is not None]
        prompt = outs[0].num_prompt_tokens if outs else 0
        completion = sum(o.num_output_tokens for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": outs[0].num_cached_tokens if outs else 0},
                "completion_tokens_details": {"reasoning_tokens": sum(o.num_reasoning_tokens for o in outs)},
                "cost": 0}
