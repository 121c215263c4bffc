"""`x-request-id` on every answer: the client's value when it sent one, else a chat completion's own id,
else a fresh id; errors (the unhandled-error 500 included) carry it too."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from tests.api.inprocess import asgi_client
from tests.api.scripted_provider import ScriptedProvider
from thinkgate.api.app import create_app

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "scripted", "messages": MSGS}


class BrokenProvider(ScriptedProvider):
    async def prepare(self, params):
        raise RuntimeError("a bug")


def requests(app, calls):
    async def run():
        async with asgi_client(app) as http:
            return [await http.request(method, url, **kw) for method, url, kw in calls]

    return asyncio.run(run())


def test_chat_completion_header_is_its_id_or_the_clients_value():
    app = create_app({"scripted": ScriptedProvider()})
    plain, streamed, echoed, echoed_stream = requests(app, [
        ("POST", "/v1/chat/completions", {"json": CHAT}),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "stream": True}}),
        ("POST", "/v1/chat/completions", {"json": CHAT, "headers": {"X-Request-ID": "client-7f3a"}}),
        ("POST", "/api/gpt/v1/chat/completions", {"json": {**CHAT, "stream": True},
                                                  "headers": {"x-request-id": "client-42"}}),
    ])
    assert plain.headers["x-request-id"] == plain.json()["id"] and plain.json()["id"].startswith("chatcmpl-")
    first = orjson.loads(streamed.text.split("data: ", 2)[1])
    assert streamed.headers["x-request-id"] == first["id"]
    assert echoed.headers["x-request-id"] == "client-7f3a" and echoed.json()["id"].startswith("chatcmpl-")
    assert echoed_stream.headers["x-request-id"] == "client-42"
    assert all(len(r.headers.get_list("x-request-id")) == 1 for r in (plain, streamed, echoed, echoed_stream))


def test_every_other_answer_gets_a_fresh_id_errors_included():
    app = create_app({"scripted": ScriptedProvider(), "broken": BrokenProvider("broken")})
    answers = requests(app, [
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models", {}),
        ("GET", "/health", {}),
        ("GET", "/v1/no-such-route", {}),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "temperature": 9}}),
        ("POST", "/v1/chat/completions", {"json": {**CHAT, "model": "nope"}}),
    ])
    assert [r.status_code for r in answers] == [200, 200, 200, 404, 400, 404]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)

    async def unhandled():  # Starlette's last-resort 500, outside the app's own error handling
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://thinkgate.test") as http:
            return await http.post("/v1/chat/completions", json={**CHAT, "model": "broken"},
                                   headers={"x-request-id": "mine"})

    r = asyncio.run(unhandled())
    assert r.status_code == 500 and r.json()["error"]["code"] is None and r.headers["x-request-id"] == "mine"


def test_unusable_client_values_are_replaced():
    app = create_app({"scripted": ScriptedProvider()})
    long, odd = requests(app, [
        ("GET", "/v1/models", {"headers": {"x-request-id": "x" * 500}}),
        ("GET", "/v1/models", {"headers": {"x-request-id": "caf\u00e9".encode()}}),
    ])
    assert long.headers["x-request-id"].startswith("req_") and odd.headers["x-request-id"].startswith("req_")
