"""GET /metrics after a known set of requests: it parses with prometheus-client's own parser, the engine series
carry vLLM's names, and the counters equal what was sent: tokens the sum of the usage, spend the ledger's
captures, requests by status, model and key name, rejections by reason; no key secret anywhere in it."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections import defaultdict
from decimal import Decimal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.inprocess import asgi_client
from tests.api.served import MODEL, served_tiny
from tests.gateway.test_upstream import GOOD, Upstreams, provider
from thinkgate.api.app import create_app
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.money import to_cny, to_units

# Long enough to fill a KV block (16 tokens), so a repeat finds it in the prefix cache.
MSGS = [{"role": "user", "content": "Please tell me everything you know about the weather in Hangzhou in spring, "
                                    "and whether I should bring an umbrella on a trip next week."}]


def scrape(base: str) -> dict:
    r = httpx.get(base + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value} of every sample in a /metrics text, read by prometheus-client."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


def post(base: str, secret: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 8, **body})


def stream_usage(base: str, secret: str, **body) -> dict:
    import orjson

    usage = None
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 8, "stream": True,
                            "stream_options": {"include_usage": True}, **body}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = orjson.loads(line[6:])
                usage = chunk.get("usage") or usage
    return usage


def test_metrics_equal_usage_and_ledger(engine_factory, tmp_path):
    with served_tiny(engine_factory, tmp_path) as s:
        store, ledger = s.gateway.store, s.gateway.ledger
        alice, bob = s.key("alice", "10"), s.key("bob", "10")
        poor = s.key("poor", "0.00001")  # pays for less than the prompt: 402
        store.create_account("limited", balance_units=to_units("10"))
        limited = new_secret()
        store.create_key("limited", "limited-key", hash_secret(limited), display_prefix(limited), rpm=1)

        usages: dict[str, list[tuple[dict, int]]] = defaultdict(list)  # key name -> (usage, choices)
        for _ in range(3):
            r = post(s.base, alice)
            assert r.status_code == 200
            usages["alice-key"].append((r.json()["usage"], 1))
        r = post(s.base, alice, n=2)
        usages["alice-key"].append((r.json()["usage"], 2))
        with cf.ThreadPoolExecutor(2) as pool:  # two streams at once
            for u in pool.map(lambda _: stream_usage(s.base, bob), range(2)):
                usages["bob-key"].append((u, 1))
        assert post(s.base, "sk-tg-not-a-key").status_code == 401
        assert post(s.base, poor).status_code == 402
        r = post(s.base, limited)
        usages["limited-key"].append((r.json()["usage"], 1))
        assert post(s.base, limited).status_code == 429

        assert ledger.open_holds() == 0
        captured = [e["amount_units"] for a in store.accounts() for e in ledger.entries(a.id)
                    if e["kind"] == "capture"]
        m = scrape(s.base)
        assert not any(secret in httpx.get(s.base + "/metrics").text for secret in (alice, bob, poor, limited))

    every = [(u, k) for per in usages.values() for u, k in per]
    prompt = sum(u["prompt_tokens"] for u, _ in every)
    completion = sum(u["completion_tokens"] for u, _ in every)
    assert total(m, "vllm:prompt_tokens_total", model_name=MODEL) == prompt
    assert total(m, "vllm:generation_tokens_total", model_name=MODEL) == completion
    assert total(m, "thinkgate_tokens_total", kind="completion") == completion
    for key, per in usages.items():
        assert total(m, "thinkgate_tokens_total", key=key, kind="prompt") == sum(u["prompt_tokens"] for u, _ in per)
        spent = sum(Decimal(str(u["cost"])) for u, _ in per)
        assert total(m, "thinkgate_spend_cny_total", key=key, model=MODEL) == pytest.approx(float(spent), rel=1e-12)
    # Spend: what the ledger captured (to the precision of a float).
    assert sum(captured) > 0
    assert total(m, "thinkgate_spend_cny_total") == pytest.approx(float(to_cny(sum(captured))), rel=1e-12)

    # Requests by status, model and key name; rejections by reason.
    assert total(m, "thinkgate_requests_total", key="alice-key", status="200", model=MODEL) == 4
    assert total(m, "thinkgate_requests_total", key="bob-key", status="200") == 2
    assert total(m, "thinkgate_requests_total", key="unknown", status="401") == 1
    assert total(m, "thinkgate_requests_total", key="poor-key", status="402", model=MODEL) == 1
    assert total(m, "thinkgate_requests_total", key="limited-key", status="429") == 1
    assert total(m, "thinkgate_requests_total") == 10
    assert total(m, "thinkgate_rejections_total", key="poor-key", reason="insufficient_balance") == 1
    assert total(m, "thinkgate_rejections_total", key="limited-key", reason="rate_limit_requests") == 1
    assert total(m, "thinkgate_rejections_total") == 2

    # Engine series, under vLLM's names.
    n_requests, n_seqs = len(every), sum(k for _, k in every)
    assert total(m, "vllm:request_success_total", model_name=MODEL) == n_requests
    assert total(m, "vllm:e2e_request_latency_seconds_count", model_name=MODEL) == n_requests
    assert total(m, "vllm:time_to_first_token_seconds_count", model_name=MODEL) == n_requests
    assert total(m, "vllm:request_queue_time_seconds_count", model_name=MODEL) == n_seqs
    # One gap between each two consecutive tokens of a sequence.
    assert total(m, "vllm:inter_token_latency_seconds_count", model_name=MODEL) == completion - n_seqs
    # Every sequence looks its prompt up; the n=2 request's second choice finds what its first found.
    assert total(m, "vllm:prefix_cache_queries_total", model_name=MODEL) == sum(u["prompt_tokens"] * k
                                                                               for u, k in every)
    hits = total(m, "vllm:prefix_cache_hits_total", model_name=MODEL)
    assert hits == sum(u["prompt_tokens_details"]["cached_tokens"] * k for u, k in every) > 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total"):
        assert m[(name, (("model_name", MODEL),))] == 0


def test_open_server_counts_anonymous(engine_factory):
    with served_tiny(engine_factory) as s:
        r = httpx.post(s.base + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200
        assert httpx.post(s.base + "/v1/chat/completions", json={"model": "nope", "messages": MSGS},
                          timeout=60).status_code == 404
        m = scrape(s.base)
    usage = r.json()["usage"]
    assert total(m, "thinkgate_requests_total", key="anonymous", model=MODEL, status="200") == 1
    assert total(m, "thinkgate_requests_total", key="anonymous", model="unknown", status="404") == 1
    assert total(m, "thinkgate_tokens_total", key="anonymous", kind="completion") == usage["completion_tokens"]
    assert total(m, "vllm:generation_tokens_total", model_name=MODEL) == usage["completion_tokens"]
    assert total(m, "thinkgate_spend_cny_total") == 0


def test_example_dashboard_uses_served_names():
    """examples/grafana-dashboard.json asks only for series /metrics serves."""
    import json
    import re
    from pathlib import Path

    from thinkgate.api.metrics import Metrics

    names = set()
    for fam in Metrics({}).registry.collect():
        names |= {fam.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    dash = json.loads((Path(__file__).parents[2] / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b(?:vllm:|thinkgate_)[a-z0-9_:]+", e)}
    assert len(used) >= 15 and used <= names, used - names


def test_upstream_backends_and_their_breakers():
    """Requests each upstream backend served, and each backend's breaker as the provider reports it."""
    prov = provider(Upstreams(a=[(500, b"down")], b=[(200, GOOD)]), "a", "b")  # a always fails: b serves
    app = create_app({"up": prov})

    async def run():
        async with asgi_client(app) as http:
            codes = [(await http.post("/v1/chat/completions", json={"model": "up", "messages": MSGS})).status_code
                     for _ in range(3)]
            return codes, (await http.get("/metrics")).text

    codes, text = asyncio.run(run())
    assert codes == [200, 200, 200]
    m = samples(text)
    assert total(m, "thinkgate_upstream_requests_total", model="up", backend="b", ended_by="finished") == 3
    assert total(m, "thinkgate_upstream_requests_total", backend="a") == 0
    health = prov.health()
    assert health["a"]["state"] == "open" and health["b"]["state"] == "closed"
    for backend, h in health.items():
        assert total(m, "thinkgate_upstream_breaker_state", model="up", backend=backend, state=h["state"]) == 1
        assert total(m, "thinkgate_upstream_breaker_state", model="up", backend=backend) == 1
        assert total(m, "thinkgate_upstream_consecutive_failures", backend=backend) == h["consecutive_failures"]
