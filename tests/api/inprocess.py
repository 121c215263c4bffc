"""Serve an app built in the test process: a real uvicorn server on loopback in a thread (so a client can
really disconnect), or an ASGI-transport client (no socket: fast, for scripted providers)."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from tests.conftest import free_port


class InProcessServer:
    def __init__(self, app):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)

    def client(self, base_path: str = "/v1"):
        from openai import OpenAI

        return OpenAI(base_url=self.base + base_path, api_key="sk-test", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://thinkgate.test")
