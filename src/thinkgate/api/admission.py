"""Admission control, per-request timeouts, and the running requests a graceful drain waits for.

Each engine takes at most its batch (max_num_seqs sequences) plus `max_waiting` more: a request that would
go past that is refused at once with 429 and Retry-After, before the gateway holds anything or the engine
queues anything, so no queue grows without bound (a request alone on an idle engine is always taken, however
many choices it asks for). A model that cannot be served at all (its engine stopped, the server draining)
answers 503.

A `Slot` is one admitted request, from admission until its provider stream has ended (its usage record
settled): it holds the request's place in its engine's gate, and can end the request early (past its
timeout, or at the end of a drain), which stops the provider like a client that leaves, adds an error event
(a 504 or 503 when nothing was sent yet, else an error chunk) and marks the record `ended_by` "timeout" or
"shutdown"; the tokens generated until then are billed as usual. The timeout is the model's own when its
provider carries one (`request_timeout_s`, from the catalog), else the server's (--request-timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from thinkgate.api.metrics import local_engines
from thinkgate.config import ServerConfig
from thinkgate.errors import RateLimited, ServiceUnavailable
from thinkgate.gateway.providers.base import (
    ErrorEvent,
    PreparedRequest,
    ProviderEvent,
    RequestContext,
    UsageEvent,
)

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Ending:
    reason: str  # the record's ended_by
    error: ErrorEvent


def timed_out(limit_s: float) -> Ending:
    return Ending("timeout", ErrorEvent(f"the request ran past its timeout of {limit_s:g} s; it was stopped and "
                                        "billed for what it generated", code="request_timeout", status=504))


SHUTDOWN = Ending("shutdown", ErrorEvent("the server is shutting down: the request was stopped and billed for what "
                                         "it generated", code="server_shutting_down", status=503))


class Gate:
    def __init__(self, capacity: int):
        self.capacity = capacity  # sequences in flight: the batch plus the waiting queue
        self.in_flight = 0


class Slot:
    def __init__(self, control: AdmissionControl, gate: Gate | None, n: int, ctx: RequestContext,
                 timeout_s: float | None = None):
        self.control = control
        self.timeout_s = timeout_s
        self.gate = gate
        self.n = n
        self.ctx = ctx
        self.ending: Ending | None = None
        self.released = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def end(self, ending: Ending) -> None:
        """Stop the request now, unless it is over or its client already left."""
        if self.ending is None and not self.ctx.cancelled.is_set() and not self.released.is_set():
            self.ending = ending
            self.ctx.cancelled.set()

    async def watch(self, stream: AsyncIterator[ProviderEvent]) -> AsyncIterator[ProviderEvent]:
        """The provider's events, with the early ending's error before the record; the slot is released when the
        stream is over (after the record was settled)."""
        limit = self.timeout_s
        if limit is not None:
            delay = max(0.0, limit - (time.monotonic() - self.ctx.arrival))
            self._timer = asyncio.get_running_loop().call_later(delay, self.end, timed_out(limit))
        try:
            async for ev in stream:
                if isinstance(ev, UsageEvent) and self.ending is not None and \
                        ev.record.ended_by == "client_disconnect":  # the provider stopped as we asked
                    yield self.ending.error
                    ev = UsageEvent(replace(ev.record, ended_by=self.ending.reason))
                yield ev
        finally:
            self.release()

    def release(self) -> None:
        if self.released.is_set():
            return
        self.released.set()
        if self._timer is not None:
            self._timer.cancel()
        if self.gate is not None:
            self.gate.in_flight -= self.n
        self.control.slots.discard(self)


class AdmissionControl:
    def __init__(self, providers: dict, config: ServerConfig):
        self.gates = {engine: Gate(engine.engine.scheduler.max_num_seqs + config.max_waiting)
                      for _, engine in local_engines(providers)}
        self.timeout_s = config.request_timeout_s
        self.slots: set[Slot] = set()
        self.draining = False

    def admit(self, provider, prepared: PreparedRequest, ctx: RequestContext) -> Slot:
        """A slot for the request, or ServiceUnavailable (503) / RateLimited (429, queue_full)."""
        if self.draining:
            raise ServiceUnavailable("the server is shutting down: send the request to another instance",
                                     code="server_shutting_down")
        engine = getattr(provider, "engine", None)
        gate = self.gates.get(engine)
        if gate is not None and not engine.alive():
            raise ServiceUnavailable(f"the model {provider.model_id!r} cannot be served now: its engine stopped",
                                     code="model_unavailable")
        n = prepared.params.n
        if gate is not None:
            if gate.in_flight and gate.in_flight + n > gate.capacity:
                raise RateLimited(f"the model {provider.model_id!r} is at capacity (its waiting queue is full): "
                                  f"retry after {RETRY_AFTER_S} s", code="queue_full",
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
            gate.in_flight += n
        slot = Slot(self, gate, n, ctx, getattr(provider, "request_timeout_s", None) or self.timeout_s)
        self.slots.add(slot)
        return slot

    def end_all(self, ending: Ending) -> int:
        slots = list(self.slots)
        for s in slots:
            s.end(ending)
        return len(slots)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until every admitted request has ended (True), or the timeout (False)."""
        deadline = time.monotonic() + timeout_s
        while self.slots:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True
