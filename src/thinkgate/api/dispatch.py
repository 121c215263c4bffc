"""From a validated request to a running provider stream, through the gateway: who calls, may they use the
model, prepare, admit (rate limits, the hold), then a ProviderRun whose usage record is settled (captured)
and handed to the app's usage hook. Every endpoint that generates (chat, responses, completions) starts here.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from thinkgate.api.provider_run import ProviderRun, UsageHook
from thinkgate.api.request_log import current_request
from thinkgate.errors import ModelNotFound, ProviderError
from thinkgate.gateway.providers.base import ChatProvider, PreparedRequest, RequestContext, UsageRecord
from thinkgate.gateway.service import Caller, Gateway
from thinkgate.params import ChatParams

if TYPE_CHECKING:
    from thinkgate.api.operations import Operations

# The routes whose requests all go on to `start`, i.e. to the gateway's hold, which re-reads the key's row: only
# they may authenticate from the gateway's per-process key cache (see gateway/service.py).
GENERATING = ("/chat/completions", "/completions", "/responses")


@dataclass
class Started:
    run: ProviderRun
    ctx: RequestContext
    provider: ChatProvider
    prepared: PreparedRequest
    headers: dict[str, str]  # for the response (x-ratelimit-*, x-request-id)


class Dispatcher:
    def __init__(self, providers: dict[str, ChatProvider], gateway: Gateway | None, on_usage: UsageHook,
                 ops: Operations | None = None):
        self.providers = providers
        self.gateway = gateway
        self.on_usage = on_usage
        self.ops = ops  # metrics and the request log

    async def caller(self, request: Request) -> Caller | None:
        """Authenticate (401/403) before anything else is read; None when the app runs without a gateway."""
        caller = None
        if self.gateway is not None:
            ip = request.client.host if request.client is not None else None
            route = getattr(request.scope.get("route"), "path", "")
            caller = await self.gateway.authenticate(request.headers.get("authorization"),
                                                     dict(request.query_params), ip,
                                                     cached=request.method == "POST" and route.endswith(GENERATING))
        if (info := current_request()) is not None:
            info.note_caller(caller)
        return caller

    def provider_for(self, model: str) -> ChatProvider:
        p = self.providers.get(model)
        if p is None:
            raise ModelNotFound(f"the model {model!r} does not exist; available: {', '.join(self.providers)}",
                                param="model", code="model_not_found")
        return p

    async def start(self, caller: Caller | None, params: ChatParams, id_prefix: str = "chatcmpl-",
                    prepare=None) -> Started:
        """`prepare(provider)` overrides how the provider prepares the request (e.g. a raw text prompt)."""
        provider = self.provider_for(params.model)
        if (info := current_request()) is not None:
            info.model = provider.model_id
        gw = self.gateway
        price = gw.authorize_model(caller, params.model) if gw is not None else None
        prepared = await (prepare(provider) if prepare is not None else provider.prepare(params))
        ctx = RequestContext(id_prefix + uuid.uuid4().hex)
        slot = self.ops.admit(provider, prepared, ctx) if self.ops is not None else None  # 429/503, nothing held
        admission = None
        if gw is not None:
            try:
                admission = await gw.admit(caller, ctx.request_id, params.model, price, prepared, params.request.user)
            except BaseException:
                if slot is not None:
                    slot.release()
                raise
            prepared = admission.prepared

        async def settle_then_report(record: UsageRecord) -> UsageRecord:
            try:
                if admission is not None:
                    record = await gw.settle(admission, record)
            finally:
                if self.ops is not None:
                    self.ops.settled(info, caller, record)
            result = self.on_usage(record)
            if inspect.isawaitable(result):
                await result
            return record

        stream = provider.stream(prepared, ctx)
        run = ProviderRun(slot.watch(stream) if slot is not None else stream, ctx, settle_then_report)
        if info is not None:
            info.run_started = True  # it finishes when the record is settled
        early = await run.first_error()
        if early is not None:  # nothing was streamed yet: answer with the provider's status
            run.abandon()
            raise ProviderError(early.message, early.status, early.type, early.code, early.headers)
        headers = {**(admission.headers if admission is not None else {}), "x-request-id": ctx.request_id}
        return Started(run, ctx, provider, prepared, headers)
