"""The playground's one endpoint: POST /console/api/playground `{"key": NAME, "request": {chat request}}`
streams a chat completion as server-sent events, exactly as POST /v1/chat/completions with `stream: true`
would (the same validation, provider, rate limits, hold and capture, usage record and cost).

The browser never holds a key secret: a signed-in customer names one of their own usable keys, and the run
is billed to it as if the key had been sent (its model list, address ranges, limits and spending limit all
apply). On an open server (no keys required) the run is metered under the anonymous account like any
other request there."""

from __future__ import annotations

import asyncio
import ipaddress

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from thinkgate.api.provider_run import RunStreamingResponse
from thinkgate.api.requests import as_model, parse_body
from thinkgate.api.responses import render_chunks
from thinkgate.api.sse import sse
from thinkgate.config import ServerConfig
from thinkgate.console.context import Console
from thinkgate.errors import AuthenticationError, InvalidRequestError, PermissionDenied
from thinkgate.gateway.service import Caller
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.storage.accounts import NotFound, now


class PlaygroundRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str | None = Field(None, max_length=200, description="the name of one of the caller's keys")
    request: dict


def _ip_allowed(ip: str | None, cidrs: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(ip or "")
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


def add_playground(app: FastAPI, console: Console, config: ServerConfig) -> None:
    auth = console.auth

    async def caller_for(request: Request, viewer, key_name: str | None) -> Caller | None:
        gw = console.gateway
        if gw is None:
            return None
        if not gw.require_keys:  # an open server: anyone may try it, metered as anonymous
            return await gw.authenticate(None, {}, None)
        if not key_name:
            raise InvalidRequestError("choose one of your API keys to bill this run to", param="key",
                                      code="missing_key")
        try:
            key = await asyncio.to_thread(gw.store.key, key_name)
        except NotFound:
            key = None
        if key is None or key.account_id != viewer.account.id or not key.usable(now()):
            raise AuthenticationError("no usable key of this account has that name (revoked or expired?)",
                                      param="key", code="invalid_api_key")
        client_ip = request.client.host if request.client is not None else None
        if key.ips and not _ip_allowed(client_ip, key.ips):
            raise PermissionDenied("this key may not be used from this address", param="key",
                                   code="ip_not_allowed")
        return Caller(viewer.account, key)

    @app.post("/console/api/playground", include_in_schema=False)
    async def run(request: Request):
        gw = console.gateway
        if gw is not None and gw.require_keys:  # signed in (and the CSRF checks) before the body is read
            viewer = await auth.require(request, customer=True, write=True)
        else:
            viewer = None
            auth.check_origin(request)
        body = await parse_body(request, config.max_body_bytes, PlaygroundRun)
        caller = await caller_for(request, viewer, body.key)
        chat = as_model({**body.request, "stream": True, "stream_options": {"include_usage": True}},
                        ChatCompletionRequest)
        params = validate_chat(chat)
        dispatch = request.app.state.dispatch
        started = await dispatch.start(caller, params)
        chunks = render_chunks(started.run, started.ctx, started.provider.model_id, params.n, True)
        return RunStreamingResponse(sse(chunks, config.keepalive_s, keepalive=started.run.keepalive), started.run, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                             **started.headers})
