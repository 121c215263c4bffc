"""The caller's own endpoints (GET /v1/key, GET /v1/generation, POST /v1/redeem) on real databases (SQLite,
PostgreSQL): with a stand-in for the app's dispatcher that names the caller, and end to end through the real
gateway (keys, a priced scripted model, billing) with the admin API beside them."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from decimal import Decimal

import pytest

from tests.api.inprocess import asgi_client
from tests.api.scripted_provider import ScriptedProvider
from tests.gateway.dbs import BACKENDS, fresh_database
from tests.gateway.test_admin_api import ADMIN, TOKEN, error_of, usage_row
from thinkgate.api.account import BASES, add_account_routes
from thinkgate.api.app import create_app
from thinkgate.gateway import manage
from thinkgate.gateway.keys import hash_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price
from thinkgate.gateway.service import Caller, Gateway
from thinkgate.storage.accounts import AccountStore, now
from thinkgate.storage.db import Database
from thinkgate.storage.ledger import Ledger
from thinkgate.storage.schema import api_keys


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


class NamedCaller:
    """Stands in for the app's Dispatcher: every request comes from `who` (a Caller, or None: no gateway)."""

    def __init__(self, who: Caller | None):
        self.who = who

    async def caller(self, request):
        return self.who


def account_app(db, who_name: str | None, key_name: str | None = None):
    store, ledger = AccountStore(db), Ledger(db)
    app = create_app({})
    add_account_routes(app, store, ledger)
    if who_name is not None:
        acct = store.account(who_name)
        app.state.dispatch = NamedCaller(Caller(acct, store.key(key_name) if key_name else None))
    else:
        app.state.dispatch = NamedCaller(None)
    return app, store, ledger


def get(app, *paths: str, method: str = "GET", bodies: list | None = None) -> list:
    async def go():
        async with asgi_client(app) as c:
            if bodies is not None:
                return [await c.request(method, p, json=b) for p, b in zip(paths, bodies, strict=True)]
            return [await c.request(method, p) for p in paths]

    return asyncio.run(go())


def test_key_info_in_openrouters_shape_with_balance_in_cny(db):
    store, ledger = AccountStore(db), Ledger(db)
    acct = store.create_account("alice", balance_units=1_000_000_000)  # 10 CNY
    key = store.create_key("alice", "alice-ci", "h", "sk-tg-abcd...", limit_units=50_000_000, rpm=60, tpm=1000,
                           concurrency=2, models=["m1"])
    ledger.hold("r1", acct.id, key.id, "test", lambda avail: 1_000_000)
    ledger.settle("r1", 370_007, usage_row("m1", 1000, 100))
    ledger.hold("r2", acct.id, key.id, "test", lambda avail: 2_000_000)  # still running: held, not spent
    app, _, _ = account_app(db, "alice", "alice-ci")
    responses = get(app, *[f"{b}/key" for b in BASES])
    assert responses[0].json() == responses[1].json()
    data = responses[0].json()["data"]
    assert data == {"label": "alice-ci", "prefix": "sk-tg-abcd...", "account": "alice", "limit": 0.5,
                    "usage": 0.00370007, "limit_remaining": 0.47629993, "is_free_tier": False,
                    "rate_limit": {"requests": 60, "interval": "1m", "tokens": 1000, "concurrency": 2},
                    "balance": 9.97629993, "currency": "CNY", "expires_at": None, "models": ["m1"]}
    # The JSON numbers are the exact decimals: 10 - 0.00370007 - 0.02 held.
    assert Decimal(responses[0].text.split('"balance":')[1].split(",")[0]) == Decimal("9.97629993")


def test_key_info_of_an_open_server_is_its_metered_anonymous_account(db):
    store, ledger = AccountStore(db), Ledger(db)
    anon = store.anonymous()
    ledger.record("r1", anon.id, None, 12, usage_row("m", 3, 4))
    app, _, _ = account_app(db, anon.name)
    (r,) = get(app, "/v1/key")
    data = r.json()["data"]
    assert (data["label"], data["usage"], data["limit"], data["balance"]) == ("anonymous", 1.2e-07, None, 0)
    assert data["rate_limit"]["requests"] is None and data["prefix"] is None


def test_generation_shows_the_callers_own_request_with_its_cost_breakdown(db):
    store, ledger = AccountStore(db), Ledger(db)
    alice = store.create_account("alice", balance_units=10**8)
    store.create_account("bob")
    key = store.create_key("alice", "k", "h", "sk-tg-abcd...")
    ledger.hold("gen-1", alice.id, key.id, "test", lambda avail: 10**6)
    # 1000 prompt tokens of which 400 cached, 1 completion (reasoning): 600*0.00275 + 400*0.0011 + 0.0095 per 1000.
    cost = Price.cny("0.00275", "0.0095", "0.0011").cost(1000, 1, cached_tokens=400)
    row = usage_row("m1", 1000, 1, cached_tokens=400, reasoning_tokens=1, price_cached_per_1k=110_000,
                    cancelled=True, ended_by="client_disconnect", finish_reason="length", user="u-7")
    ledger.settle("gen-1", cost, row)
    app, _, _ = account_app(db, "alice", "k")
    own, own_gpt, unknown, missing = get(app, "/v1/generation?id=gen-1", "/api/gpt/v1/generation?id=gen-1",
                                         "/v1/generation?id=gen-404", "/v1/generation")
    assert own.json() == own_gpt.json()
    data = own.json()["data"]
    assert data["total_cost"] == 0.0020995 and cost == 209_950 and data["currency"] == "CNY"
    assert data["cost_breakdown"]["input"] == {"tokens": 600, "price_per_1k": 0.00275, "cost": 0.00165}
    assert data["cost_breakdown"]["cached_input"] == {"tokens": 400, "price_per_1k": 0.0011, "cost": 0.00044}
    assert data["cost_breakdown"]["output"] == {"tokens": 1, "price_per_1k": 0.0095, "cost": 0.0000095}
    assert (data["tokens_prompt"], data["tokens_cached"], data["tokens_completion"], data["tokens_reasoning"]) == \
        (1000, 400, 1, 1)
    assert (data["latency"], data["ttft"], data["finish_reason"], data["cancelled"], data["user"]) == \
        (12.5, 3.25, "length", True, "u-7")
    assert data["id"] == "gen-1" and data["model"] == "m1" and data["created_at"].endswith("+00:00")
    assert error_of(unknown, 404)["param"] == "id" and error_of(missing, 400)["param"] == "id"
    # Another account asking for alice's id learns as much as for an unknown one.
    app, _, _ = account_app(db, "bob")
    (theirs,) = get(app, "/v1/generation?id=gen-1")
    assert error_of(theirs, 404)["message"] == error_of(unknown, 404)["message"].replace("gen-404", "gen-1")


def test_without_a_gateway_the_caller_endpoints_do_not_exist(db):
    app, _, _ = account_app(db, None)
    for r in get(app, "/v1/key", "/v1/generation?id=x") + get(app, "/v1/redeem", method="POST", bodies=[{}]):
        assert error_of(r, 404)["code"] == "no_gateway"


def test_redeem_credits_once_and_refuses_unknown_used_and_open_server_calls(db):
    store = AccountStore(db)
    store.create_account("alice", balance_units=100)
    store.create_key("alice", "k", "h", "sk-tg-abcd...")
    _, codes = manage.create_codes(store, 150_000_000, 1)
    app, _, _ = account_app(db, "alice", "k")
    ok, again, unknown, empty, missing = get(app, *["/v1/redeem"] * 3 + ["/api/gpt/v1/redeem"] * 2, method="POST",
                                             bodies=[{"code": codes[0]}, {"code": codes[0]}, {"code": "tg-code-x"},
                                                     {"code": ""}, {}])
    assert ok.status_code == 200 and ok.json() == {"data": {"credited": 1.5, "balance": 1.500001, "currency": "CNY"}}
    for r in (again, unknown):
        err = error_of(r, 400)
        assert (err["param"], err["code"]) == ("code", "invalid_code") and codes[0] not in r.text
    assert error_of(empty, 400)["param"] == "code" and error_of(missing, 400)["param"] == "code"
    assert store.account("alice").balance_units == 150_000_100
    app, _, _ = account_app(db, store.anonymous().name)
    (r,) = get(app, "/v1/redeem", method="POST", bodies=[{"code": codes[0]}])
    assert error_of(r, 403)["code"] == "open_server"


def test_twenty_concurrent_redemptions_of_one_code_credit_it_once(db):
    store = AccountStore(db)
    store.create_account("alice")
    store.create_key("alice", "k", "h", "sk-tg-abcd...")
    _, (code,) = manage.create_codes(store, 100_000_000, 1)
    app, _, _ = account_app(db, "alice", "k")

    async def go():
        async with asgi_client(app) as c:
            return await asyncio.gather(*[c.post("/v1/redeem", json={"code": code}) for _ in range(20)])

    statuses = sorted(r.status_code for r in asyncio.run(go()))
    assert statuses == [200] + [400] * 19
    assert store.account("alice").balance_units == 100_000_000


def test_end_to_end_through_the_real_gateway_and_the_admin_api(db, caplog):
    """The app as `serve` builds it (create_app adds these routes and the admin API to a gateway's app).
    Keys made over the admin API authenticate for real; a priced chat's usage.cost is what the generation
    endpoint and /v1/key report; a code made by the admin is redeemed by the caller; no secret is logged."""
    caplog.set_level(logging.DEBUG)
    gateway = Gateway(db, {"scripted": Price.cny("0.00275", "0.0095")}, require_keys=True,
                      limiter=MemoryRateLimiter())
    gateway.start_sync()
    app = create_app({"scripted": ScriptedProvider(words=("a", "b", "c"))}, gateway=gateway, admin_token=TOKEN)

    async def go():
        async with asgi_client(app) as c:
            await c.post("/admin/accounts", json={"name": "alice", "balance": "1"}, headers=ADMIN)
            made = (await c.post("/admin/keys", json={"account": "alice", "name": "k", "limit": "0.5"},
                                 headers=ADMIN)).json()
            codes = (await c.post("/admin/codes", json={"amount": "2", "count": 1}, headers=ADMIN)).json()["codes"]
            auth = {"Authorization": f"Bearer {made['secret']}"}
            chat = await c.post("/v1/chat/completions", headers=auth,
                                json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
            gen = await c.get(f"/v1/generation?id={chat.json()['id']}", headers=auth)
            key = await c.get("/v1/key", headers=auth)
            redeemed = await c.post("/v1/redeem", json={"code": codes[0]}, headers=auth)
            bad = [await c.get("/v1/key", headers=h) for h in ({}, {"Authorization": "Bearer sk-tg-" + "x" * 43})]
            in_url = await c.get(f"/v1/key?api_key={made['secret']}")
            await c.post(f"/admin/keys/{made['key']['name']}/revoke", headers=ADMIN)
            revoked = await c.get("/v1/key", headers=auth)
            return made["secret"], chat, gen, key, redeemed, bad, in_url, revoked

    secret, chat, gen, key, redeemed, bad, in_url, revoked = asyncio.run(go())
    cost = chat.json()["usage"]["cost"]
    assert cost == Price.cny("0.00275", "0.0095").cost(7, 3) / 10**8 == 0.00004775
    assert gen.status_code == 200 and gen.json()["data"]["total_cost"] == cost
    assert gen.json()["data"]["cost_breakdown"]["output"]["tokens"] == 3
    data = key.json()["data"]
    assert (data["label"], data["usage"], data["limit"], data["balance"]) == ("k", cost, 0.5, 1 - cost)
    assert data["limit_remaining"] == float(Decimal("0.5") - Decimal(str(cost)))
    assert redeemed.json()["data"]["credited"] == 2 and redeemed.json()["data"]["balance"] == float(
        Decimal(3) - Decimal(str(cost)))
    assert [r.status_code for r in bad] == [401, 401] and error_of(revoked, 401)["type"] == "authentication_error"
    assert error_of(in_url, 400)["param"] == "api_key" and secret not in in_url.text
    assert gateway.ledger.open_holds() == 0
    server_logs = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert server_logs and not any(secret in line for line in server_logs)  # (the test's own client logs URLs)


def test_a_key_revoked_or_expired_elsewhere_stops_at_once_although_this_process_cached_it(db):
    """The gateway caches keys for the routes that generate; the hold re-reads the key's row, so a key revoked
    (or expired) by another process on the same database - a second gateway, the CLI - is refused with 401 on
    its very next request, holds nothing, and every other route reads the key fresh."""
    gateway = Gateway(db, {"scripted": Price.cny("0.00275", "0.0095")}, require_keys=True,
                      limiter=MemoryRateLimiter())
    gateway.start_sync()
    app = create_app({"scripted": ScriptedProvider(words=("a", "b", "c"))}, gateway=gateway)
    store = AccountStore(db)
    store.create_account("alice", balance_units=100_000_000)
    secrets = {name: manage.create_key(store, "alice", name)[1] for name in ("revoked", "expired")}
    other = Database(db.url)  # another process's connections to the same database
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}

    async def go():
        out = {}
        async with asgi_client(app) as c:
            for name, secret in secrets.items():
                auth = {"Authorization": f"Bearer {secret}"}
                first = await c.post("/v1/chat/completions", headers=auth, json=body)
                assert gateway._cached_key(hash_secret(secret)) is not None  # the next chat authenticates from it
                if name == "revoked":
                    AccountStore(other).revoke_key(name)
                else:
                    with other.begin() as conn:
                        conn.execute(api_keys.update().where(api_keys.c.name == name)
                                     .values(expires_at=now() - dt.timedelta(seconds=1)))
                before = store.account("alice").balance_units
                out[name] = (first, await c.post("/v1/chat/completions", headers=auth, json=body),
                             await c.post("/v1/chat/completions", headers=auth, json={**body, "stream": True}),
                             await c.get("/v1/key", headers=auth), before, store.account("alice").balance_units)
        return out

    try:
        results = asyncio.run(go())
    finally:
        other.dispose()
    for name, (first, chat, streamed, key, before, after) in results.items():
        assert first.status_code == 200, (name, first.text)
        for r in (chat, streamed, key):
            assert error_of(r, 401)["code"] == "invalid_api_key", name
        assert error_of(chat, 401)["message"] == error_of(key, 401)["message"]  # one answer for every bad key
        assert after == before  # the refused requests held and cost nothing
    assert gateway.ledger.open_holds() == 0
