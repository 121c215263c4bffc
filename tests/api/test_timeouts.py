"""Per-request timeout: a request past it ends within a second of it (streaming: an error chunk, then usage and
[DONE]; otherwise a 504), is billed for the tokens it generated (its record ended_by "timeout"), and the
engine holds nothing for it afterwards."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest

from tests.api.served import MODEL, served_tiny
from thinkgate.config import ServerConfig

TIMEOUT_S = 1.5
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Count to a thousand"}], "max_tokens": 400,
        "ignore_eos": True}


@pytest.fixture
def served(engine_factory, tmp_path):
    with served_tiny(engine_factory, tmp_path, ServerConfig(request_timeout_s=TIMEOUT_S)) as s:
        s.probe.delay_s = 0.03  # ~12 s for the whole cap: it cannot finish before the timeout
        secret = s.key("alice", "100")
        yield s.server, s.engine, s.probe, s.records, s.gateway, {"Authorization": f"Bearer {secret}"}


def assert_engine_free(eng, probe, record) -> None:
    assert eng.seqs == {} and not eng.scheduler.running and not eng.scheduler.waiting
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_count)
    bm.check_integrity([])
    # Billed for exactly what the engine generated before it stopped.
    assert probe.generated(record.request_id) == record.completion_tokens > 0


def test_stream_past_its_timeout_ends_with_an_error_chunk(served):
    server, eng, probe, records, gateway, auth = served
    t0 = time.monotonic()
    chunks = []
    with httpx.stream("POST", server.base + "/v1/chat/completions", headers=auth, timeout=60,
                      json={**BODY, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    errors = [c for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "request_timeout"
    usage = chunks[-1]["usage"]
    assert chunks.index(errors[0]) == len(chunks) - 2  # the error, then the usage chunk
    assert 0 < usage["completion_tokens"] < BODY["max_tokens"]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert any(d.get("content") or d.get("reasoning") for d in deltas)  # it streamed until then

    [record] = records
    assert record.ended_by == "timeout" and record.completion_tokens == usage["completion_tokens"]
    row = gateway.ledger.generation(record.request_id)
    assert row["ended_by"] == "timeout" and row["completion_tokens"] == usage["completion_tokens"]
    assert row["cost_units"] > 0 and gateway.ledger.open_holds() == 0
    assert_engine_free(eng, probe, record)


def test_non_streaming_past_its_timeout_answers_504(served):
    server, eng, probe, records, gateway, auth = served
    t0 = time.monotonic()
    r = httpx.post(server.base + "/v1/chat/completions", headers=auth, json=BODY, timeout=60)
    elapsed = time.monotonic() - t0
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    [record] = records
    assert record.ended_by == "timeout"
    row = gateway.ledger.generation(record.request_id)
    assert row["ended_by"] == "timeout" and row["cost_units"] > 0 and gateway.ledger.open_holds() == 0
    assert_engine_free(eng, probe, record)


def test_a_request_within_its_timeout_is_untouched(served):
    server, eng, probe, records, gateway, auth = served
    r = httpx.post(server.base + "/v1/chat/completions", headers=auth, json={**BODY, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    time.sleep(TIMEOUT_S + 0.3)  # its timer was cancelled with it: nothing ends late
    [record] = records
    assert record.ended_by == "finished"
