"""The console of an open server (`thinkgate serve` on loopback without --auth and without an admin token, the
default): the catalog and the playground work without signing in (runs metered under the anonymous
account, like any request there), and there is no admin sign-in."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "tiny-thinker"


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    db = tmp_path_factory.mktemp("console-open") / "console.db"
    saved = os.environ.pop("THINKGATE_ADMIN_TOKEN", None)  # no admin token, whatever the caller's environment
    try:
        s = ServerProcess(str(checkpoints["qwen3"]), name=MODEL, extra=[
            "--kv-cache-memory", str(64 * 2**20), "--max-model-len", "512", "--db", f"sqlite:///{db}"])
    finally:
        if saved is not None:
            os.environ["THINKGATE_ADMIN_TOKEN"] = saved
    yield s
    s.stop()


def test_open_server_playground_needs_no_sign_in_and_admin_is_off(server):
    c = httpx.Client(base_url=server.base, timeout=60, headers={"Accept-Language": "en-US,en;q=0.9"})
    page = c.get("/console/playground").text
    assert 'id="playground-form"' in page and 'name="key"' not in page  # no key to choose
    assert f'data-model="{MODEL}"' in c.get("/").text
    r = c.post("/console/api/playground", json={"request": {"model": MODEL, "max_tokens": 6,
                                                            "messages": [{"role": "user", "content": "hi"}]}})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert "The admin view is disabled" in c.get("/console/signin").text
    off = c.post("/console/api/admin-signin", json={"token": "anything"})
    assert off.status_code == 404 and off.json()["error"]["code"] == "admin_disabled"
    assert c.get("/console/admin", follow_redirects=False).status_code == 303  # to sign in: no session
    assert c.get("/console/models/no-such-model").status_code == 404
