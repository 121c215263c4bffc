"""Several prompts' event streams served as one request (a text completion with a list of prompts).

Each prompt's stream is a whole provider stream with `n` choices of its own; merged, choice k of prompt p
is choice p * n + k, and their usage records become one record, last, however the streams end. They share
the request's cancel signal, so a client that goes away stops all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from thinkgate.gateway.providers.base import (
    ChunkEvent,
    ErrorEvent,
    ProviderEvent,
    RequestContext,
    UsageEvent,
    UsageRecord,
)

log = logging.getLogger(__name__)
_DONE = object()


def sub_context(ctx: RequestContext, p: int) -> RequestContext:
    """Prompt p's own request id (the engine's ids must differ), with the request's clock and cancel signal."""
    return RequestContext(f"{ctx.request_id}-p{p}", created=ctx.created, arrival=ctx.arrival, cancelled=ctx.cancelled)


def _shifted(ev: ProviderEvent, offset: int) -> ProviderEvent:
    if isinstance(ev, ChunkEvent):
        return ChunkEvent([{**c, "index": c["index"] + offset} for c in ev.choices])
    if isinstance(ev, ErrorEvent) and ev.choice is not None:
        return replace(ev, choice={**ev.choice, "index": ev.choice["index"] + offset})
    return ev


def combine_records(records: list[UsageRecord], ctx: RequestContext, model: str, choices: int,
                    failed: bool) -> UsageRecord:
    first = records[0] if records else None
    ended = [r.ended_by for r in records if r.ended_by != "finished"]
    ttfts = [r.time_to_first_token_s for r in records if r.time_to_first_token_s is not None]
    return UsageRecord(
        request_id=ctx.request_id, model=model, choices=choices,
        prompt_tokens=sum(r.prompt_tokens for r in records),
        cached_prompt_tokens=sum(r.cached_prompt_tokens for r in records),
        completion_tokens=sum(r.completion_tokens for r in records),
        reasoning_tokens=sum(r.reasoning_tokens for r in records),
        finish_reason=first.finish_reason if first else None,
        native_finish_reason=first.native_finish_reason if first else None,
        ended_by=ended[0] if ended else "error" if failed else "finished",
        time_to_first_token_s=min(ttfts) if ttfts else None, total_time_s=time.monotonic() - ctx.arrival)


async def merge_prompt_streams(streams: list[AsyncIterator[ProviderEvent]], n: int, ctx: RequestContext,
                               model: str) -> AsyncIterator[ProviderEvent]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, stream: AsyncIterator[ProviderEvent]) -> None:
        try:
            async for ev in stream:
                queue.put_nowait((p, ev))
        except Exception as e:  # noqa: BLE001 - a provider bug: the merged stream reports it and still ends well
            queue.put_nowait((p, e))
        finally:
            queue.put_nowait((p, _DONE))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    records: list[UsageRecord] = []
    failed = False
    try:
        left = len(tasks)
        while left:
            p, ev = await queue.get()
            if ev is _DONE:
                left -= 1
            elif isinstance(ev, BaseException):
                log.error("request %s prompt %d failed: %r", ctx.request_id, p, ev)
                if not failed:
                    failed = True
                    ctx.cancelled.set()  # stop the other prompts; they still end with their records
                    yield ErrorEvent(f"internal error: {type(ev).__name__}")
            elif isinstance(ev, UsageEvent):
                records.append(ev.record)
            else:
                yield _shifted(ev, p * n)
        yield UsageEvent(combine_records(records, ctx, model, n * len(streams), failed))
    finally:
        for t in tasks:
            t.cancel()
