"""One request's provider stream, run apart from the HTTP response that shows it.

The provider's stream is consumed by a task of its own, not by the response: a client that goes away
mid-stream, before the first token, or before the response even started cannot close the stream early
and lose its usage record. The response reads events from a queue; when it ends for any reason it calls
`abandon()`, which tells the provider to stop (a no-op once the stream is done); the provider then ends
its stream with the record of what was generated, and the record goes to the usage hook exactly once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse

from thinkgate.eager import eager_task
from thinkgate.gateway.providers.base import (
    ErrorEvent,
    ProviderEvent,
    RequestContext,
    UsageEvent,
    UsageRecord,
)

log = logging.getLogger(__name__)
# Called once per request with its record; may return the record priced (cost set), which is then what the
# client sees in `usage`.
UsageHook = Callable[[UsageRecord], Awaitable[UsageRecord | None] | UsageRecord | None]
_END = object()
# What a run yields when its response asked for a keep-alive (ProviderRun.keepalive) and nothing else was
# waiting: the converters between the run and the SSE framing pass it on as it is.
KEEPALIVE = object()
_running: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones to tasks


def log_usage(record: UsageRecord) -> None:
    """The hook until the gateway's ledger takes it: the record at debug level."""
    log.debug("usage %s", record)


class ProviderRun:
    """Iterate it for the provider's events (the UsageEvent included, after the hook has seen it)."""

    def __init__(self, stream: AsyncIterator[ProviderEvent], ctx: RequestContext, on_usage: UsageHook):
        self.ctx = ctx
        self.on_usage = on_usage
        self.record: UsageRecord | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._peeked = None
        self.error: ErrorEvent | None = None  # the first error the provider reported
        # Started eagerly: the provider's first step (an upstream request's sending) runs now, in the caller's
        # step, not after every request already queued on the loop (thinkgate/eager.py).
        self._task = eager_task(self._consume(stream))
        _running.add(self._task)
        self._task.add_done_callback(_running.discard)

    async def _consume(self, stream: AsyncIterator[ProviderEvent]) -> None:
        try:
            async for ev in stream:
                self.ctx.sent.set()
                if isinstance(ev, UsageEvent):
                    ev = UsageEvent(await self._report(ev.record))
                elif isinstance(ev, ErrorEvent) and self.error is None:
                    self.error = ev
                self._queue.put_nowait(ev)
        except Exception as e:  # a provider bug: the response shows it as a server error
            log.exception("provider stream of %s failed", self.ctx.request_id)
            self._queue.put_nowait(e)
        finally:
            self.ctx.sent.set()
            if self.record is None:
                log.error("request %s ended without a usage record", self.ctx.request_id)
            self._queue.put_nowait(_END)

    async def _report(self, record: UsageRecord) -> UsageRecord:
        if self.record is not None:
            raise RuntimeError(f"a second usage record for {record.request_id}")
        self.record = record
        try:
            result = self.on_usage(record)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            log.exception("the usage hook failed for %s", record.request_id)
            return record
        if result is not None:
            self.record = result
        return self.record

    def keepalive(self) -> None:
        """Have the iteration yield KEEPALIVE now, unless an event is already waiting. The SSE framing calls it
        when the client has had nothing for a while: the stream is read in the response's own task, without a
        reader task (and its hop through the event loop per chunk) just to interleave keep-alives."""
        if self._queue.empty():
            self._queue.put_nowait(KEEPALIVE)

    def abandon(self) -> None:
        """The response is over (the client went away, or it finished): stop generating if still running."""
        if not self._task.done():
            self.ctx.cancelled.set()

    def __aiter__(self):
        return self

    async def first_error(self) -> ErrorEvent | None:
        """Wait for the first event; the error it is, if it is one (a provider that failed before its first
        chunk, e.g. every upstream down: the API answers with the error's status instead of a stream)."""
        while self._peeked is None or self._peeked is KEEPALIVE:
            self._peeked = await self._queue.get()
        return self._peeked if isinstance(self._peeked, ErrorEvent) else None

    async def __anext__(self) -> ProviderEvent:
        if self._peeked is not None:
            ev, self._peeked = self._peeked, None
        else:
            ev = await self._queue.get()
        if ev is _END:
            self._queue.put_nowait(_END)  # stay exhausted
            raise StopAsyncIteration
        if isinstance(ev, BaseException):
            raise ev
        return ev


class RunStreamingResponse(StreamingResponse):
    """A streaming response that abandons its provider run however it ends (finished, client gone, or
    never started because the client left before the headers)."""

    def __init__(self, content, run: ProviderRun, **kw):
        super().__init__(content, **kw)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            if scope.get("type") == "http":
                await self._stream_until_disconnect(receive, send)
            else:
                await super().__call__(scope, receive, send)
        finally:
            self.run.abandon()

    async def _stream_until_disconnect(self, receive, send) -> None:
        """Starlette's streaming, with its watch for the client's disconnect done by one plain task: for servers
        of ASGI spec < 2.4 (uvicorn's is 2.3) Starlette runs it in an anyio task group, ~0.13 ms of CPU a
        response on these cores against ~0.01 ms for the streaming itself."""
        task = asyncio.current_task()
        streaming, gone = True, False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if streaming:  # the task is suspended inside stream_response: the cancellation lands there
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # ours, not the server's: the response just ends, as Starlette's does
        finally:
            streaming = False
            watcher.cancel()
        if self.background is not None:
            await self.background()
