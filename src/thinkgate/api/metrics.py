"""Prometheus metrics of one app, in a registry of its own (never the process-wide one: several apps, and
tests, live in one process).

Engine series carry vLLM's names, each labelled `model_name`, so vLLM dashboards work on thinkgate:
running and waiting sequences, KV cache usage and preemptions are read from the engine when scraped; queue
time, inter-token latency and prefix cache lookups are observed on the engine thread (`EngineTimings`);
token counters, finished requests, time to first token and end-to-end latency come from the usage records.
Gateway series are `thinkgate_*`: requests by HTTP status, model and key name (never the secret;
"anonymous" on an open server, "unknown" before a caller is known), spend in CNY and tokens by key (from the
usage records after the gateway captured the cost, so they equal the ledger), rejections by reason, and
for upstream providers the requests each backend served (by how they ended) and each backend's circuit
breaker (read when scraped).
"""

from __future__ import annotations

import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from thinkgate.gateway.providers.base import UsageRecord

# vLLM's buckets, so histograms from both servers line up in one dashboard.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
M = ("model_name",)


def finished_reason(record: UsageRecord) -> str:
    """vLLM's `finished_reason` label: stop | length | tool_calls | abort | error."""
    if record.ended_by == "finished":
        return record.finish_reason or "abort"
    return "error" if record.ended_by == "error" else "abort"  # a client gone, a timeout, a shutdown


class Metrics:
    def __init__(self, providers: dict):
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", M, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens of finished requests "
                                         "(reasoning included)", M, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason",
                                       (*M, "finished_reason"), registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", M, registry=r,
                              buckets=TTFT_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", M, registry=r,
                             buckets=LATENCY_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between a sequence's consecutive engine "
                             "outputs", M, registry=r, buckets=ITL_BUCKETS)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time a sequence waited before its first "
                                    "step", M, registry=r, buckets=LATENCY_BUCKETS)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      M, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", M,
                                   registry=r)
        g = ("model", "key")
        self.requests = Counter("thinkgate_requests", "API requests by HTTP status, model and key name",
                                (*g, "status"), registry=r)
        self.spend = Counter("thinkgate_spend_cny", "CNY captured from callers", g, registry=r)
        self.tokens = Counter("thinkgate_tokens", "Tokens billed, by kind (prompt, cached_prompt, completion, "
                              "reasoning)", (*g, "kind"), registry=r)
        self.rejections = Counter("thinkgate_rejections", "Requests refused before generating, by reason "
                                  "(rate_limit_requests|tokens|concurrency, insufficient_balance, queue_full, model_unavailable)",
                                  (*g, "reason"), registry=r)
        self.upstream_requests = Counter("thinkgate_upstream_requests", "Requests an upstream backend served, by "
                                         "how they ended (finished, error, client_disconnect, timeout, ...)",
                                         ("model", "backend", "ended_by"), registry=r)
        self._usage_children: dict[tuple[str, str], tuple] = {}  # (model, key name) -> its labelled series
        self.ready = Gauge("thinkgate_ready", "1 while the server takes new requests (0 once it drains)",
                           registry=r)
        r.register(EngineCollector(providers))
        r.register(BreakerCollector(providers))
        for model, engine in local_engines(providers):
            engine.observer = EngineTimings(self, model)

    def observe_usage(self, record: UsageRecord, key: str) -> None:
        """One finished request (its record as captured: `cost` is what the ledger took)."""
        m = record.model
        c = self._usage_children.get((m, key))
        if c is None:  # prometheus_client's labels() checks and converts on every call: ~11 per request
            c = self._usage_children[(m, key)] = (
                self.prompt_tokens.labels(m), self.generation_tokens.labels(m), self.ttft.labels(m),
                self.e2e.labels(m), self.spend.labels(m, key),
                tuple(self.tokens.labels(m, key, k) for k in ("prompt", "cached_prompt", "completion", "reasoning")))
        prompt, generation, ttft, e2e, spend, tokens = c
        prompt.inc(record.prompt_tokens)
        generation.inc(record.completion_tokens)
        self.request_success.labels(m, finished_reason(record)).inc()
        if record.time_to_first_token_s is not None:
            ttft.observe(record.time_to_first_token_s)
        e2e.observe(record.total_time_s)
        for child, n in zip(tokens, (record.prompt_tokens, record.cached_prompt_tokens, record.completion_tokens,
                                     record.reasoning_tokens), strict=True):
            child.inc(n)
        spend.inc(float(record.cost))
        if record.backend is not None:
            self.upstream_requests.labels(m, record.backend, record.ended_by).inc()


def local_engines(providers: dict):
    """(model id, AsyncEngine) of the providers that run our engine."""
    engines = sys.modules.get("thinkgate.engine.async_engine")
    if engines is None:  # no engine was ever built here (a gateway of upstreams): and torch stays unloaded
        return
    AsyncEngine = engines.AsyncEngine  # noqa: N806

    for model, p in providers.items():
        engine = getattr(p, "engine", None)
        if isinstance(engine, AsyncEngine):
            yield model, engine


class EngineCollector:
    """The engine's state when scraped (lengths and counts read across threads: a snapshot, not a lock)."""

    def __init__(self, providers: dict):
        self.providers = providers

    def collect(self):
        running = GaugeMetricFamily("vllm:num_requests_running", "Sequences in the running batch", labels=M)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Sequences waiting for a batch slot", labels=M)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)", labels=M)
        preempt = CounterMetricFamily("vllm:num_preemptions", "Sequences preempted (their KV recomputed later)",
                                      labels=M)
        for model, engine in local_engines(self.providers):
            eng = engine.engine
            sched, bm = eng.scheduler, eng.block_manager
            running.add_metric([model], len(sched.running))
            waiting.add_metric([model], len(sched.waiting))
            usage.add_metric([model], (bm.num_blocks - bm.num_free_blocks) / bm.num_blocks)
            preempt.add_metric([model], sched.num_preemptions)
        yield from (running, waiting, usage, preempt)

    def describe(self):
        return []  # collected live; nothing to check at registration


class BreakerCollector:
    """Each upstream backend's circuit breaker (providers with `health()`: {backend: {state, failures}})."""

    STATES = ("closed", "half_open", "open")

    def __init__(self, providers: dict):
        self.providers = providers

    def collect(self):
        state = GaugeMetricFamily("thinkgate_upstream_breaker_state", "1 for the breaker's current state "
                                  "(closed, half_open, open) of each upstream backend", labels=("model", "backend",
                                                                                                 "state"))
        failures = GaugeMetricFamily("thinkgate_upstream_consecutive_failures", "Failures in a row of each "
                                     "upstream backend", labels=("model", "backend"))
        for model, p in self.providers.items():
            health = getattr(p, "health", None)
            for backend, h in (health() if callable(health) else {}).items():
                for st in self.STATES:
                    state.add_metric([model, backend, st], float(h["state"] == st))
                failures.add_metric([model, backend], h["consecutive_failures"])
        yield from (state, failures)

    def describe(self):
        return []


class EngineTimings:
    """Called on the engine thread (AsyncEngine.observer): each sequence's queue time and prefix cache lookup at
    its first output, and the gaps between its outputs. Keeps a sequence only while it is live."""

    def __init__(self, metrics: Metrics, model: str):
        self.queue_time = metrics.queue_time.labels(model)
        self.itl = metrics.itl.labels(model)
        self.queries = metrics.prefix_queries.labels(model)
        self.hits = metrics.prefix_hits.labels(model)
        self.live: dict[str, list] = {}  # request id -> [sequence, time of its last output or None]

    def added(self, seq) -> None:
        for rid in [rid for rid, (s, _) in self.live.items() if s.finished]:  # ended unseen (consumer gone)
            del self.live[rid]
        self.live[seq.request_id] = [seq, None]

    def delivered(self, outputs) -> None:
        now = time.monotonic()
        for out in outputs:
            entry = self.live.get(out.request_id)
            if entry is None:
                continue
            seq, last = entry
            if last is None:
                if seq.scheduled_at is not None:
                    self.queue_time.observe(seq.scheduled_at - seq.arrival)
                    self.queries.inc(len(seq.prompt_ids))
                    self.hits.inc(seq.num_cached_prompt)
            elif out.new_token_ids:
                self.itl.observe(now - last)
            if out.finished:
                del self.live[out.request_id]
            else:
                entry[1] = now
