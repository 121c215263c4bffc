"""The FastAPI app: routes stay thin; providers do the work; every error leaves in the OpenAI shape."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinkgate.api.responses import assemble_completion
from thinkgate.config import ServerConfig
from thinkgate.errors import InvalidRequestError, ModelNotFound, PayloadTooLarge, ThinkgateError
from thinkgate.gateway.providers.base import ChatProvider
from thinkgate.protocol import ChatCompletionRequest

log = logging.getLogger(__name__)
BASES = ("/v1", "/api/gpt/v1")


def error_response(err: ThinkgateError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status)


def _param_from_loc(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[ContentPart]", "function-after", "literal['none','auto','required']"):
            continue  # union branch names pydantic adds, not parameter names
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(e: ValidationError) -> InvalidRequestError:
    first = e.errors()[0]
    param = _param_from_loc(tuple(first["loc"]))
    msg = first["msg"]
    if first["type"] == "missing":
        return InvalidRequestError(f"missing required parameter: {param}", param=param)
    value = first.get("input")
    shown = repr(value)[:80] if not isinstance(value, dict) else "an object"
    return InvalidRequestError(f"invalid value for {param}: {msg} (got {shown})", param=param)


def create_app(providers: dict[str, ChatProvider], config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    app = FastAPI(title="thinkgate", version="0.1.0")
    app.state.providers = providers

    @app.exception_handler(ThinkgateError)
    async def _tg_error(request: Request, exc: ThinkgateError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(ValidationError.from_exception_data("request", exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(exc.detail), "type": etype, "param": None, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        body = {"error": {"message": "internal server error", "type": "server_error", "param": None, "code": 500}}
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(providers),
                "active_requests": sum(p.num_active() for p in providers.values())}

    def provider_for(model: str) -> ChatProvider:
        p = providers.get(model)
        if p is None:
            raise ModelNotFound(f"the model {model!r} does not exist; available: {', '.join(providers)}",
                                param="model", code="model_not_found")
        return p

    async def list_models():
        return {"object": "list", "data": [p.card() for p in providers.values()]}

    async def get_model(model_id: str):
        return provider_for(model_id).card()

    async def chat_completions(request: Request):
        req = await parse_chat_request(request, config.max_body_bytes)
        provider = provider_for(req.model)
        prepared = await provider.prepare(req)
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        stream = provider.stream(req, prepared, completion_id, created)
        if req.stream:
            return StreamingResponse(sse(stream, config.keepalive_s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        chunks = await collect_unless_disconnected(request, stream)
        if chunks is None:
            return Response(status_code=499)
        for ch in chunks:
            if "error" in ch:
                err = ch["error"]
                return JSONResponse({"error": {**err, "param": None}}, status_code=500)
        body = assemble_completion(chunks, prepared.show_reasoning, prepared.mode)
        return Response(orjson.dumps(body), media_type="application/json")

    for base in BASES:
        app.add_api_route(f"{base}/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(f"{base}/models", list_models, methods=["GET"])
        app.add_api_route(base + "/models/{model_id:path}", get_model, methods=["GET"])
    return app


async def parse_chat_request(request: Request, limit: int) -> ChatCompletionRequest:
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype.lower():
        raise InvalidRequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


async def collect_unless_disconnected(request: Request, stream: AsyncIterator[dict]) -> list[dict] | None:
    """Gather the whole chunk stream; if the client goes away first, cancel it (aborting the request)."""

    async def collect():
        return [c async for c in stream]

    task = asyncio.create_task(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        await _close(task, stream)


async def sse(stream: AsyncIterator[dict], keepalive_s: float) -> AsyncIterator[bytes]:
    """SSE framing with keep-alive comments while the next chunk is not ready."""
    it = stream.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                break
            except ThinkgateError as e:
                yield b"data: " + orjson.dumps(e.to_dict()) + b"\n\n"
                break
            except Exception as e:  # after the headers went out, errors travel in the stream
                log.exception("stream failed")
                body = {"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                  "code": 500}}
                yield b"data: " + orjson.dumps(body) + b"\n\n"
                break
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            nxt = asyncio.ensure_future(it.__anext__())
        yield b"data: [DONE]\n\n"
    finally:
        await _close(nxt, it)


async def _close(pending: asyncio.Future, stream) -> None:
    """Stop a half-consumed chunk stream: cancel the pending step, wait for it, then close the generator
    (closing a generator whose step is still running fails). Shielded, because this runs while the client
    disconnect is cancelling the request, and it is what aborts the engine request."""
    with anyio.CancelScope(shield=True):
        if not pending.done():
            pending.cancel()
        try:
            await pending
        except BaseException:  # noqa: BLE001 - cancelled, finished or failed: all we need is that it stopped
            pass
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
