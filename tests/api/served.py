"""The tiny qwen3 model served in-process by a real uvicorn server, with the app's usage hook recording;
optionally behind the keyed gateway (on SQLite), for the endpoints' billing."""

from __future__ import annotations

import time
from contextlib import contextmanager

from tests.api.engine_probe import EngineProbe
from tests.api.inprocess import InProcessServer
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.config import ServerConfig
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.providers.local import LocalProvider
from thinkgate.gateway.service import Gateway

MODEL = "tiny"
PRICE = Price.cny("1", "2")  # CNY per 1000 tokens


class Served:
    def __init__(self, server: InProcessServer, records: list, gateway: Gateway | None, engine, probe: EngineProbe):
        self.server = server
        self.records = records
        self.gateway = gateway
        self.base = server.base
        self.engine = engine  # the LLMEngine
        self.probe = probe

    def client(self, secret: str = "sk-test"):
        from openai import OpenAI

        return OpenAI(base_url=self.base + "/v1", api_key=secret, max_retries=0, timeout=60)

    def key(self, account: str, balance: str) -> str:
        """A new key of a new account holding `balance` CNY (with the gateway)."""
        store = self.gateway.store
        store.create_account(account, balance_units=to_units(balance))
        secret = new_secret()
        store.create_key(account, account + "-key", hash_secret(secret), display_prefix(secret))
        return secret

    def record_after(self, seen: int, timeout: float = 30):
        """The one usage record that arrived after the first `seen` (waits for it; fails on none or several)."""
        deadline = time.monotonic() + timeout
        while len(self.records) == seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # a second record would come now
        assert len(self.records) == seen + 1, self.records[seen:]
        return self.records[seen]


@contextmanager
def served_tiny(engine_factory, gateway_dir=None, config: ServerConfig | None = None, **engine_opts):
    """`gateway_dir`: a folder for the gateway's SQLite database; keys are then required. `engine_opts` go to
    the engine's config; its steps can be held or slowed through `probe`."""
    eng = engine_factory("qwen3", **engine_opts)
    probe = EngineProbe(eng)
    async_engine = AsyncEngine(eng)
    records: list = []
    gateway = db = None
    if gateway_dir is not None:
        db = fresh_database("sqlite", gateway_dir)
        gateway = Gateway(db, {MODEL: PRICE}, require_keys=True, limiter=MemoryRateLimiter())
        gateway.start_sync()
    app = create_app({MODEL: LocalProvider(async_engine, MODEL)}, config, on_usage=records.append, gateway=gateway)
    server = InProcessServer(app)
    try:
        yield Served(server, records, gateway, eng, probe)
    finally:
        probe.reset()
        server.stop()
        async_engine.shutdown()
        if db is not None:
            db.dispose()
