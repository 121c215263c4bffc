"""Per-model request timeouts from the catalog (`request_timeout_s`): a model's own timeout replaces the
server's (--request-timeout), shorter or longer; a request past it ends within a second of it (an error chunk
when streaming, else a 504), is billed for the tokens it generated, and its engine holds nothing afterwards.
The providers are built from a catalog as `thinkgate serve --config` builds them, on the tiny checkpoint."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from tests.api.engine_probe import EngineProbe
from tests.api.inprocess import InProcessServer
from tests.api.test_timeouts import assert_engine_free
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.catalog import local_providers, parse_catalog
from thinkgate.config import EngineConfig, ServerConfig
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import to_units
from thinkgate.gateway.service import Gateway

SERVER_TIMEOUT_S = 2.0  # --request-timeout
SHORT_S, LONG_S = 1.0, 3.0  # the catalog's: one shorter than the server's, one longer


def catalog_data(checkpoint) -> dict:
    local = {"type": "local", "model": str(checkpoint), "dtype": "float32", "kv_cache_memory": 32 * 2**20}
    price = {"price_input_per_1k": "1", "price_output_per_1k": "2"}
    return {"models": [
        {"id": "acme/short", **price, "request_timeout_s": SHORT_S, "backend": local},
        {"id": "acme/long", **price, "request_timeout_s": LONG_S, "backend": local},
        {"id": "acme/default", **price, "backend": local},
    ]}


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    catalog = parse_catalog(catalog_data(checkpoints["qwen3"]))
    providers = local_providers(catalog, EngineConfig(device="cpu"))
    probes = {mid: EngineProbe(p.engine.engine) for mid, p in providers.items()}
    db = fresh_database("sqlite", tmp_path_factory.mktemp("gw"))
    gateway = Gateway(db, catalog.prices(True), require_keys=True, limiter=MemoryRateLimiter())
    gateway.start_sync()
    records: list = []
    app = create_app(providers, ServerConfig(request_timeout_s=SERVER_TIMEOUT_S), on_usage=records.append,
                     gateway=gateway)
    server = InProcessServer(app)
    gateway.store.create_account("alice", balance_units=to_units("100"))
    secret = new_secret()
    gateway.store.create_key("alice", "alice-key", hash_secret(secret), display_prefix(secret))
    try:
        yield server, providers, probes, records, gateway, {"Authorization": f"Bearer {secret}"}
    finally:
        server.stop()
        for p in providers.values():
            p.engine.shutdown()
        db.dispose()


@pytest.fixture
def run(served):
    server, providers, probes, records, gateway, auth = served
    for probe in probes.values():
        probe.delay_s = 0.03  # 400 tokens take ~12 s: no request finishes before its timeout
    records.clear()
    yield served
    for probe in probes.values():
        probe.reset()


def body(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Count to a thousand"}], "max_tokens": 400,
            "ignore_eos": True, **extra}


def check_billed_and_free(model, served) -> None:
    _, providers, probes, records, gateway, _ = served
    deadline = time.monotonic() + 5
    while not records and time.monotonic() < deadline:
        time.sleep(0.02)
    [record] = records
    assert record.model == model and record.ended_by == "timeout"
    row = gateway.ledger.generation(record.request_id)
    assert row["ended_by"] == "timeout" and row["completion_tokens"] == record.completion_tokens
    assert row["cost_units"] > 0 and gateway.ledger.open_holds() == 0
    assert_engine_free(providers[model].engine.engine, probes[model], record)


def test_a_short_catalog_timeout_ends_a_stream_with_an_error_chunk(run):
    server, _, _, records, _, auth = run
    t0 = time.monotonic()
    with httpx.stream("POST", server.base + "/v1/chat/completions", headers=auth, timeout=60,
                      json=body("acme/short", stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - t0
    assert SHORT_S <= elapsed < SHORT_S + 1
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    [error] = [c for c in chunks if "error" in c]
    assert error["error"]["code"] == "request_timeout" and f"{SHORT_S:g} s" in error["error"]["message"]
    assert 0 < chunks[-1]["usage"]["completion_tokens"] < 400
    check_billed_and_free("acme/short", run)
    assert records[0].completion_tokens == chunks[-1]["usage"]["completion_tokens"]


@pytest.mark.parametrize("model,limit", [("acme/short", SHORT_S), ("acme/long", LONG_S),
                                         ("acme/default", SERVER_TIMEOUT_S)])
def test_each_model_answers_504_at_its_own_timeout(run, model, limit):
    """Shorter and longer than the server's: the model's own wins; a model without one takes the server's."""
    server, _, _, _, _, auth = run
    t0 = time.monotonic()
    r = httpx.post(server.base + "/v1/chat/completions", headers=auth, json=body(model), timeout=60)
    elapsed = time.monotonic() - t0
    assert limit <= elapsed < limit + 1
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert f"{limit:g} s" in r.json()["error"]["message"]
    check_billed_and_free(model, run)


def test_a_catalog_timeout_is_a_positive_number_of_seconds(checkpoints):
    from thinkgate.catalog import CatalogError

    for bad, msg in ((0, "greater than 0"), (True, "a number of seconds"), ("60", "a number of seconds")):
        data = catalog_data(checkpoints["qwen3"])
        data["models"][1]["request_timeout_s"] = bad
        with pytest.raises(CatalogError, match=r"models\[1\] \(id 'acme/long'\): request_timeout_s: .*" + msg):
            parse_catalog(data)
