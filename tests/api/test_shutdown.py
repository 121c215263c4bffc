"""Readiness and the graceful drain: GET /health/ready names what is not ready (draining, an engine, the
database, Redis); on SIGTERM a real `thinkgate serve --auth` turns unready, refuses new connections, lets the
running streams finish up to --drain-timeout, ends the rest with an error chunk, bills every one (no hold
left open) and exits 0."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import signal
import threading
import time

import httpx
import orjson
import pytest

from tests.api.inprocess import asgi_client
from tests.conftest import ServerProcess
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter, RedisRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.providers.local import LocalProvider
from thinkgate.gateway.service import Gateway
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.db import Database
from thinkgate.storage.ledger import Ledger

MODEL = "tiny"
MSGS = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def engine(engine_factory):
    e = AsyncEngine(engine_factory("qwen3"))
    yield e
    e.shutdown()


def ready(app, *requests):
    async def go():
        async with asgi_client(app) as c:
            return [await c.get("/health/ready")] + [await c.request(m, u, **kw) for m, u, kw in requests]
    return asyncio.run(go())


def test_ready_until_draining(engine, tmp_path):
    db = fresh_database("sqlite", tmp_path)
    gateway = Gateway(db, {MODEL: Price()}, require_keys=False, limiter=MemoryRateLimiter())
    gateway.start_sync()
    app = create_app({MODEL: LocalProvider(engine, MODEL)}, gateway=gateway)
    [r] = ready(app)
    assert r.status_code == 200 and r.json() == {"status": "ready", "checks": {
        "accepting": True, f"model:{MODEL}": True, "database": True}}

    async def drain_then_ask():
        async with asgi_client(app) as c:
            app.state.ops.begin_drain()
            return (await c.get("/health/ready"), await c.get("/health"),
                    await c.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS}))

    r, live, chat = asyncio.run(drain_then_ask())
    assert r.status_code == 503 and r.json()["checks"]["accepting"] is False
    assert live.status_code == 200  # liveness: the process is fine
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "server_shutting_down"
    db.dispose()


def test_not_ready_without_redis_or_engine(engine, tmp_path):
    db = fresh_database("sqlite", tmp_path)
    limiter = RedisRateLimiter.from_url("redis://127.0.0.1:1")  # nothing listens there
    gateway = Gateway(db, {MODEL: Price()}, require_keys=False, limiter=limiter)
    gateway.start_sync()
    app = create_app({MODEL: LocalProvider(engine, MODEL)}, gateway=gateway)
    [r] = ready(app)
    assert r.status_code == 503 and r.json()["checks"] == {
        "accepting": True, f"model:{MODEL}": True, "database": True, "redis": False}
    engine.shutdown()
    [r] = ready(create_app({MODEL: LocalProvider(engine, MODEL)}))
    assert r.status_code == 503 and r.json()["checks"][f"model:{MODEL}"] is False
    db.dispose()


def test_ready_with_redis(engine, tmp_path, redis_url):
    db = fresh_database("sqlite", tmp_path)
    gateway = Gateway(db, {MODEL: Price()}, require_keys=False, limiter=RedisRateLimiter.from_url(redis_url))
    gateway.start_sync()
    [r] = ready(create_app({MODEL: LocalProvider(engine, MODEL)}, gateway=gateway))
    assert r.status_code == 200 and r.json()["checks"]["redis"] is True
    db.dispose()


# -- SIGTERM on a real server -------------------------------------------------------------------------------
GRACE_S = 10.0
SHORT, LONG = 20, 3500  # tokens: a short stream finishes well within the grace period, a long one cannot


def test_sigterm_drains_running_streams(checkpoints, tmp_path):
    db = fresh_database("sqlite", tmp_path)
    store = AccountStore(db)
    store.create_account("alice", balance_units=to_units("1000"))
    secret = new_secret()
    store.create_key("alice", "alice-key", hash_secret(secret), display_prefix(secret))
    url = db.url
    db.dispose()
    server = ServerProcess(str(checkpoints["qwen3"]), name=MODEL, extra=[
        "--auth", "--db", url, "--price-input", "1", "--price-output", "2", "--drain-timeout", str(GRACE_S),
        "--kv-cache-memory", str(64 * 2**20)])
    auth = {"Authorization": f"Bearer {secret}"}
    first_token = [threading.Event() for _ in range(4)]

    def stream(i: int, max_tokens: int) -> list[dict]:
        chunks = []
        with httpx.stream("POST", server.base + "/v1/chat/completions", headers=auth, timeout=120, json={
                "model": MODEL, "messages": MSGS, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    chunks.append({"done": True})
                elif line.startswith("data: "):
                    chunks.append(orjson.loads(line[6:]))
                    delta = chunks[-1]["choices"][0]["delta"] if chunks[-1]["choices"] else {}
                    if delta.get("reasoning") or delta.get("content"):
                        first_token[i].set()
        return chunks

    try:
        assert httpx.get(server.base + "/health/ready").status_code == 200
        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, i, n) for i, n in enumerate((SHORT, SHORT, LONG, LONG))]
            for ev in first_token:
                assert ev.wait(60)
            done = [(i, f.exception() or len(f.result())) for i, f in enumerate(futures) if f.done()]
            assert not done, done  # all four are streaming
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # the listener is closed: new connections are refused
                httpx.get(server.base + "/health", timeout=5)
            results = [f.result(timeout=60) for f in futures]
            ended = time.monotonic() - t0
        assert server.proc.wait(30) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.log.close()

    assert ended < GRACE_S + 5  # the long streams were ended at the grace period, not run to their cap
    for chunks in results:
        assert chunks[-1] == {"done": True}  # every stream ended cleanly, [DONE] last
    usages = [c[-2]["usage"] for c in results]
    for chunks, usage in zip(results[:2], usages[:2], strict=True):  # finished within the grace period
        assert not any("error" in c for c in chunks), (usages, ended)
        assert usage["completion_tokens"] == SHORT and chunks[-3]["choices"][0]["finish_reason"] == "length"
    for chunks, usage in zip(results[2:], usages[2:], strict=True):  # ended at the grace period
        errors = [c for c in chunks if "error" in c]
        assert len(errors) == 1 and errors[0]["error"]["code"] == "server_shutting_down"
        assert 0 < usage["completion_tokens"] < LONG

    # Everything billed: no open hold, one usage row per stream with the tokens its client was told.
    db = Database(url)
    ledger = Ledger(db)
    assert ledger.open_holds() == 0
    ids = [c[0]["id"] for c in results]
    rows = [ledger.generation(i) for i in ids]
    assert [r["ended_by"] for r in rows] == ["finished", "finished", "shutdown", "shutdown"]
    assert [r["completion_tokens"] for r in rows] == [u["completion_tokens"] for u in usages]
    assert all(r["cost_units"] > 0 for r in rows)
    db.dispose()
