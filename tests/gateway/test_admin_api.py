"""The admin HTTP API on real databases (SQLite, PostgreSQL), in-process through the app's own error handling:
the admin token, accounts, keys (secret once), codes, usage totals and ledgers, money as exact decimal strings,
bad bodies refused naming the field."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.inprocess import asgi_client
from tests.gateway.dbs import BACKENDS, fresh_database
from thinkgate.api.admin import add_admin_routes
from thinkgate.api.app import create_app
from thinkgate.gateway import manage
from thinkgate.gateway.keys import hash_secret
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.ledger import Ledger

TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def usage_row(model: str, prompt: int, completion: int, **kw) -> dict:
    return {"model": model, "prompt_tokens": prompt, "cached_tokens": 0, "completion_tokens": completion,
            "reasoning_tokens": 0, "price_input_per_1k": 275_000, "price_output_per_1k": 950_000,
            "price_cached_per_1k": None, "finish_reason": "stop", "native_finish_reason": "eos",
            "ended_by": "finished", "cancelled": False, "latency_ms": 12.5, "ttft_ms": 3.25, "user": None, **kw}


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


def admin_app(db, token: str | None = TOKEN):
    store, ledger = AccountStore(db), Ledger(db)
    app = create_app({})
    add_admin_routes(app, store, ledger, token)
    return app, store, ledger


def call(app, *requests: tuple) -> list:
    """Send (method, path, json-or-None[, headers]) requests in order; the responses."""

    async def go():
        async with asgi_client(app) as c:
            out = []
            for method, path, body, *headers in requests:
                kw = {"json": body} if body is not None and not isinstance(body, bytes) else {"content": body}
                out.append(await c.request(method, path, headers=headers[0] if headers else ADMIN, **kw))
            return out

    return asyncio.run(go())


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_every_admin_route_requires_the_admin_token(db):
    app, _, _ = admin_app(db)
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
             {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}]
    routes = [("GET", "/admin/accounts"), ("POST", "/admin/accounts"), ("GET", "/admin/usage"),
              ("POST", "/admin/keys/k/revoke"), ("GET", "/admin/no-such-route")]
    responses = call(app, *[(m, p, b"{not json", h) for m, p in routes for h in wrong])
    for r in responses:  # the token is checked before the body is read or the route is known
        err = error_of(r, 401)
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text
    ok, unknown = call(app, ("GET", "/admin/accounts", None), ("GET", "/admin/no-such-route", None))
    assert ok.status_code == 200 and error_of(unknown, 404)["type"] == "not_found_error"


@pytest.mark.parametrize("token", [None, ""])
def test_without_a_token_the_admin_api_is_disabled(db, token):
    app, _, _ = admin_app(db, token)
    for r in call(app, ("GET", "/admin/accounts", None), ("POST", "/admin/keys", {}), ("GET", "/admin", None)):
        err = error_of(r, 404)
        assert "disabled" in err["message"] and err["code"] == "admin_disabled"


def test_accounts_create_list_show_topup_with_exact_money(db):
    app, store, _ = admin_app(db)
    created, big, dup, listed, shown, topped, missing = call(
        app,
        ("POST", "/admin/accounts", {"name": "alice", "balance": "12.50", "email": "a@example.com"}),
        # A JSON number is read from its text: 16 significant digits survive (a float would round them).
        ("POST", "/admin/accounts", {"name": "big", "balance": 12345678.12345678}),
        ("POST", "/admin/accounts", {"name": "alice"}),
        ("GET", "/admin/accounts", None),
        ("GET", "/admin/accounts/alice", None),
        ("POST", "/admin/accounts/alice/topup", {"amount": "0.00000001", "note": "gift"}),
        ("GET", "/admin/accounts/nobody", None))
    assert created.status_code == 201
    assert created.json()["balance"] == "12.5" and created.json()["email"] == "a@example.com"
    assert big.json()["balance"] == "12345678.12345678"
    assert store.account("big").balance_units == 1_234_567_812_345_678
    err = error_of(dup, 409)
    assert err["param"] == "name" and "exists" in err["message"]
    assert [(a["name"], a["balance"]) for a in listed.json()["data"]] == [("alice", "12.5"), ("big", "12345678.12345678")]
    assert shown.json()["keys"] == [] and shown.json()["usage"]["cost"] == "0"
    assert topped.status_code == 200 and topped.json()["balance"] == "12.50000001"
    assert store.account("alice").balance_units == 1_250_000_001
    assert "nobody" in error_of(missing, 404)["message"]


BAD_BODIES = [
    ("/admin/accounts", {"name": "a", "balance": "1.123456789"}, "balance", "8 decimal places"),
    ("/admin/accounts", {"name": "a", "balance": 1.123456789}, "balance", "8 decimal places"),
    ("/admin/accounts", {"name": "a", "balance": -1}, "balance", "at least 0"),
    ("/admin/accounts", {"name": "a", "balance": True}, "balance", "decimal string"),
    ("/admin/accounts", {"name": "a", "balance": [1]}, "balance", "decimal string"),
    ("/admin/accounts", {"name": "a", "balanse": "1"}, "balanse", "unknown parameter"),
    ("/admin/accounts", {"balance": "1"}, "name", "missing"),
    ("/admin/accounts", {"name": "anonymous"}, "name", "reserved"),
    ("/admin/accounts", {"name": "a", "email": "x"}, "email", "not an email"),
    ("/admin/accounts/alice/topup", {"amount": "0"}, "amount", "more than 0"),
    ("/admin/accounts/alice/topup", {}, "amount", "missing"),
    ("/admin/keys", {"account": "alice", "name": "k", "ips": ["10.0.0.1/8"]}, "ips", "host bits"),
    ("/admin/keys", {"account": "alice", "name": "k", "ips": "10.0.0.0/8,"}, "ips", "empty entry"),
    ("/admin/keys", {"account": "alice", "name": "k", "models": [1]}, "models", "list of strings"),
    ("/admin/keys", {"account": "alice", "name": "k", "expires": "2001-01-01"}, "expires", "in the past"),
    ("/admin/keys", {"account": "alice", "name": "k", "rpm": 0}, "rpm", "whole number"),
    ("/admin/keys", {"account": "alice", "name": "k", "tpm": 1.5}, "tpm", "whole number"),
    ("/admin/keys", {"account": "alice", "name": "k", "limit": "x"}, "limit", "not an amount"),
    ("/admin/keys", {"account": "nobody", "name": "k"}, "account", "no account named 'nobody'"),
    ("/admin/keys", {"account": "alice", "name": "sk-tg-" + "x" * 40}, "name", "look like an API key"),
    ("/admin/codes", {"amount": "1", "count": 0}, "count", "whole number"),
    ("/admin/codes", {"amount": "1", "count": manage.MAX_CODES + 1}, "count", "at most"),
    ("/admin/codes", {"amount": "-1", "count": 1}, "amount", "more than 0"),
    ("/admin/accounts", b'{"name": "a", "balance": NaN}', None, "not valid JSON"),
    ("/admin/accounts", b'{"name": "a",', None, "not valid JSON"),
    ("/admin/accounts", b'["a"]', None, "JSON object"),
]


def test_bad_bodies_are_refused_naming_the_field(db):
    app, store, _ = admin_app(db)
    store.create_account("alice")
    responses = call(app, *[("POST", path, body) for path, body, _, _ in BAD_BODIES])
    for r, (path, body, param, said) in zip(responses, BAD_BODIES, strict=True):
        err = error_of(r, 400)
        assert err["type"] == "invalid_request_error" and err["param"] == param, (path, body, err)
        assert said in err["message"], (path, body, err)
    assert [a.name for a in store.accounts()] == ["alice"] and store.keys() == []


def test_keys_secret_once_then_prefix_only_and_revoke(db):
    app, store, _ = admin_app(db)
    store.create_account("alice")
    store.create_account("bob")
    body = {"account": "alice", "name": "alice-ci", "models": ["m1", "m2"], "ips": ["10.0.0.0/8", "::1"],
            "limit": "0.5", "expires": "2099-01-01T08:00:00+08:00", "rpm": 60, "tpm": "10000", "concurrency": 2}
    created, dup, other, listed, only_bob, shown, revoked, again, missing, bad_filter = call(
        app,
        ("POST", "/admin/keys", body),
        ("POST", "/admin/keys", body),
        ("POST", "/admin/keys", {"account": "bob", "name": "bob-1"}),
        ("GET", "/admin/keys", None),
        ("GET", "/admin/keys?account=bob", None),
        ("GET", "/admin/keys/alice-ci", None),
        ("POST", "/admin/keys/alice-ci/revoke", None),
        ("POST", "/admin/keys/alice-ci/revoke", None),
        ("POST", "/admin/keys/nope/revoke", None),
        ("GET", "/admin/keys?account=nobody", None))
    assert created.status_code == 201
    secret = created.json()["secret"]
    key = store.key("alice-ci")
    assert secret.startswith("sk-tg-") and key.secret_hash == hash_secret(secret)
    view = created.json()["key"]
    assert view == shown.json() and view["prefix"] == key.prefix and view["status"] == "active"
    assert (view["models"], view["ips"]) == (["m1", "m2"], ["10.0.0.0/8", "::1/128"])
    assert (view["limit"], view["limit_remaining"], view["spent"]) == ("0.5", "0.5", "0")
    assert (view["rpm"], view["tpm"], view["concurrency"]) == (60, 10000, 2)
    assert view["expires_at"] == "2099-01-01T00:00:00+00:00"
    assert error_of(dup, 409)["param"] == "name" and other.status_code == 201
    for r in (listed, only_bob, shown, revoked, again):
        assert r.status_code == 200 and secret not in r.text
    assert [k["name"] for k in listed.json()["data"]] == ["alice-ci", "bob-1"]
    assert [(k["name"], k["account"]) for k in only_bob.json()["data"]] == [("bob-1", "bob")]
    assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] == again.json()["revoked_at"]
    assert store.key("alice-ci").revoked_at is not None
    assert error_of(missing, 404)["code"] == "not_found"
    assert error_of(bad_filter, 400)["param"] == "account"


def test_codes_are_returned_once_and_redeem_once(db):
    app, store, _ = admin_app(db)
    acct = store.create_account("alice")
    (made,) = call(app, ("POST", "/admin/codes", {"amount": 2.5, "count": 4, "batch": "launch"}))
    assert made.status_code == 201
    data = made.json()
    assert (data["batch"], data["amount"], data["count"], len(set(data["codes"]))) == ("launch", "2.5", 4, 4)
    assert [manage.redeem(store, acct.id, c) for c in data["codes"] * 2] == [250_000_000] * 4 + [None] * 4
    assert store.account("alice").balance_units == 1_000_000_000


def test_usage_totals_per_key_account_model_and_day_and_the_ledger(db):
    app, store, ledger = admin_app(db)
    a, b = store.create_account("alice", balance_units=10**8), store.create_account("bob", balance_units=10**8)
    ka = store.create_key("alice", "ka", "h1", "sk-tg-aaaa...")
    kb = store.create_key("bob", "kb", "h2", "sk-tg-bbbb...")
    for rid, acct, key, model, prompt, completion, cost in (("r1", a, ka, "m1", 1000, 100, 370_000),
                                                            ("r2", a, ka, "m2", 10, 5, 7),
                                                            ("r3", b, kb, "m1", 2000, 0, 550_000)):
        ledger.hold(rid, acct.id, key.id, "test", lambda avail: 1_000_000)
        ledger.settle(rid, cost, usage_row(model, prompt, completion))
    by_key, by_account, by_model, by_day, only_alice, bad_group, entries, last_two = call(
        app,
        ("GET", "/admin/usage?group=key", None),
        ("GET", "/admin/usage?group=account", None),
        ("GET", "/admin/usage?group=model", None),
        ("GET", "/admin/usage?group=day", None),
        ("GET", "/admin/usage?group=model&account=alice", None),
        ("GET", "/admin/usage?group=week", None),
        ("GET", "/admin/accounts/alice/ledger", None),
        ("GET", "/admin/accounts/alice/ledger?limit=2", None))
    rows = {r["key"]: r for r in by_key.json()["data"]}
    assert set(rows) == {"ka", "kb"} and rows["ka"]["requests"] == 2 and rows["ka"]["prompt_tokens"] == 1010
    assert (rows["ka"]["cost"], rows["ka"]["cost_number"]) == ("0.00370007", 0.00370007)
    assert [(r["account"], r["cost"]) for r in by_account.json()["data"]] == [("alice", "0.00370007"),
                                                                            ("bob", "0.0055")]
    assert [(r["model"], r["requests"], r["cost"]) for r in by_model.json()["data"]] == [("m1", 2, "0.0092"),
                                                                                       ("m2", 1, "0.00000007")]
    for r in (by_key, by_account, by_model, by_day):
        total = r.json()["total"]
        assert (total["requests"], total["completion_tokens"], total["cost"], total["cost_number"]) == \
            (3, 105, "0.00920007", 0.00920007)
        assert r.json()["currency"] == "CNY"
    assert len(by_day.json()["data"]) in (1, 2)  # one day, unless the test ran across midnight
    assert [r["model"] for r in only_alice.json()["data"]] == ["m1", "m2"]
    assert only_alice.json()["total"]["cost"] == "0.00370007"
    assert error_of(bad_group, 400)["param"] == "group"
    got = [(e["kind"], e["amount"], e["request_id"], e["key"]) for e in entries.json()["data"]]
    assert got == [("credit", "1", None, None), ("hold", "0.01", "r1", "ka"), ("capture", "0.0037", "r1", "ka"),
                   ("release", "0.0063", "r1", "ka"), ("hold", "0.01", "r2", "ka"),
                   ("capture", "0.00000007", "r2", "ka"), ("release", "0.00999993", "r2", "ka")]
    assert [e["kind"] for e in last_two.json()["data"]] == ["capture", "release"]
