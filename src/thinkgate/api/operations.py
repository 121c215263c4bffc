"""What an operator needs around the request path: `GET /metrics`, each request counted once (and logged,
see api/request_log.py) from the same usage records the gateway bills, admission control with per-request
timeouts (api/admission.py), readiness (`GET /health/ready`) and the graceful drain.

The drain (on SIGTERM, see api/lifecycle.py, or when the app's lifespan ends): readiness turns false and new
requests get 503 at once; the running ones may finish for `drain_timeout_s`; the rest are then ended like a
timeout (an error chunk, or a 503 when nothing was sent), and the drain waits until every record is settled
(billed), so the process can exit with nothing held."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from thinkgate.api.admission import SHUTDOWN, AdmissionControl, Slot
from thinkgate.api.metrics import Metrics, local_engines
from thinkgate.api.request_log import RequestInfo, complete, install, key_name
from thinkgate.config import ServerConfig
from thinkgate.gateway.providers.base import PreparedRequest, RequestContext, UsageRecord

log = logging.getLogger(__name__)
request_log = logging.getLogger("thinkgate.requests")  # one JSON line per API request
REJECTED = {402, 429, 503}  # statuses whose error code is a rejection reason
SETTLE_S = 10.0  # after the grace period: how long ended requests may take to settle
PROBE_S = 2.0  # a readiness check that takes longer fails


class Operations:
    def __init__(self, providers: dict, gateway, config: ServerConfig):
        self.providers = providers
        self.gateway = gateway
        self.config = config
        self.metrics = Metrics(providers)
        self.metrics.ready.set(1)
        self.admission = AdmissionControl(providers, config)
        self._drain: asyncio.Task | None = None

    def install(self, app: FastAPI) -> None:
        """The routes, and the request log around everything (call after the app's other outer wrappers)."""
        install(app, self.finished)
        app.state.ops = self  # for the server that drains it (api/lifecycle.py)
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"], include_in_schema=False)
        app.add_api_route("/health/ready", self.ready_endpoint, methods=["GET"])

    async def metrics_endpoint(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- one request ----------------------------------------------------------------------------------
    def admit(self, provider, prepared: PreparedRequest, ctx: RequestContext) -> Slot:
        """Room in the model's engine (429 queue_full) and a model that can be served (503), before the
        gateway holds anything."""
        return self.admission.admit(provider, prepared, ctx)

    def settled(self, info: RequestInfo | None, caller, record: UsageRecord) -> None:
        """A request's usage record, captured: the counters of what it used and cost."""
        try:
            self.metrics.observe_usage(record, key_name(caller))
        except Exception:  # metrics must never cost a request its record
            log.exception("metrics of %s failed", record.request_id)
        if info is not None:
            info.record = record
            complete(info, self.finished)

    def finished(self, info: RequestInfo) -> None:
        """Once per API request, when its response has ended and its record (if any) is in."""
        model, key = info.model or "unknown", info.key or "unknown"
        self.metrics.requests.labels(model, key, str(info.status)).inc()
        if info.status in REJECTED and info.error_code:
            self.metrics.rejections.labels(model, key, info.error_code).inc()
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(orjson.dumps(log_line(info)).decode())

    # -- readiness and the drain -----------------------------------------------------------------------
    async def ready_endpoint(self) -> JSONResponse:
        """200 when the server takes requests: not draining, every engine running, the database and Redis
        answering; else 503. Each check is named in the body (never a URL or a secret)."""
        checks = {"accepting": not self.admission.draining}
        for model, engine in local_engines(self.providers):
            checks[f"model:{model}"] = engine.alive()
        if self.gateway is not None:
            checks["database"] = await _passes(asyncio.to_thread(self.gateway.db.ping))
            ping = getattr(self.gateway.limiter, "ping", None)
            if ping is not None:
                checks["redis"] = await _passes(ping())
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    def stop_accepting(self) -> None:
        """Readiness false, new requests 503 (plain assignments: safe in a signal handler)."""
        self.admission.draining = True
        self.metrics.ready.set(0)

    def begin_drain(self) -> None:
        """Start the drain (idempotent; on the event loop)."""
        self.stop_accepting()
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._run_drain())

    async def _run_drain(self) -> None:
        grace = self.config.drain_timeout_s
        log.info("draining: %d requests running, %g s to finish", len(self.admission.slots), grace)
        if await self.admission.wait_idle(grace):
            return
        ended = self.admission.end_all(SHUTDOWN)
        log.warning("drain: the grace period ended; %d requests stopped, billed for what they generated", ended)
        if not await self.admission.wait_idle(SETTLE_S):
            log.error("drain: %d requests did not settle", len(self.admission.slots))

    async def shutdown(self) -> None:
        """Drain (if no signal started it), and wait until every request is over and settled."""
        self.begin_drain()
        await self._drain


def log_line(info: RequestInfo) -> dict:
    """A request as its log line: who (key and account names, never the secret), what, and how it ended."""
    r = info.record
    return {
        "request_id": info.response_request_id or info.client_request_id,  # the x-request-id the client got
        "id": r.request_id if r is not None else None, "method": info.method, "path": info.path,
        "status": info.status, "error_code": info.error_code, "key": info.key, "account": info.account,
        "model": info.model,
        "prompt_tokens": r.prompt_tokens if r else None, "cached_tokens": r.cached_prompt_tokens if r else None,
        "completion_tokens": r.completion_tokens if r else None, "reasoning_tokens": r.reasoning_tokens if r else None,
        "cost": f"{r.cost:f}" if r else None,  # CNY as captured, a decimal string
        "latency_s": round(r.total_time_s if r else time.monotonic() - info.started, 6),
        "ttft_s": round(r.time_to_first_token_s, 6) if r and r.time_to_first_token_s is not None else None,
        "finish_reason": r.finish_reason if r else None, "ended_by": r.ended_by if r else None,
        "disconnected": (r is not None and r.ended_by == "client_disconnect") or info.status == 499,
    }


async def _passes(check) -> bool:
    try:
        await asyncio.wait_for(check, PROBE_S)
        return True
    except Exception as e:  # noqa: BLE001 - any failure is "not ready"; details stay out of the answer
        log.warning("readiness check failed: %s", type(e).__name__)
        return False
