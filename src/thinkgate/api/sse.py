"""Server-sent events: `data:` frames, keep-alive comments while the next chunk is not ready, errors after
the headers went out travel in the stream, and `[DONE]` last (chat and text completions). The Responses API
frames each event as `event: <type>` + `data:` and sends no `[DONE]` (`typed_events=True`).

The chunks are read in the response's own task. For keep-alives one timer per stream, re-armed only when it
fires, asks the stream's source (its ProviderRun) for a KEEPALIVE marker when nothing was sent for
`keepalive_s`. (A reader task feeding a queue cost each chunk a hop through the event loop, ~0.3-0.5 ms more
per token at 32 streams; a task or a timed wait per chunk cost more still: benchmarks/upstream_overhead.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import orjson

from thinkgate.api.provider_run import KEEPALIVE
from thinkgate.errors import ThinkgateError, error_body

log = logging.getLogger(__name__)


async def sse(stream: AsyncIterator, keepalive_s: float, typed_events: bool = False,
              keepalive: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """`stream`'s dicts as frames. `keepalive()` makes the stream yield KEEPALIVE soon (ProviderRun.keepalive);
    without it no keep-alive is sent."""
    loop = asyncio.get_running_loop()
    sent_at = loop.time()  # when the client last got a frame
    timer: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal timer
        idle = loop.time() - sent_at
        if idle >= keepalive_s:
            keepalive()
            idle = 0.0
        timer = loop.call_later(keepalive_s - idle, tick)

    if keepalive is not None:
        timer = loop.call_later(keepalive_s, tick)
    try:
        async for item in stream:
            sent_at = loop.time()
            if item is KEEPALIVE:
                yield b": keep-alive\n\n"
                continue
            event = b"event: " + item["type"].encode() + b"\n" if typed_events else b""
            yield event + b"data: " + orjson.dumps(item) + b"\n\n"
    except ThinkgateError as e:
        yield b"data: " + orjson.dumps(e.to_dict()) + b"\n\n"
    except Exception as e:  # after the headers went out, errors travel in the stream
        log.error("stream failed", exc_info=e)
        yield b"data: " + orjson.dumps(error_body(f"internal error: {type(e).__name__}")) + b"\n\n"
    finally:
        if timer is not None:
            timer.cancel()
    if not typed_events:
        yield b"data: [DONE]\n\n"
