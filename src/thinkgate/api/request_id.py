"""`x-request-id` on every answer, as OpenAI sends it: the client's own value when it sent a usable one (so
it can match its logs to ours), else the id the route gave its response (a chat completion's id), else a
fresh one. Installed outside every other layer, so even Starlette's last-resort 500 carries it."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thinkgate.ids import random_hex

HEADER = b"x-request-id"
MAX_LEN = 200


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = client_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own = next((v for k, v in headers if k.lower() == HEADER), None)
                value = client or own or ("req_" + random_hex()).encode()
                headers = [(k, v) for k, v in headers if k.lower() != HEADER] + [(HEADER, value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def client_request_id(scope: Scope) -> bytes | None:
    """The client's x-request-id if it is printable ASCII of a sane length (else it is not echoed)."""
    for key, value in scope.get("headers", []):
        if key == HEADER:  # ASGI servers lowercase header names
            if 0 < len(value) <= MAX_LEN and all(0x20 <= b < 0x7F for b in value):
                return value
            return None
    return None


def install_request_id(app: Starlette) -> None:
    """Wrap the whole middleware stack (outside Starlette's ServerErrorMiddleware, which `add_middleware`
    cannot reach), so every response, the unhandled-error 500 included, carries the header."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIdMiddleware(build())
