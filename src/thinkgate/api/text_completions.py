"""Legacy text completions (`POST /v1/completions`) on models that take raw prompts, and the answer of
`/v1/embeddings` (no embedding model is served: a 404 in the OpenAI error shape).

A completion request's sampling fields are checked by `validate_chat` (its chat form: the same ranges and
errors as chat); the prompts (a string, strings, token ids or lists of token ids) go to the provider's
`prepare_text`, which tokenizes them without any chat template. The run starts through the app's
dispatcher (gateway checks, the usage hook, abandon on disconnect). Choice k of prompt p is choice
p * n + k. Chunks are rendered as chat chunks first (api/responses.py: where usage goes), then in the legacy
`text_completion` shape: `text`, and `logprobs` as tokens / token_logprobs / top_logprobs / text_offset.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from thinkgate.api.delivery import accepted, collected, streamed
from thinkgate.api.openapi import GENERATES, documented
from thinkgate.api.provider_run import KEEPALIVE
from thinkgate.api.requests import validation_error
from thinkgate.api.responses import render_chunks
from thinkgate.config import ServerConfig
from thinkgate.errors import InvalidRequestError, ModelNotFound
from thinkgate.params import ChatParams, check_ranges, validate_chat
from thinkgate.protocol import ChatCompletionRequest, ranges
from thinkgate.protocol_endpoints import CHAT_EXTRAS, MAX_PROMPTS, CompletionRequest
from thinkgate.protocol_responses import TextCompletion

_RANGES = ranges(CompletionRequest)
# A text completion has no messages; its chat form (what validate_chat checks) carries this one, unread.
_NO_MESSAGES = [{"role": "user", "content": ""}]


def prompts_of(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    prompts = [p] if isinstance(p[0], int) else list(p)
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequestError(f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
                                  param="prompt")
    return prompts


def text_params(req: CompletionRequest) -> ChatParams:
    """The request's sampling settings, checked as chat checks them; 400 for what this server cannot do."""
    if req.suffix:
        raise InvalidRequestError("suffix (insertion) is not served here", param="suffix")
    n = req.n if req.n is not None else 1
    if req.best_of is not None and req.best_of != n:
        raise InvalidRequestError(f"best_of must equal n ({n}): every generated choice is returned, none is ranked "
                                  "away", param="best_of")
    check_ranges(req, _RANGES)
    if req.echo and req.logprobs is not None:
        raise InvalidRequestError("echo with logprobs needs the prompt tokens' logprobs, which are not computed",
                                  param="echo")
    body = {"model": req.model, "messages": _NO_MESSAGES, "stream": req.stream, "max_tokens": req.max_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "n": req.n, "stop": req.stop,
            "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
            "logit_bias": req.logit_bias, "seed": req.seed, "user": req.user,
            "logprobs": True if req.logprobs is not None else None, "top_logprobs": req.logprobs,
            "stream_options": req.stream_options.model_dump() if req.stream_options is not None else None}
    body.update({k: getattr(req, k) for k in CHAT_EXTRAS if getattr(req, k) is not None})
    try:
        return validate_chat(ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None}))
    except ValidationError as e:
        raise validation_error(e) from None
    except InvalidRequestError as e:
        if e.param == "top_logprobs":
            raise InvalidRequestError(e.message.replace("top_logprobs", "logprobs"), param="logprobs") from None
        raise


class TextChunks:
    """Chat chunks -> `text_completion` chunks: the echoed prompt first, text offsets counted per choice."""

    def __init__(self, texts: tuple[str, ...], n: int, echo: bool, logprobs: bool):
        self.texts = texts
        self.n = n  # choices per prompt
        self.echo = echo
        self.logprobs = logprobs
        self.offset: dict[int, int] = {}  # characters of each choice's tokens so far (text_offset)

    def convert(self, chunk: dict) -> dict | None:
        choices = []
        for c in chunk["choices"]:
            i, d = c["index"], c.get("delta") or {}
            text = d.get("content") or ""
            if "role" in d and self.echo:  # the choice's first chunk
                text = self.texts[i // self.n] + text
            entries = (c.get("logprobs") or {}).get("content") or []
            if not text and not entries and not c.get("finish_reason"):
                continue
            choices.append({"index": i, "text": text, "logprobs": self._legacy(i, entries) if self.logprobs else None,
                            "finish_reason": c.get("finish_reason"),
                            "native_finish_reason": c.get("native_finish_reason")})
        if not choices and "usage" not in chunk and "error" not in chunk:
            return None
        out = {"id": chunk["id"], "object": "text_completion", "created": chunk["created"], "model": chunk["model"],
               "choices": choices}
        for key in ("usage", "error"):
            if key in chunk:
                out[key] = chunk[key]
        return out

    def _legacy(self, i: int, entries: list[dict]) -> dict:
        # Offsets count the tokens' own strings: a character split over two tokens shows in both (as "\ufffd"),
        # and the text holds back an unfinished character, so counting the text would go out of step.
        at = self.offset.get(i, 0)
        offsets = []
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        self.offset[i] = at
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}


async def text_chunks(chat_chunks: AsyncIterator[dict], convert) -> AsyncIterator[dict]:
    async for ch in chat_chunks:
        out = ch if ch is KEEPALIVE else convert(ch)
        if out is not None:
            yield out


def assemble_text_completion(chunks: list[dict]) -> dict:
    head = chunks[0]
    per: dict[int, dict] = {}
    usage = None
    for ch in chunks:
        usage = ch.get("usage") or usage
        for c in ch["choices"]:
            st = per.setdefault(c["index"], {"index": c["index"], "text": "", "logprobs": None,
                                             "finish_reason": None, "native_finish_reason": None})
            st["text"] += c["text"]
            if c["logprobs"] is not None:
                lp = st["logprobs"] = st["logprobs"] or {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    lp[k].extend(v)
            if c.get("finish_reason"):
                st["finish_reason"], st["native_finish_reason"] = c["finish_reason"], c.get("native_finish_reason")
    return {"id": head["id"], "object": "text_completion", "created": head["created"], "model": head["model"],
            "choices": [per[i] for i in sorted(per)], "usage": usage}


def add_text_completion_routes(app: FastAPI, bases: tuple[str, ...], config: ServerConfig) -> None:
    async def completions(request: Request):
        dispatch, caller, req = await accepted(request, CompletionRequest, config.max_body_bytes)
        prompts = prompts_of(req)
        params = text_params(req)
        if not hasattr(dispatch.provider_for(req.model), "prepare_text"):
            raise InvalidRequestError(f"the model {req.model!r} serves chat only, not text completions", param="model")
        started = await dispatch.start(caller, params, id_prefix="cmpl-",
                                       prepare=lambda provider: provider.prepare_text(params, prompts))
        run, ctx, total = started.run, started.ctx, started.prepared.params.n
        model = started.provider.model_id
        conv = TextChunks(started.prepared.texts, params.n, bool(req.echo), req.logprobs is not None)
        if params.stream:
            chunks = text_chunks(render_chunks(run, ctx, model, total, params.include_usage), conv.convert)
            return streamed(chunks, started, config.keepalive_s)
        chunks = await collected(request, started, text_chunks(render_chunks(run, ctx, model, total, True),
                                                               conv.convert))
        if chunks is None:
            return Response(status_code=499)
        error = next((ch["error"] for ch in chunks if "error" in ch), None)
        if error is not None:
            return JSONResponse({"error": error}, status_code=run.error.status if run.error else 500)
        return Response(orjson.dumps(assemble_text_completion(chunks)), media_type="application/json",
                        headers=started.headers)

    async def embeddings(request: Request):
        dispatch = request.app.state.dispatch
        await dispatch.caller(request)  # who may ask, as for every model route
        served = ", ".join(dispatch.providers)
        raise ModelNotFound(f"no embedding model is served here, so /embeddings is not available (the served "
                            f"models generate text: {served})", param="model", code="model_not_found")

    for base in bases:
        app.add_api_route(f"{base}/completions", completions, methods=["POST"],
                          **documented(CompletionRequest, TextCompletion, stream=TextCompletion, errors=GENERATES))
        app.add_api_route(f"{base}/embeddings", embeddings, methods=["POST"], **documented(errors=(401, 404)))
