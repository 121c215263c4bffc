"""Server-sent events: `data:` frames, keep-alive comments while the next chunk is not ready, errors after
the headers went out travel in the stream, and `[DONE]` last (chat and text completions). The Responses API
frames each event as `event: <type>` + `data:` and sends no `[DONE]` (`typed_events=True`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import anyio
import orjson

from thinkgate.errors import ThinkgateError, error_body

log = logging.getLogger(__name__)


async def sse(stream: AsyncIterator[dict], keepalive_s: float, typed_events: bool = False) -> AsyncIterator[bytes]:
    it = stream.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                break
            except ThinkgateError as e:
                yield b"data: " + orjson.dumps(e.to_dict()) + b"\n\n"
                break
            except Exception as e:  # after the headers went out, errors travel in the stream
                log.exception("stream failed")
                yield b"data: " + orjson.dumps(error_body(f"internal error: {type(e).__name__}")) + b"\n\n"
                break
            event = b"event: " + chunk["type"].encode() + b"\n" if typed_events else b""
            yield event + b"data: " + orjson.dumps(chunk) + b"\n\n"
            nxt = asyncio.ensure_future(it.__anext__())
        if not typed_events:
            yield b"data: [DONE]\n\n"
    finally:
        await _close(nxt, it)


async def _close(pending: asyncio.Future, stream) -> None:
    """Stop a half-consumed chunk stream: cancel the pending step, wait for it, then close the generator
    (closing a generator whose step is still running fails). Shielded, because this runs while a client
    disconnect is cancelling the request. The provider's own run is not stopped here: the response that
    owns it tells it the client left (see api/provider_run.py)."""
    with anyio.CancelScope(shield=True):
        if not pending.done():
            pending.cancel()
        try:
            await pending
        except BaseException:  # noqa: BLE001 - cancelled, finished or failed: all we need is that it stopped
            pass
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
