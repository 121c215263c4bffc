"""From a validated request to a running provider stream, through the gateway: who calls, may they use the
model, prepare, admit (rate limits, the hold), then a ProviderRun whose usage record is settled (captured)
and handed to the app's usage hook. Every endpoint that generates (chat, responses, completions) starts here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fastapi import Request

from thinkgate.api.provider_run import ProviderRun, UsageHook
from thinkgate.api.request_log import current_request
from thinkgate.errors import ModelNotFound, ProviderError
from thinkgate.gateway.providers.base import ChatProvider, PreparedRequest, RequestContext, UsageRecord
from thinkgate.gateway.service import Caller, Gateway
from thinkgate.ids import random_hex
from thinkgate.params import ChatParams

if TYPE_CHECKING:
    from thinkgate.api.operations import Operations

log = logging.getLogger(__name__)
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
        ctx = RequestContext(id_prefix + random_hex())
        slot = self.ops.admit(provider, prepared, ctx) if self.ops is not None else None  # 429/503, nothing held
        admission = None
        early: _Run | None = None
        if gw is not None:
            try:
                permit = await gw.acquire(caller)
                # An upstream request can start before the hold is placed (its round trip overlaps the ledger's),
                # when the hold will almost surely grant the whole request; nothing reaches the client, and
                # nothing is billed, until the hold is confirmed. The hold waits until the request has left:
                # placed at once, its work (a thread holding the GIL on SQLite) delayed the request's sending.
                if getattr(provider, "starts_early", False) and gw.likely_holds_in_full(caller, price, prepared):
                    early = self._run(provider, prepared, ctx, slot, caller, info)
                    try:
                        await ctx.sent.wait()
                    except BaseException:  # the client left: no hold was placed; the permit goes back
                        await gw.release_permit(permit)
                        raise
                admission = await gw.hold(caller, permit, ctx.request_id, params.model, price, prepared,
                                          params.request.user)
            except BaseException:
                if early is not None:
                    early.discard()
                elif slot is not None:
                    slot.release()
                raise
            if early is not None and admission.prepared is not prepared:  # the hold granted less: a new run
                early.discard()
                early, ctx = None, replace(ctx, cancelled=asyncio.Event())
                try:
                    slot = self.ops.admit(provider, admission.prepared, ctx) if self.ops is not None else None
                except BaseException:
                    await gw.release(admission)
                    raise
            prepared = admission.prepared
        started = early or self._run(provider, prepared, ctx, slot, caller, info)
        started.confirm(admission)
        if info is not None:
            info.run_started = True  # it finishes when the record is settled
        early_error = await started.run.first_error()
        if early_error is not None:  # nothing was streamed yet: answer with the provider's status
            started.run.abandon()
            raise ProviderError(early_error.message, early_error.status, early_error.type, early_error.code,
                                early_error.headers)
        headers = {**(admission.headers if admission is not None else {}), "x-request-id": ctx.request_id}
        return Started(started.run, ctx, provider, prepared, headers)

    def _run(self, provider: ChatProvider, prepared: PreparedRequest, ctx: RequestContext, slot,
             caller: Caller | None, info) -> _Run:
        return _Run(self, provider.stream(prepared, ctx), ctx, slot, caller, info)


_DISCARDED = object()


class _Run:
    """A provider run whose usage record is settled against the admission `confirm` gives it: one started
    before its hold was known waits for it, and one discarded (the hold refused or granted less) is stopped
    and its record dropped: the client never saw it and it is billed nowhere."""

    def __init__(self, dispatcher: Dispatcher, stream, ctx: RequestContext, slot, caller: Caller | None, info):
        self.d, self.caller, self.info = dispatcher, caller, info
        self.admission: asyncio.Future = asyncio.get_running_loop().create_future()
        self.run = ProviderRun(slot.watch(stream) if slot is not None else stream, ctx, self._settle_then_report)

    def confirm(self, admission) -> None:
        self.admission.set_result(admission)

    def discard(self) -> None:
        if not self.admission.done():
            self.admission.set_result(_DISCARDED)
        self.run.abandon()

    async def _settle_then_report(self, record: UsageRecord) -> UsageRecord:
        admission = await self.admission
        if admission is _DISCARDED:
            log.debug("request %s: a run started before its hold was discarded (%d tokens)", record.request_id,
                      record.completion_tokens)
            return record
        try:
            if admission is not None:
                record = await self.d.gateway.settle(admission, record)
        finally:
            if self.d.ops is not None:
                self.d.ops.settled(self.info, self.caller, record)
        result = self.d.on_usage(record)
        if inspect.isawaitable(result):
            await result
        return record
