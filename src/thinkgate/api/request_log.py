"""What one API request was, gathered as it goes: who called (key and account names, never the secret), the
model, the error code it was refused with, its HTTP status, and the usage record of what it generated.

An ASGI middleware opens a `RequestInfo` per API request and puts it in a context variable; the dispatcher
and the error handler fill it in; it is finished exactly once, when both its response has ended and (if it
reached a provider) its usage record has been settled, in whichever order those come (a client that
leaves mid-stream ends the response before the record). Finishing counts it in the metrics and writes its
one JSON line to the `thinkgate.requests` logger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from thinkgate.gateway.providers.base import UsageRecord

API_PREFIXES = ("/v1/", "/api/gpt/v1/")
_current: ContextVar[RequestInfo | None] = ContextVar("thinkgate_request", default=None)


def key_name(caller) -> str:
    """The metrics' and logs' name of a caller: its key's name, or "anonymous" (an open server)."""
    return caller.key.name if caller is not None and caller.key is not None else "anonymous"


@dataclass
class RequestInfo:
    method: str
    path: str
    started: float  # time.monotonic()
    client_request_id: str | None  # the caller's X-Request-Id, if it sent one
    key: str | None = None  # key_name(); None until a caller is known
    account: str | None = None
    model: str | None = None
    error_code: str | None = None  # of the error the request was answered with
    run_started: bool = False  # a provider run began: the request finishes when its record arrives
    record: UsageRecord | None = None
    status: int | None = None
    response_request_id: str | None = None  # the X-Request-Id the response carries
    responded: bool = False
    done: bool = False

    def note_caller(self, caller) -> None:
        self.key = key_name(caller)
        self.account = caller.account.name if caller is not None else None


def current_request() -> RequestInfo | None:
    """The API request being served in this context (None outside one)."""
    return _current.get()


def note_error(exc) -> None:
    """The error code a request is answered with (from the app's error handler)."""
    info = _current.get()
    if info is not None:
        info.error_code = getattr(exc, "code", None)


class RequestLog:
    """ASGI middleware: a RequestInfo for each API request, finished through `on_finish(info)` once. Installed
    outside every other layer (see `install`), so it sees the status and x-request-id the client gets."""

    def __init__(self, app, on_finish: Callable[[RequestInfo], None]):
        self.app = app
        self.on_finish = on_finish

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        rid = headers.get(b"x-request-id")
        info = RequestInfo(scope["method"], scope["path"], time.monotonic(), rid.decode("latin-1") if rid else None)
        token = _current.set(info)

        async def sending(message):
            if message["type"] == "http.response.start":
                info.status = message["status"]
                sent = dict(message.get("headers") or ()).get(b"x-request-id")
                info.response_request_id = sent.decode("latin-1") if sent else None
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _current.reset(token)
            if info.status is None:
                info.status = 500 if not info.run_started else 499  # the app failed, or the client left first
            info.responded = True
            complete(info, self.on_finish)


def install(app, on_finish: Callable[[RequestInfo], None]) -> None:
    """Wrap the app's whole middleware stack (call after any other such wrapper, e.g. api/request_id.py)."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestLog(build(), on_finish)


def complete(info: RequestInfo, on_finish: Callable[[RequestInfo], None]) -> None:
    """Finish the request if both its response and (when it reached a provider) its record are in."""
    if info.done or not info.responded or (info.run_started and info.record is None):
        return
    info.done = True
    on_finish(info)
