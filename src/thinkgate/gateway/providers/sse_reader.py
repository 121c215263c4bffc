"""The JSON objects of an upstream's server-sent event stream, read from the body's bytes.

httpx's `aiter_lines` puts each network read through four async generators (raw bytes, decoded bytes, text,
lines) and decodes the text twice (to str, then JSON); splitting the bytes here and handing each `data:` line's
bytes to orjson does the same work once. This is every token's path through the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson

DRAIN_S = 0.25  # after [DONE]: how long the rest of the body may take before the connection is dropped
IGNORED = (b":", b"event:", b"id:", b"retry:")  # comments and the fields a chat stream does not use


async def sse_objects(resp: httpx.Response) -> AsyncIterator[dict]:
    """Each `data:` line's JSON object, until `[DONE]` or the body's end. Raises ValueError on a line that is
    not SSE or data that is not a JSON object."""
    parts = _body(resp)
    pending = b""  # an unfinished line, carried into the next read
    async for part in parts:
        lines, pending = split_lines(pending, part)
        for line in lines:
            obj = _object(line)
            if obj is _DONE:
                await _drain(parts)
                return
            if obj is not None:
                yield obj
    if pending:
        obj = _object(pending.rstrip(b"\r"))
        if obj is not None and obj is not _DONE:
            yield obj


def split_lines(pending: bytes, part: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of pending + part and what is left over. A line ends with \\n, \\r\\n or \\r (the
    SSE grammar); a trailing \\r stays pending, since the \\n that may follow it is in the next read."""
    data = pending + part if pending else part
    if b"\r" in data:
        cr = data.endswith(b"\r")
        data = (data[:-1] if cr else data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = data.split(b"\n")
        return lines, rest + b"\r" if cr else rest
    *lines, rest = data.split(b"\n")
    return lines, rest


_DONE = object()


def _object(line: bytes):
    if not line or line.startswith(IGNORED):
        return None
    if not line.startswith(b"data:"):
        raise ValueError(f"not an SSE line: {line[:60]!r}")
    data = line[5:].strip()
    if data == b"[DONE]":
        return _DONE
    obj = orjson.loads(data)  # orjson.JSONDecodeError is a ValueError
    if not isinstance(obj, dict):
        raise ValueError("an SSE event that is not a JSON object")
    return obj


def _body(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The body as it arrives: raw when it is not content-encoded (one generator less per read), decoded
    when it is or when httpx has read it already (a response built from bytes)."""
    encoding = resp.headers.get("content-encoding", "identity").strip().lower()
    raw = encoding in ("", "identity") and not resp.is_stream_consumed
    return resp.aiter_raw() if raw else resp.aiter_bytes()


async def _drain(parts: AsyncIterator[bytes]) -> None:
    """Read the body to its end after `[DONE]` (the chunked terminator is normally right behind it): httpcore
    closes a connection whose response was closed unread, so without this every request opened a new TCP
    connection to the upstream. An upstream that keeps the body open past DRAIN_S just loses the connection."""
    try:
        async with asyncio.timeout(DRAIN_S):
            async for _ in parts:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass
