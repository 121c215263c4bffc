"""Server-sent events: `data:` frames, keep-alive comments while the next chunk is not ready, errors after
the headers went out travel in the stream, and `[DONE]` last (chat and text completions). The Responses API
frames each event as `event: <type>` + `data:` and sends no `[DONE]` (`typed_events=True`).

One task per stream reads the chunks into a queue, and one timer per stream, re-armed only when it fires,
puts a keep-alive there when nothing was sent for `keepalive_s`. (A task and a timed wait per chunk cost
more than the rest of a chunk's way through the API, measured in benchmarks/upstream_overhead.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import anyio
import orjson

from thinkgate.errors import ThinkgateError, error_body

log = logging.getLogger(__name__)
_END = object()
_KEEPALIVE = object()


async def sse(stream: AsyncIterator[dict], keepalive_s: float, typed_events: bool = False) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    sent_at = loop.time()  # when the client last got a frame
    timer: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal timer
        idle = loop.time() - sent_at
        if idle >= keepalive_s:
            if queue.empty():
                queue.put_nowait(_KEEPALIVE)
            idle = 0.0
        timer = loop.call_later(keepalive_s - idle, tick)

    reader = asyncio.ensure_future(_read(stream, queue))
    timer = loop.call_later(keepalive_s, tick)
    try:
        while True:
            item = await queue.get()
            sent_at = loop.time()
            if item is _KEEPALIVE:
                yield b": keep-alive\n\n"
                continue
            if item is _END:
                break
            if isinstance(item, ThinkgateError):
                yield b"data: " + orjson.dumps(item.to_dict()) + b"\n\n"
                break
            if isinstance(item, BaseException):  # after the headers went out, errors travel in the stream
                log.error("stream failed", exc_info=item)
                yield b"data: " + orjson.dumps(error_body(f"internal error: {type(item).__name__}")) + b"\n\n"
                break
            event = b"event: " + item["type"].encode() + b"\n" if typed_events else b""
            yield event + b"data: " + orjson.dumps(item) + b"\n\n"
        if not typed_events:
            yield b"data: [DONE]\n\n"
    finally:
        timer.cancel()
        await _close(reader, stream)


async def _read(stream: AsyncIterator[dict], queue: asyncio.Queue) -> None:
    try:
        async for chunk in stream:
            queue.put_nowait(chunk)
    except Exception as e:  # noqa: BLE001 - shown to the client as an error frame (and logged there)
        queue.put_nowait(e)
    else:
        queue.put_nowait(_END)


async def _close(reader: asyncio.Future, stream) -> None:
    """Stop a half-consumed chunk stream: cancel its reader, wait for it, then close the generator (closing a
    generator whose step is still running fails). Shielded, because this runs while a client disconnect is
    cancelling the request. The provider's own run is not stopped here: the response that owns it tells it
    the client left (see api/provider_run.py)."""
    with anyio.CancelScope(shield=True):
        if not reader.done():
            reader.cancel()
        try:
            await reader
        except BaseException:  # noqa: BLE001 - cancelled, finished or failed: all we need is that it stopped
            pass
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
