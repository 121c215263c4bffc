"""What survives a gateway process: `kill -9` during 50 running requests leaves holds the restart's reaper
releases, with the books still balanced; two gateway processes sharing Redis enforce one rate limit."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.api.inprocess import InProcessServer
from tests.api.scripted_provider import ScriptedProvider
from tests.conftest import ServerProcess
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import RedisRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.service import Gateway
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.ledger import Ledger

MSGS = [{"role": "user", "content": "Tell me about the weather"}]


def make_key(store: AccountStore, account: str, balance: str, **kw) -> str:
    store.create_account(account, balance_units=to_units(balance))
    secret = new_secret()
    store.create_key(account, f"{account}-key", hash_secret(secret), display_prefix(secret), **kw)
    return secret


def assert_books(store: AccountStore, ledger: Ledger) -> None:
    assert ledger.open_holds() == 0
    for acct in store.accounts():
        sums: dict[str, int] = {}
        for e in ledger.entries(acct.id):
            sums[e["kind"]] = sums.get(e["kind"], 0) + e["amount_units"]
        assert acct.balance_units == sums.get("credit", 0) - sums.get("capture", 0)
        assert sums.get("hold", 0) == sums.get("capture", 0) + sums.get("release", 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_kill_9_during_50_requests_then_restart(kind, tmp_path, checkpoints):
    db = fresh_database(kind, tmp_path)
    store, ledger = AccountStore(db), Ledger(db)
    secret = make_key(store, "a", "1000")
    args = ["--auth", "--db", db.url, "--price-input", "1", "--price-output", "2", "--max-num-seqs", "64",
            "--kv-cache-memory", str(128 * 2**20)]
    server = ServerProcess(str(checkpoints["qwen3"]), extra=args)
    body = {"model": server.model_id, "messages": MSGS, "max_tokens": 3000, "ignore_eos": True, "stream": True}

    def stream() -> None:
        try:
            with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {secret}"}) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # the server died under it

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(50)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while ledger.open_holds() < 50:
        assert time.monotonic() < deadline, f"only {ledger.open_holds()} requests running"
        time.sleep(0.1)
    server.proc.kill()  # SIGKILL: no shutdown code runs
    server.proc.wait()
    server.log.close()
    for t in threads:
        t.join(30)
    assert ledger.open_holds() > 0  # left open by the dead process
    restarted = ServerProcess(str(checkpoints["qwen3"]), extra=args)
    try:
        assert ledger.open_holds() == 0  # the reaper ran before the server answered /health
        assert_books(store, ledger)
        r = httpx.post(restarted.base + "/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {secret}"},
                       json={"model": restarted.model_id, "messages": MSGS, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["cost"] > 0
        assert_books(store, ledger)
    finally:
        restarted.stop()
        db.dispose()


def test_two_gateway_processes_sharing_redis_enforce_one_rpm(tmp_path, redis_url):
    db = fresh_database("sqlite", tmp_path)
    store = AccountStore(db)
    secret = make_key(store, "a", "10", rpm=5)
    servers = []
    for _ in range(2):
        provider = ScriptedProvider()
        limiter = RedisRateLimiter.from_url(redis_url, prefix=f"thinkgate:test:{tmp_path.name}:")
        gateway = Gateway(db, {provider.model_id: Price()}, require_keys=True, limiter=limiter)
        gateway.start_sync()
        servers.append(InProcessServer(create_app({provider.model_id: provider}, gateway=gateway)))
    try:
        codes = [httpx.post(servers[i % 2].base + "/v1/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {secret}"},
                            json={"model": "scripted", "messages": MSGS}).status_code for i in range(12)]
        assert codes.count(200) == 5 and codes.count(429) == 7, codes
        assert codes[:5] == [200] * 5  # both processes served, then both refused
    finally:
        for s in servers:
            s.stop()
        db.dispose()
