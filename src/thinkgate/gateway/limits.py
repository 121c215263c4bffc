"""Per-key rate limits: requests per minute (RPM), tokens per minute (TPM) and requests in flight.

Window: a **sliding window log** of `window_s` seconds (60 by default; tests pass a shorter one). Both
limiters implement the same rules, the in-process one with deques, the Redis one with sorted sets:

- A request is admitted while fewer than `rpm` requests were admitted in the last `window_s` seconds; it is
  counted (with its admission time) when admitted. Refused requests count for nothing.
- Tokens (prompt + completion) are counted when the request is released, with the release time, since only
  then are they known. A request is admitted while the tokens counted in the last `window_s` seconds are
  below `tpm`; so the window may overshoot by the tokens of the requests in flight, never more.
- `concurrency` slots: a request holds one from `acquire` to `release`.
- An entry counted at time t is in the window while now < t + window_s.

Headers (OpenAI's names, only for the limits that are set): `x-ratelimit-limit-{requests,tokens}`,
`x-ratelimit-remaining-{requests,tokens}` (after this request is counted) and `x-ratelimit-reset-{requests,
tokens}`: the time until `remaining` next grows (the window's oldest entry leaves it; when the limit is spent,
until enough entries leave that a request is admitted again), written as OpenAI does ("250ms", "12.5s",
"1m0s"). `LimitExceeded.retry_after_s` is that wait for the spent limit rounded up to whole seconds (the
longest when RPM and TPM are both spent), at least 1; a refusal for concurrency alone says 1 s, since a slot
frees when some request ends.

Redis (several gateway processes share the counters): every check-and-count runs as one Lua script on the
server's clock (TIME), so it is atomic and processes with skewed clocks agree. Keys are
`<prefix>{<key id>}:req|tok|toksum|slots` (the key's database id, never its secret) and expire one window
(or one slot TTL) after their last write. A concurrency slot is a sorted-set member whose score is its
deadline; the process holding it pushes the deadline `slot_ttl_s` (30 s) ahead every `slot_ttl_s / 3`
seconds while the request runs, so a slot whose holder died (or whose event loop stalled for longer than
`slot_ttl_s`) is dropped by the next acquire at most `slot_ttl_s` after its last refresh. Processes sharing
one Redis must use the same `window_s` and `slot_ttl_s` (the defaults).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from thinkgate.ids import random_hex

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 60.0
DEFAULT_SLOT_TTL_S = 30.0


@dataclass(frozen=True)
class KeyLimits:
    rpm: int | None = None  # requests per minute (per window)
    tpm: int | None = None  # tokens (prompt + completion) per minute (per window)
    concurrency: int | None = None  # requests in flight

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "concurrency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None (unlimited), got {value!r}")


_LIMIT_NAMES = {1: "requests", 2: "tokens", 3: "concurrency"}
_LIMIT_WORDS = {"requests": "requests per minute", "tokens": "tokens per minute",
                "concurrency": "concurrent requests"}


class LimitExceeded(Exception):
    """A key's limit is spent: HTTP 429 with `Retry-After: retry_after_s` and `headers`."""

    def __init__(self, limit: str, retry_after_s: int, headers: dict[str, str], limit_value: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.headers = headers
        super().__init__(f"Rate limit reached for {_LIMIT_WORDS[limit]} (limit {limit_value}). "
                         f"Please retry after {retry_after_s} s.")


@dataclass(eq=False)
class Permit:
    """One admitted request: release it exactly once (further releases do nothing)."""

    key_id: str
    limits: KeyLimits
    headers: dict[str, str]  # x-ratelimit-* to send on the successful response
    id: str = field(default_factory=random_hex)
    released: bool = False


class RateLimiter(Protocol):
    async def acquire(self, key_id: str, limits: KeyLimits) -> Permit:
        """Count the request against RPM and take a concurrency slot, atomically; raise LimitExceeded (taking
        nothing) if RPM is spent, the TPM window is already spent, or no slot is free."""
        ...

    async def release(self, permit: Permit, tokens: int) -> None:
        """Free the slot (once; later calls do nothing) and add the request's tokens to the TPM window."""
        ...

    async def aclose(self) -> None: ...


def format_duration(ms: float) -> str:
    """A wait as OpenAI's headers write it: "0s", "250ms", "12.5s", "1m0s"."""
    ms = max(0, math.ceil(ms))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def _headers(limits: KeyLimits, nreq: int, req_reset_ms: float, ntok: int, tok_reset_ms: float) -> dict[str, str]:
    h: dict[str, str] = {}
    if limits.rpm is not None:
        h["x-ratelimit-limit-requests"] = str(limits.rpm)
        h["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - nreq))
        h["x-ratelimit-reset-requests"] = format_duration(req_reset_ms)
    if limits.tpm is not None:
        h["x-ratelimit-limit-tokens"] = str(limits.tpm)
        h["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - ntok))
        h["x-ratelimit-reset-tokens"] = format_duration(tok_reset_ms)
    return h


def _exceeded(code: int, wait_ms: float, limits: KeyLimits, headers: dict[str, str]) -> LimitExceeded:
    name = _LIMIT_NAMES[code]
    value = {"requests": limits.rpm, "tokens": limits.tpm, "concurrency": limits.concurrency}[name]
    return LimitExceeded(name, max(1, math.ceil(wait_ms / 1000)), headers, value)


def _check_key_id(key_id: str) -> None:
    if not isinstance(key_id, str) or not key_id:
        raise ValueError("rate limits are kept per key database id: a non-empty string")
    if key_id.startswith("sk-"):
        raise ValueError("rate limits are kept per key database id, never per key secret")


def _check_tokens(tokens: int) -> None:
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a whole number >= 0, got {tokens!r}")


@dataclass
class _KeyState:
    requests: deque[float] = field(default_factory=deque)  # admission times (ms)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (release time ms, tokens)
    token_sum: int = 0
    slots: set[str] = field(default_factory=set)


class MemoryRateLimiter:
    """In-process limits (the default, for one gateway process). asyncio-safe: `acquire` and `release` check and
    update the counters without awaiting in between, so concurrent tasks of one event loop never interleave
    there."""

    def __init__(self, *, window_s: float = DEFAULT_WINDOW_S):
        self._window_ms = window_s * 1000
        self._states: dict[str, _KeyState] = {}

    async def acquire(self, key_id: str, limits: KeyLimits) -> Permit:
        _check_key_id(key_id)
        now = time.monotonic() * 1000
        window = self._window_ms
        st = self._states.setdefault(key_id, _KeyState())
        failed, wait = 0, 0.0
        nreq, req_reset, ntok, tok_reset = 0, 0.0, 0, 0.0
        if limits.rpm is not None:
            while st.requests and st.requests[0] <= now - window:
                st.requests.popleft()
            nreq = len(st.requests)
            if nreq:
                req_reset = st.requests[max(0, nreq - limits.rpm)] + window - now
            if nreq >= limits.rpm:
                failed, wait = 1, req_reset
        if limits.tpm is not None:
            while st.tokens and st.tokens[0][0] <= now - window:
                st.token_sum -= st.tokens.popleft()[1]
            ntok = st.token_sum
            if st.tokens and ntok < limits.tpm:
                tok_reset = st.tokens[0][0] + window - now
            elif st.tokens:
                left = ntok
                for t, n in st.tokens:
                    left -= n
                    if left < limits.tpm:
                        tok_reset = t + window - now
                        break
                failed = failed or 2
                wait = max(wait, tok_reset)
        if limits.concurrency is not None and len(st.slots) >= limits.concurrency:
            failed = failed or 3
            wait = max(wait, 1000.0)
        if failed:
            raise _exceeded(failed, wait, limits, _headers(limits, nreq, req_reset, ntok, tok_reset))
        permit_id = random_hex()
        if limits.rpm is not None:
            st.requests.append(now)
            nreq += 1
            req_reset = st.requests[0] + window - now
        if limits.concurrency is not None:
            st.slots.add(permit_id)
        return Permit(key_id, limits, _headers(limits, nreq, req_reset, ntok, tok_reset), id=permit_id)

    async def release(self, permit: Permit, tokens: int) -> None:
        _check_tokens(tokens)
        if permit.released:
            return
        permit.released = True
        st = self._states.get(permit.key_id)
        if st is None:
            return
        st.slots.discard(permit.id)
        if permit.limits.tpm is not None and tokens > 0:
            st.tokens.append((time.monotonic() * 1000, tokens))
            st.token_sum += tokens

    async def aclose(self) -> None:
        self._states.clear()


# KEYS: 1 requests log (zset id -> admission ms), 2 token log (zset "id:tokens" -> release ms), 3 the token
# log's sum, 4 slots (zset id -> deadline ms). ARGV: window ms, rpm, tpm, concurrency (-1: unlimited), permit
# id, slot ttl ms. Returns {code (0 admitted, 1 requests, 2 tokens, 3 concurrency), wait ms, requests counted,
# requests reset ms, tokens counted, tokens reset ms}; the same rules as MemoryRateLimiter.acquire.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local rpm, tpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cutoff = now - window
local failed, wait = 0, 0
local nreq, req_reset, ntok, tok_reset = 0, 0, 0, 0
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  nreq = redis.call('ZCARD', KEYS[1])
  if nreq > 0 then
    local i = math.max(0, nreq - rpm)
    local e = redis.call('ZRANGE', KEYS[1], i, i, 'WITHSCORES')
    req_reset = tonumber(e[2]) + window - now
  end
  if nreq >= rpm then
    failed = 1
    wait = req_reset
  end
end
if tpm >= 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do gone = gone + tonumber(string.match(m, '(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
    redis.call('DECRBY', KEYS[3], gone)
  end
  if redis.call('ZCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[3])
  else
    ntok = tonumber(redis.call('GET', KEYS[3]) or '0')
    if ntok < tpm then
      local e = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      tok_reset = tonumber(e[2]) + window - now
    else
      local left = ntok
      local e = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
      for i = 1, #e, 2 do
        left = left - tonumber(string.match(e[i], '(%d+)$'))
        if left < tpm then
          tok_reset = tonumber(e[i + 1]) + window - now
          break
        end
      end
      if failed == 0 then failed = 2 end
      if tok_reset > wait then wait = tok_reset end
    end
  end
end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= conc then
    if failed == 0 then failed = 3 end
    if wait < 1000 then wait = 1000 end
  end
end
if failed > 0 then
  return {failed, wait, nreq, req_reset, ntok, tok_reset}
end
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[1], window)
  nreq = nreq + 1
  local e = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  req_reset = tonumber(e[2]) + window - now
end
if conc >= 0 then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[6]))
end
return {0, 0, nreq, req_reset, ntok, tok_reset}
"""

# KEYS: 1 token log, 2 its sum, 3 slots. ARGV: window ms, tokens (0: count none), permit id, free a slot (1/0).
_RELEASE_LUA = """
if ARGV[4] == '1' then redis.call('ZREM', KEYS[3], ARGV[3]) end
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) end
  redis.call('ZADD', KEYS[1], now, ARGV[3] .. ':' .. ARGV[2])
  redis.call('INCRBY', KEYS[2], tokens)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 0
"""

# KEYS: slots. ARGV: slot ttl ms, permit id. Pushes a held slot's deadline ahead (never re-creates a freed one).
_REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""


class RedisRateLimiter:
    """Limits shared by every gateway process that uses the same Redis (see the module docstring). Use one
    instance per event loop; `aclose()` stops its slot refresher (and closes the client if it made it)."""

    def __init__(self, client, *, prefix: str = "thinkgate:rl:", window_s: float = DEFAULT_WINDOW_S,
                 slot_ttl_s: float = DEFAULT_SLOT_TTL_S, owns_client: bool = False):
        self._redis = client
        self._prefix = prefix
        self._window_ms = max(1, round(window_s * 1000))
        self._slot_ttl_ms = max(1, round(slot_ttl_s * 1000))
        self._owns_client = owns_client
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._refresh = client.register_script(_REFRESH_LUA)
        self._held: dict[str, str] = {}  # permit id -> its slots key, refreshed while held
        self._refresher: asyncio.Task | None = None

    @classmethod
    def from_url(cls, url: str, *, max_connections: int = 64, **kw) -> RedisRateLimiter:
        """A limiter with its own client. Its pool makes a request wait (up to 10 s) for a free connection
        rather than fail, as redis-py's default pool does past its size."""
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=10)
        return cls(redis.asyncio.Redis.from_pool(pool), owns_client=True, **kw)

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self._prefix}{{{key_id}}}:"
        return [base + "req", base + "tok", base + "toksum", base + "slots"]

    async def acquire(self, key_id: str, limits: KeyLimits) -> Permit:
        _check_key_id(key_id)
        keys = self._keys(key_id)
        permit_id = random_hex()
        args = [self._window_ms, _arg(limits.rpm), _arg(limits.tpm), _arg(limits.concurrency), permit_id,
                self._slot_ttl_ms]
        code, wait, nreq, req_reset, ntok, tok_reset = await self._acquire(keys=keys, args=args)
        headers = _headers(limits, nreq, req_reset, ntok, tok_reset)
        if code:
            raise _exceeded(code, wait, limits, headers)
        if limits.concurrency is not None:
            self._held[permit_id] = keys[3]
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.create_task(self._refresh_slots())
        return Permit(key_id, limits, headers, id=permit_id)

    async def release(self, permit: Permit, tokens: int) -> None:
        _check_tokens(tokens)
        if permit.released:
            return
        permit.released = True
        had_slot = self._held.pop(permit.id, None) is not None
        count = tokens if permit.limits.tpm is not None else 0
        if not had_slot and not count:
            return
        keys = self._keys(permit.key_id)
        await self._release(keys=[keys[1], keys[2], keys[3]],
                            args=[self._window_ms, count, permit.id, 1 if had_slot else 0])

    async def _refresh_slots(self) -> None:
        while self._held:
            await asyncio.sleep(self._slot_ttl_ms / 3000)
            held = list(self._held.items())
            if not held:
                return
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for permit_id, slots_key in held:
                        await self._refresh(keys=[slots_key], args=[self._slot_ttl_ms, permit_id], client=pipe)
                    await pipe.execute()
            except Exception as e:  # a Redis hiccup must not end the refresher; the next round retries
                logger.warning("could not refresh %d concurrency slots in Redis: %s", len(held), e)

    async def ping(self) -> None:
        """Raise unless Redis answers (readiness)."""
        await self._redis.ping()

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            try:
                await self._refresher
            except asyncio.CancelledError:
                pass
            self._refresher = None
        if self._owns_client:
            await self._redis.aclose()


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def make_rate_limiter(redis_url: str | None, **kw) -> RateLimiter:
    """Redis-backed limits when a URL is given (`--redis URL`), else in-process ones."""
    if redis_url:
        return RedisRateLimiter.from_url(redis_url, **kw)
    return MemoryRateLimiter(**kw)
