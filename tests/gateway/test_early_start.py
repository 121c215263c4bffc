"""An upstream request started before its hold is placed (api/dispatch.py): sent first, the hold overlapping
the upstream's work, when the cached balance surely covers the request, never otherwise; a hold that refuses
stops it and bills nothing; a hold that grants less replaces it with a request capped to what was granted,
billed once; a client that leaves before the request was sent gives its rate-limit slot back."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import sqlalchemy as sa

from tests.api.inprocess import asgi_client
from tests.gateway.dbs import BACKENDS, fresh_database
from tests.gateway.test_upstream import GOOD, MSGS, provider
from thinkgate.api.app import create_app
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.providers.upstream import UpstreamBackend, UpstreamProvider
from thinkgate.gateway.service import Gateway
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.schema import accounts, ledger

PRICE = Price.cny("1", "2")
MAX_TOKENS = 50


class Upstream:
    """A scripted upstream: answers[i] ("good" or "endless") for its i-th request; it notes each request's
    max_tokens and whether the hold was placed by then, whether the request had come when the hold began, and
    counts the endless answers closed."""

    def __init__(self, *answers: str):
        self.answers = answers
        self.calls: list[dict] = []
        self.closed = 0
        self.received: asyncio.Event | None = None
        self.held = False
        self.before_hold: bool | None = None  # whether the request had come when its hold began

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append({"max_tokens": json.loads(request.content)["max_tokens"], "after_hold": self.held})
        self.received.set()
        if self.answers[len(self.calls) - 1] == "endless":
            async def body():
                try:
                    while True:
                        yield b": waiting\n\n"
                        await asyncio.sleep(0.01)
                finally:
                    self.closed += 1

            return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, content=GOOD, headers={"content-type": "text/event-stream"})


@pytest.fixture(params=BACKENDS)
def kind(request) -> str:
    return request.param


def serve(kind: str, tmp_path, balance_units: int, up: Upstream):
    db = fresh_database(kind, tmp_path)
    store = AccountStore(db)
    store.create_account("a", balance_units=balance_units)
    secret = new_secret()
    store.create_key("a", "k", hash_secret(secret), display_prefix(secret))
    gateway = Gateway(db, {"up": PRICE}, require_keys=True, limiter=MemoryRateLimiter())
    gateway.start_sync()
    hold = gateway.hold

    async def traced_hold(*a, **kw):
        up.before_hold = up.received.is_set()
        try:
            return await hold(*a, **kw)
        finally:
            up.held = True

    gateway.hold = traced_hold
    app = create_app({"up": provider(up, "a")}, gateway=gateway)
    return db, store, app, {"Authorization": f"Bearer {secret}"}


def post(app, headers, up: Upstream, plan: list[tuple[bool, object]]) -> list[httpx.Response]:
    """One request per (early, before) of `plan`; `before()` runs first (e.g. spends the balance); `early`:
    whether the upstream must have had the request when its hold began."""
    async def run():
        out = []
        async with asgi_client(app) as http:
            for early, before in plan:
                if before is not None:
                    before()
                up.received, up.held, up.before_hold = asyncio.Event(), False, None
                out.append(await http.post("/v1/chat/completions", headers=headers,
                                           json={"model": "up", "messages": MSGS, "max_tokens": MAX_TOKENS}))
                assert up.before_hold is early
            return out

    return asyncio.run(run())


def prompt_estimate() -> int:
    """The prompt tokens the provider sizes the hold by."""
    prepared = asyncio.run(provider(Upstream(), "a").prepare(validate_chat(ChatCompletionRequest(
        model="up", messages=MSGS, max_tokens=MAX_TOKENS))))
    return prepared.prompt_tokens


def set_balance(db, units: int) -> None:
    with db.engine.begin() as c:
        c.execute(sa.update(accounts).values(balance_units=units))


def entries(db) -> list[tuple[str, str]]:
    with db.engine.connect() as c:
        return [(r.request_id, r.kind) for r in c.execute(sa.select(ledger.c.request_id, ledger.c.kind)
                                                          .order_by(ledger.c.id))]


def test_an_upstream_request_starts_before_its_hold_when_the_balance_surely_covers_it(kind, tmp_path):
    up = Upstream("good")
    db, store, app, headers = serve(kind, tmp_path, to_units("10"), up)
    try:
        (r,) = post(app, headers, up, [(True, None)])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello"
        assert up.calls == [{"max_tokens": MAX_TOKENS, "after_hold": False}]
        kinds = [k for _, k in entries(db)]
        assert kinds.count("hold") == 1 and kinds.count("capture") == 1  # billed once
        assert store.account("a").balance_units == to_units("10") - PRICE.cost(11, 3)  # the upstream's usage
    finally:
        db.dispose()


def test_no_early_start_when_the_balance_might_not_cover_the_whole_request(kind, tmp_path):
    full = PRICE.cost(prompt_estimate(), MAX_TOKENS)
    up = Upstream("good")
    db, store, app, headers = serve(kind, tmp_path, full + full // 2, up)  # the hold grants all; the guess wants 2x
    try:
        (r,) = post(app, headers, up, [(False, None)])
        assert r.status_code == 200
        assert up.calls == [{"max_tokens": MAX_TOKENS, "after_hold": True}]
    finally:
        db.dispose()


def test_a_hold_that_refuses_stops_the_early_request_and_bills_nothing(kind, tmp_path):
    up = Upstream("good", "endless")
    db, store, app, headers = serve(kind, tmp_path, to_units("10"), up)
    try:
        # The first request caches the key with its balance; then the balance is spent elsewhere. The second
        # starts early on the cached balance, is refused by the hold (402) and its upstream request closed;
        # the third reads the key afresh and never reaches the upstream.
        r1, r2, r3 = post(app, headers, up, [(True, None), (True, lambda: set_balance(db, 0)), (False, None)])
        assert r1.status_code == 200 and r2.status_code == 402 and r3.status_code == 402
        assert [c["after_hold"] for c in up.calls] == [False, False]
        assert up.closed == 1
        assert {rid for rid, kind in entries(db) if kind != "credit"} == {r1.json()["id"]}  # none for the refused
        assert store.account("a").balance_units == 0
    finally:
        db.dispose()


def test_a_hold_that_grants_less_replaces_the_early_request_with_a_capped_one_billed_once(kind, tmp_path):
    prompt = prompt_estimate()
    up = Upstream("good", "endless", "good")
    db, store, app, headers = serve(kind, tmp_path, to_units("10"), up)
    affordable = PRICE.cost(prompt, 5)  # the prompt and about 5 output tokens
    try:
        r1, r2 = post(app, headers, up, [(True, None), (True, lambda: set_balance(db, affordable))])
        assert r1.status_code == 200 and r2.status_code == 200
        assert r2.json()["choices"][0]["message"]["content"] == "Hello"
        early, capped = up.calls[1], up.calls[2]
        assert early == {"max_tokens": MAX_TOKENS, "after_hold": False} and up.closed == 1
        assert capped["after_hold"] and 5 <= capped["max_tokens"] < MAX_TOKENS
        second = [k for rid, k in entries(db) if rid == r2.json()["id"]]
        assert second.count("hold") == 1 and second.count("capture") == 1
        assert store.account("a").balance_units == affordable - PRICE.cost(11, 3)
    finally:
        db.dispose()


def test_a_client_that_leaves_before_the_early_request_was_sent_gives_its_slot_back(kind, tmp_path):
    class FirstNeverConnects(httpx.AsyncBaseTransport):
        """With `hang` set, the next request waits forever for its connection (its body is never sent)."""

        def __init__(self):
            self.hang = False
            self.waiting = asyncio.Event()

        async def handle_async_request(self, request):
            if self.hang:
                self.hang = False
                self.waiting.set()
                await asyncio.Event().wait()
            await request.aread()
            return httpx.Response(200, content=GOOD, headers={"content-type": "text/event-stream"})

    db = fresh_database(kind, tmp_path)
    store = AccountStore(db)
    store.create_account("a", balance_units=to_units("10"))
    secret = new_secret()
    store.create_key("a", "k", hash_secret(secret), display_prefix(secret), concurrency=1)
    gateway = Gateway(db, {"up": PRICE}, require_keys=True, limiter=MemoryRateLimiter())
    gateway.start_sync()
    transport = FirstNeverConnects()
    prov = UpstreamProvider("up", [UpstreamBackend(name="a", base_url="http://a/v1", remote_model="remote")],
                            transport=transport)
    app = create_app({"up": prov}, gateway=gateway)
    headers = {"Authorization": f"Bearer {secret}"}
    body = {"model": "up", "messages": MSGS, "max_tokens": MAX_TOKENS}

    async def run():
        async with asgi_client(app) as http:
            await http.post("/v1/chat/completions", headers=headers, json=body)  # caches the key
            transport.hang = True
            leaving = asyncio.ensure_future(http.post("/v1/chat/completions", headers=headers, json=body))
            await asyncio.wait_for(transport.waiting.wait(), 5)
            leaving.cancel()  # the client goes before its request reached the upstream
            await asyncio.wait([leaving])
            return await http.post("/v1/chat/completions", headers=headers, json=body)

    try:
        r = asyncio.run(run())
        assert r.status_code == 200, r.text  # the one concurrency slot was given back
        assert [k for _, k in entries(db)].count("hold") == 2  # the request that left placed none
    finally:
        db.dispose()
