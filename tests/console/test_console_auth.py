"""Console sign-in rules on a real database, without a server: an admin session ends when the admin token
changes or the admin view is turned off, a customer's session is never an admin's, passwords are argon2id
hashes, and the sign-in rate limit answers 429 with the wait until the oldest failure leaves the window."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import pytest
from starlette.requests import Request

from tests.gateway.dbs import fresh_database
from thinkgate.console.auth import (
    COOKIE,
    FAILURE_WINDOW,
    MAX_FAILURES_PER_EMAIL,
    MAX_SIGNUPS_PER_IP,
    Auth,
    hash_password,
    same_host,
    token_hash,
    verify_password,
)
from thinkgate.errors import RateLimited
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.console import ConsoleStore


@pytest.fixture
def stores(tmp_path):
    db = fresh_database("sqlite", tmp_path)
    yield ConsoleStore(db), AccountStore(db)
    db.dispose()


def _request(cookie: str) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/console", "query_string": b"",
                    "headers": [(b"cookie", f"{COOKIE}={cookie}".encode())]})


def test_an_admin_session_is_bound_to_the_admin_token(stores):
    console, accounts = stores
    digest = hashlib.sha256(b"token-1").hexdigest()
    console.create_session(token_hash("adm"), None, True, "c", dt.timedelta(hours=1), admin_token_hash=digest)
    acct = console.sign_up("c@example.com", "c@example.com", "h")
    console.create_session(token_hash("cus"), acct.id, False, "c", dt.timedelta(hours=1))

    def viewer(token: str | None, cookie: str):
        return asyncio.run(Auth(console, accounts, token).viewer(_request(cookie)))

    assert viewer("token-1", "adm").is_admin
    assert viewer("token-2", "adm").session is None  # rotated token: signed out
    assert viewer(None, "adm").session is None  # admin view off
    customer = viewer("token-1", "cus")
    assert not customer.is_admin and customer.account.name == "c@example.com"
    assert viewer("token-1", "made-up").session is None


def test_passwords_are_argon2id_and_checked():
    hashed = asyncio.run(hash_password("correct horse"))
    assert hashed.startswith("$argon2id$") and "correct horse" not in hashed
    assert asyncio.run(verify_password(hashed, "correct horse"))
    assert not asyncio.run(verify_password(hashed, "wrong horse"))
    assert not asyncio.run(verify_password(None, "correct horse"))  # an unknown email
    assert not asyncio.run(verify_password("not-a-hash", "correct horse"))


def test_the_rate_limit_waits_for_the_oldest_failure_to_leave_the_window(stores):
    console, accounts = stores
    auth = Auth(console, accounts, None)
    subjects = ["email:r@example.com", "ip:10.0.0.1"]
    for _ in range(MAX_FAILURES_PER_EMAIL - 1):
        asyncio.run(auth.note_failure(subjects))
    asyncio.run(auth.check_rate(subjects))  # one short of the limit: allowed
    asyncio.run(auth.note_failure(subjects))
    with pytest.raises(RateLimited) as e:
        asyncio.run(auth.check_rate(subjects))
    wait = int(e.value.headers["Retry-After"])
    assert 0 < wait <= FAILURE_WINDOW.total_seconds() + 1
    asyncio.run(auth.check_rate(["email:other@example.com", "ip:10.0.0.1"]))  # 5 of 20 for the address
    console.clear_failures(subjects[0])
    asyncio.run(auth.check_rate(subjects))


def test_sign_ups_per_address_are_limited(stores):
    auth = Auth(*stores, None)
    subject = ["signup:ip:10.0.0.2"]
    for _ in range(MAX_SIGNUPS_PER_IP):
        asyncio.run(auth.check_rate(subject))
        asyncio.run(auth.note_failure(subject))
    with pytest.raises(RateLimited):
        asyncio.run(auth.check_rate(subject))
    asyncio.run(auth.check_rate(["signup:ip:10.0.0.3"]))  # another address


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://localhost:8080", "localhost:8080", True),
    ("http://localhost:8080", "localhost", True),  # a proxy that forwards the host name only
    ("https://api.example.com", "api.example.com:443", True),
    ("http://localhost:9999", "localhost:8080", False),
    ("https://evil.example", "localhost:8080", False),
    ("null", "localhost:8080", False),  # an opaque origin (a sandboxed frame, a file)
])
def test_an_origin_is_this_server_only_when_host_and_port_agree(origin, host, same):
    assert same_host(origin, host) is same
