"""One JSON line per API request on the `thinkgate.requests` logger: the x-request-id, key and account names,
model, tokens and cost as billed, latency, TTFT, finish reason, status and whether the client left; also for
requests refused before generating; never a key's secret in any log line."""

from __future__ import annotations

import logging
import time

import httpx
import orjson

from tests.api.served import MODEL, served_tiny
from thinkgate.gateway.money import to_cny

MSGS = [{"role": "user", "content": "Tell me about the weather"}]


def lines(caplog) -> list[dict]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "thinkgate.requests"]


def test_one_json_line_per_request(engine_factory, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="thinkgate.requests")
    with served_tiny(engine_factory, tmp_path) as s:
        secret, poor = s.key("alice", "10"), s.key("poor", "0.00001")
        auth = {"Authorization": f"Bearer {secret}"}
        url = s.base + "/v1/chat/completions"
        ok = httpx.post(url, headers={**auth, "X-Request-Id": "client-abc"}, timeout=60,
                        json={"model": MODEL, "messages": MSGS, "max_tokens": 6})
        assert ok.status_code == 200
        with httpx.stream("POST", url, headers=auth, timeout=60, json={
                "model": MODEL, "messages": MSGS, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                # the first chunk only names the role (its content is ""): leave once a token has arrived
                delta = orjson.loads(line[6:])["choices"][0]["delta"] if line.startswith("data: {") else {}
                if delta.get("reasoning") or delta.get("reasoning_content") or delta.get("content"):
                    left_id = r.headers["x-request-id"]
                    break  # the client goes away mid-stream
        assert httpx.post(url, headers={"Authorization": f"Bearer {secret}x"}, timeout=60,
                          json={"model": MODEL, "messages": MSGS}).status_code == 401
        assert httpx.post(url, headers={"Authorization": f"Bearer {poor}"}, timeout=60,
                          json={"model": MODEL, "messages": MSGS}).status_code == 402
        deadline = time.monotonic() + 30
        while len(lines(caplog)) < 4 and time.monotonic() < deadline:  # the one that left logs once settled
            time.sleep(0.05)
        time.sleep(0.2)
        logged = lines(caplog)
        row = s.gateway.ledger.generation(ok.json()["id"])

    assert len(logged) == 4
    [done] = [x for x in logged if x["status"] == 200 and not x["disconnected"]]
    [left] = [x for x in logged if x["disconnected"]]
    [unauth] = [x for x in logged if x["status"] == 401]
    [unpaid] = [x for x in logged if x["status"] == 402]
    usage = ok.json()["usage"]
    assert done["request_id"] == "client-abc" and done["id"] == ok.json()["id"]
    assert (done["key"], done["account"], done["model"], done["path"]) == ("alice-key", "alice", MODEL,
                                                                          "/v1/chat/completions")
    assert done["prompt_tokens"] == usage["prompt_tokens"] and done["completion_tokens"] == usage["completion_tokens"]
    assert done["cost"] == f"{to_cny(row['cost_units']):f}" and float(done["cost"]) == usage["cost"]
    assert done["finish_reason"] == "length" and done["ended_by"] == "finished" and not done["disconnected"]
    assert 0 < done["ttft_s"] <= done["latency_s"]

    assert left["request_id"] == left["id"] == left_id and left["ended_by"] == "client_disconnect"
    assert 0 < left["completion_tokens"] < 200 and left["key"] == "alice-key"

    assert unauth["key"] is None and unauth["error_code"] == "invalid_api_key" and unauth["id"] is None
    assert unpaid["key"] == "poor-key" and unpaid["error_code"] == "insufficient_balance"
    assert unpaid["model"] == MODEL and unpaid["completion_tokens"] is None

    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert secret not in everything and poor not in everything and secret[:-1] not in everything
