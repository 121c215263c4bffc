"""The Responses and text completion routes' two ends: the request read (who calls first, then the body), and
how a started run's events reach the client: streamed as SSE, or collected whole unless the client goes away
first; either way the run is abandoned when the response ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from thinkgate.api.dispatch import Dispatcher, Started
from thinkgate.api.provider_run import RunStreamingResponse
from thinkgate.api.requests import parse_body
from thinkgate.api.sse import sse
from thinkgate.gateway.service import Caller

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
M = TypeVar("M", bound=BaseModel)


async def accepted(request: Request, model: type[M], limit: int) -> tuple[Dispatcher, Caller | None, M]:
    """The app's dispatcher, the caller (401/403 before the body is read), and the body as `model`."""
    dispatch = request.app.state.dispatch
    caller = await dispatch.caller(request)
    return dispatch, caller, await parse_body(request, limit, model)


def streamed(events: AsyncIterator[dict], started: Started, keepalive_s: float,
             typed_events: bool = False) -> RunStreamingResponse:
    return RunStreamingResponse(sse(events, keepalive_s, typed_events, started.run.keepalive), started.run, media_type="text/event-stream",
                                headers={**SSE_HEADERS, **started.headers})


async def collected(request: Request, started: Started, events: AsyncIterator[dict]) -> list[dict] | None:
    """All the events, or None when the client left first (answer 499)."""
    from thinkgate.api.app import collect_unless_disconnected  # app.py imports the routes that import this

    try:
        return await collect_unless_disconnected(request, events)
    finally:
        started.run.abandon()
