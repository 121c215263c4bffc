"""Admission control: each engine takes its batch plus a bounded waiting queue; the rest get 429 with
Retry-After at once, before the gateway holds anything; a model whose engine stopped gets 503."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf

import httpx

from tests.api.inprocess import asgi_client
from tests.api.served import MODEL, served_tiny
from tests.api.test_metrics import scrape, total
from thinkgate.api.app import create_app
from thinkgate.config import ServerConfig
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.providers.local import LocalProvider

MSGS = [{"role": "user", "content": "Tell me a long story"}]


def test_full_queue_answers_429_at_once_and_holds_nothing(engine_factory, tmp_path):
    with served_tiny(engine_factory, tmp_path, ServerConfig(max_waiting=2), max_num_seqs=2) as s:
        check_full_queue(s, s.key("alice", "100"))


def check_full_queue(s, secret: str) -> None:
    """A batch of 2 and a queue of 2; the engine held, so whatever is admitted stays in flight."""
    gateway, probe = s.gateway, s.probe

    def call(_):
        return httpx.post(s.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                          json={"model": MODEL, "messages": MSGS, "max_tokens": 12, "ignore_eos": True}, timeout=60)

    probe.open.clear()
    with cf.ThreadPoolExecutor(10) as pool:
        try:
            futures = [pool.submit(call, i) for i in range(10)]
            rejected = []
            for f in cf.as_completed(futures, timeout=30):
                rejected.append(f.result())
                if len(rejected) == 6:
                    break
            # Six answered while the engine has not moved a step: they never waited for it.
            assert all(r.status_code == 429 for r in rejected), [r.status_code for r in rejected]
            assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
                       for r in rejected)
            assert sum(f.done() for f in futures) == 6
            m = scrape(s.base)
            # The engine never holds more than its batch and queue (requests reach it between steps).
            assert 1 <= total(m, "vllm:num_requests_running", model_name=MODEL) <= 2
            assert total(m, "vllm:num_requests_waiting", model_name=MODEL) <= 2
            # Holds only for the admitted four: the rejected ones never reached the ledger.
            acct = gateway.store.account("alice")
            assert sum(e["kind"] == "hold" for e in gateway.ledger.entries(acct.id)) == 4
        finally:
            probe.open.set()
        results = [f.result(timeout=60) for f in futures]
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) == 4 and sum(r.status_code == 429 for r in results) == 6
    assert all(r.json()["usage"]["completion_tokens"] == 12 for r in ok)
    assert gateway.ledger.open_holds() == 0
    m = scrape(s.base)
    assert total(m, "thinkgate_rejections_total", reason="queue_full", key="alice-key") == 6
    # The gate is empty again: a new request is taken.
    assert call(0).status_code == 200


def test_stopped_engine_answers_503(engine_factory):
    engine = AsyncEngine(engine_factory("qwen3"))
    app = create_app({MODEL: LocalProvider(engine, MODEL)})
    engine.shutdown()

    async def post():
        async with asgi_client(app) as client:
            return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS})

    r = asyncio.run(post())
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
