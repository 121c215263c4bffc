"""The FastAPI app: routes stay thin; providers do the work; every error leaves in the OpenAI shape.

A chat request goes: parse (api/requests.py) -> validate once (thinkgate/params.py) -> route to a provider
-> prepare (model-specific checks) -> a ProviderRun streams its events, whose usage record goes to the
usage hook however the request ends -> chunks, as SSE or assembled into one completion."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from thinkgate.api.account import add_account_routes
from thinkgate.api.admin import add_admin_routes
from thinkgate.api.dispatch import Dispatcher
from thinkgate.api.openai_responses import add_responses_routes
from thinkgate.api.openapi import GENERATES, READS, documented, install_openapi
from thinkgate.api.operations import Operations
from thinkgate.api.provider_run import RunStreamingResponse, UsageHook, log_usage
from thinkgate.api.request_id import install_request_id
from thinkgate.api.request_log import note_error
from thinkgate.api.requests import parse_chat_request, validation_error
from thinkgate.api.responses import assemble_completion, render_chunks
from thinkgate.api.sse import sse
from thinkgate.api.text_completions import add_text_completion_routes
from thinkgate.config import ServerConfig
from thinkgate.console import add_console
from thinkgate.errors import ThinkgateError, error_body
from thinkgate.gateway.providers.base import ChatProvider
from thinkgate.gateway.service import Gateway
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.protocol_responses import ChatCompletion, ChatCompletionChunk, Health, ModelCard, ModelList

log = logging.getLogger(__name__)
BASES = ("/v1", "/api/gpt/v1")


def error_response(err: ThinkgateError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)


def create_app(providers: dict[str, ChatProvider], config: ServerConfig | None = None,
               on_usage: UsageHook = log_usage, gateway: Gateway | None = None,
               admin_token: str | None = None) -> FastAPI:
    """`on_usage` receives one UsageRecord per request that reached a provider, however it ended (priced and
    captured first when a `gateway` is given: keys, limits, billing, the caller and admin endpoints; without
    one the API is open and unmetered)."""
    config = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        beat = asyncio.create_task(gateway.run_heartbeat()) if gateway is not None else None
        try:
            yield
        finally:
            await ops.shutdown()  # the drain: running requests finish or end, every record settled
            if beat is not None:
                beat.cancel()
                await gateway.limiter.aclose()
                await gateway.aclose()
            for p in providers.values():  # upstream providers hold pooled HTTP clients
                if (close := getattr(p, "aclose", None)) is not None:
                    await close()

    docs = config.docs  # the pages load their scripts from a CDN: off unless asked for (api/openapi.py)
    app = FastAPI(title="thinkgate", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None,
                  description="An OpenAI-compatible API for Qwen3 thinking models (chat completions, Responses, "
                              "text completions) with keys, balances and a ledger.")
    install_openapi(app, "none" if gateway is None else "required" if gateway.require_keys else "optional")
    install_request_id(app)  # x-request-id on every answer
    ops = Operations(providers, gateway, config)
    ops.install(app)  # /metrics; each API request counted and logged once (outside the x-request-id layer)

    @app.exception_handler(ThinkgateError)
    async def _tg_error(request: Request, exc: ThinkgateError):
        note_error(exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(ValidationError.from_exception_data("request", exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), etype), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error"), status_code=500)

    @app.get("/health", **documented(response=Health, auth=None))
    async def health():
        return {"status": "ok", "models": list(providers),
                "active_requests": sum(p.num_active() for p in providers.values())}

    dispatch = Dispatcher(providers, gateway, on_usage, ops)
    app.state.dispatch = dispatch  # for the routes other modules add

    async def list_models(request: Request):
        await dispatch.caller(request)
        return {"object": "list", "data": [p.card() for p in providers.values()]}

    async def get_model(request: Request, model_id: str):
        await dispatch.caller(request)
        return dispatch.provider_for(model_id).card()

    async def chat_completions(request: Request):
        caller = await dispatch.caller(request)
        params = validate_chat(await parse_chat_request(request, config.max_body_bytes))
        started = await dispatch.start(caller, params)
        run, ctx = started.run, started.ctx
        model = started.provider.model_id
        if params.stream:
            chunks = render_chunks(run, ctx, model, params.n, params.include_usage)
            return RunStreamingResponse(sse(chunks, config.keepalive_s, keepalive=run.keepalive), run, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                 **started.headers})
        try:
            chunks = await collect_unless_disconnected(request, render_chunks(run, ctx, model, params.n, True))
        finally:
            run.abandon()
        if chunks is None:
            return Response(status_code=499)
        for ch in chunks:
            if "error" in ch:
                return JSONResponse({"error": ch["error"]}, status_code=run.error.status if run.error else 500)
        body = assemble_completion(chunks, params.show_reasoning, started.prepared.reasoning_mode)
        return Response(orjson.dumps(body), media_type="application/json", headers=started.headers)

    if gateway is not None:
        add_account_routes(app, gateway.store, gateway.ledger)
        add_admin_routes(app, gateway.store, gateway.ledger, admin_token, providers)
    for base in BASES:
        app.add_api_route(f"{base}/chat/completions", chat_completions, methods=["POST"],
                          **documented(ChatCompletionRequest, ChatCompletion, stream=ChatCompletionChunk,
                                       errors=GENERATES))
        app.add_api_route(f"{base}/models", list_models, methods=["GET"],
                          **documented(response=ModelList, errors=READS))
        app.add_api_route(base + "/models/{model_id:path}", get_model, methods=["GET"],
                          **documented(response=ModelCard, errors=READS))
    add_responses_routes(app, BASES, config)
    add_text_completion_routes(app, BASES, config)
    add_console(app, providers, gateway, admin_token, config)  # `/` and `/console`: the web console
    return app


async def collect_unless_disconnected(request: Request, chunks) -> list[dict] | None:
    """Gather the whole chunk stream, or None if the client goes away first (the caller abandons the run)."""

    async def collect():
        return [c async for c in chunks]

    task = asyncio.create_task(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()  # only stops reading the queue; the provider run ends on its own after abandon()
