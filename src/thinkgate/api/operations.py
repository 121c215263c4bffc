"""What an operator needs around the request path: `GET /metrics`, each request counted once (and logged,
see api/request_log.py) from the same usage records the gateway bills, and admission control with
per-request timeouts (api/admission.py)."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from thinkgate.api.admission import AdmissionControl, Slot
from thinkgate.api.metrics import Metrics
from thinkgate.api.request_log import RequestInfo, complete, install, key_name
from thinkgate.config import ServerConfig
from thinkgate.gateway.providers.base import PreparedRequest, RequestContext, UsageRecord

log = logging.getLogger(__name__)
REJECTED = {402, 429, 503}  # statuses whose error code is a rejection reason


class Operations:
    def __init__(self, providers: dict, gateway, config: ServerConfig):
        self.providers = providers
        self.gateway = gateway
        self.config = config
        self.metrics = Metrics(providers)
        self.metrics.ready.set(1)
        self.admission = AdmissionControl(providers, config)

    def install(self, app: FastAPI) -> None:
        """The routes, and the request log around everything (call after the app's other outer wrappers)."""
        install(app, self.finished)
        app.add_api_route("/metrics", self.metrics_endpoint, methods=["GET"], include_in_schema=False)

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
