"""The console's storage (migration 0003) on SQLite and PostgreSQL: sign-up makes an account and its identity
together, an email signs up once, sessions end and expire, sign-in failures leave the window, and the usage
reads the console draws from."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.gateway.dbs import BACKENDS, fresh_database
from thinkgate.storage.accounts import AccountStore, AlreadyExists, now
from thinkgate.storage.console import ConsoleStore
from thinkgate.storage.ledger import Ledger


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


def test_sign_up_identity_and_one_account_per_email(db):
    console, accounts = ConsoleStore(db), AccountStore(db)
    acct = console.sign_up("a@example.com", "a@example.com", "hash-1")
    assert accounts.account("a@example.com").id == acct.id and acct.balance_units == 0
    assert console.identity("a@example.com") == (acct.id, "hash-1")
    with pytest.raises(AlreadyExists):
        console.sign_up("other-name", "a@example.com", "hash-2")
    assert [a.name for a in accounts.accounts()] == ["a@example.com"]  # the refused sign-up left nothing
    console.set_password_hash(acct.id, "hash-3")
    assert console.identity("a@example.com") == (acct.id, "hash-3")
    assert console.identity("b@example.com") is None


def test_sessions_end_and_expire(db):
    console = ConsoleStore(db)
    acct = console.sign_up("s@example.com", "s@example.com", "h")
    console.create_session("live", acct.id, False, "csrf-1", dt.timedelta(hours=1))
    console.create_session("admin", None, True, "csrf-2", dt.timedelta(hours=1), admin_token_hash="ab" * 32)
    console.create_session("old", acct.id, False, "csrf-3", dt.timedelta(seconds=-1))
    s = console.session("live")
    assert s.account_id == acct.id and not s.is_admin and s.csrf_token == "csrf-1"
    admin = console.session("admin")
    assert admin.is_admin and admin.account_id is None and admin.admin_token_hash == "ab" * 32
    assert console.session("old") is None  # expired
    console.end_session("live")
    assert console.session("live") is None


def test_failures_are_counted_per_subject_within_the_window(db):
    console = ConsoleStore(db)
    start = now()
    console.note_failure(["email:x", "ip:1"], forget_before=start - dt.timedelta(minutes=15))
    console.note_failure(["email:x"], forget_before=start - dt.timedelta(minutes=15))
    assert len(console.failures_since("email:x", start - dt.timedelta(seconds=5))) == 2
    assert len(console.failures_since("ip:1", start - dt.timedelta(seconds=5))) == 1
    assert console.failures_since("email:x", now() + dt.timedelta(seconds=1)) == []  # outside the window
    console.note_failure(["ip:2"], forget_before=now() + dt.timedelta(seconds=1))  # forgets the older ones
    assert console.failures_since("email:x", start - dt.timedelta(seconds=5)) == []
    console.clear_failures("ip:2")
    assert console.failures_since("ip:2", start - dt.timedelta(seconds=5)) == []


def _usage(ledger: Ledger, rid: str, account_id: int, model: str, cost: int) -> None:
    ledger.record(rid, account_id, None, cost, {
        "model": model, "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 20, "reasoning_tokens": 5,
        "price_input_per_1k": 1, "price_output_per_1k": 2, "price_cached_per_1k": None, "finish_reason": "stop",
        "native_finish_reason": "stop", "ended_by": "finished", "cancelled": False, "latency_ms": 12.5,
        "ttft_ms": 3.0, "user": None, "usage_source": "engine", "backend": None})


def test_usage_reads_per_day_and_model_and_recent_requests(db):
    console, accounts, ledger = ConsoleStore(db), AccountStore(db), Ledger(db)
    a = accounts.create_account("ua")
    b = accounts.create_account("ub")
    _usage(ledger, "r1", a.id, "m1", 100)
    _usage(ledger, "r2", a.id, "m1", 50)
    _usage(ledger, "r3", a.id, "m2", 7)
    _usage(ledger, "r4", b.id, "m1", 1000)
    since = now() - dt.timedelta(days=1)
    rows = console.usage_by_day_and_model(a.id, since)
    today = now().date().isoformat()
    assert [(r["day"], r["model"], r["requests"], r["cost_units"]) for r in rows] == [
        (today, "m1", 2, 150), (today, "m2", 1, 7)]
    assert rows[0]["completion_tokens"] == 40 and rows[0]["reasoning_tokens"] == 10
    every = console.usage_by_day_and_model(None, since)
    assert sum(r["cost_units"] for r in every) == 1157
    assert console.usage_by_day_and_model(a.id, now() + dt.timedelta(minutes=1)) == []
    recent = console.recent_requests(a.id, limit=2)
    assert len(recent) == 2 and all(r["account"] == "ua" and r["key"] is None for r in recent)
    assert {r["request_id"] for r in console.recent_requests(a.id)} == {"r1", "r2", "r3"}
    assert len(console.recent_requests(None)) == 4
