"""The tiny qwen3 model served in-process by a real uvicorn server, with the app's usage hook recording."""

from __future__ import annotations

import time
from contextlib import contextmanager

from tests.api.inprocess import InProcessServer
from thinkgate.api.app import create_app
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.providers.local import LocalProvider

MODEL = "tiny"


class Served:
    def __init__(self, server: InProcessServer, records: list):
        self.server = server
        self.records = records
        self.base = server.base

    def client(self):
        return self.server.client()

    def record_after(self, seen: int, timeout: float = 30):
        """The one usage record that arrived after the first `seen` (waits for it; fails on none or several)."""
        deadline = time.monotonic() + timeout
        while len(self.records) == seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # a second record would come now
        assert len(self.records) == seen + 1, self.records[seen:]
        return self.records[seen]


@contextmanager
def served_tiny(engine_factory):
    async_engine = AsyncEngine(engine_factory("qwen3"))
    records: list = []
    server = InProcessServer(create_app({MODEL: LocalProvider(async_engine, MODEL)}, on_usage=records.append))
    try:
        yield Served(server, records)
    finally:
        server.stop()
        async_engine.shutdown()
