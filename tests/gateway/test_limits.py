"""Per-key rate limits, in process and in a real Redis (the redis-server that .ci/run starts)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis.asyncio

from thinkgate.gateway.limits import (
    KeyLimits,
    LimitExceeded,
    MemoryRateLimiter,
    Permit,
    RedisRateLimiter,
    format_duration,
    make_rate_limiter,
)


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request):
    """Makes limiters of one kind; the Redis ones of one test share a fresh key prefix (like processes)."""
    if request.param == "memory":
        return MemoryRateLimiter
    url = request.getfixturevalue("redis_url")
    prefix = f"thinkgate-test:{uuid.uuid4().hex}:"
    return lambda **kw: RedisRateLimiter.from_url(url, prefix=prefix, **kw)


def run_with(make, body, **kw):
    async def main():
        limiter = make(**kw)
        try:
            return await body(limiter)
        finally:
            await limiter.aclose()

    return asyncio.run(main())


def ms(duration: str) -> float:
    """Parse format_duration's output back to milliseconds."""
    m = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s|(\d+)ms)", duration)
    assert m, duration
    return int(m[1] or 0) * 60_000 + float(m[2] or 0) * 1000 + int(m[3] or 0)


def test_format_duration():
    assert [format_duration(x) for x in (0, -5, 0.2, 250, 1000, 12_500, 59_998, 60_000, 61_250)] == [
        "0s", "0s", "1ms", "250ms", "1s", "12.5s", "59.998s", "1m0s", "1m1.25s"]


def test_key_limits_reject_nonsense():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rpm"):
            KeyLimits(rpm=bad)
    assert KeyLimits(rpm=1, tpm=1, concurrency=1).tpm == 1


def test_rpm_spent_raises_requests_with_retry_after_and_headers(make_limiter):
    limits = KeyLimits(rpm=3)

    async def body(lim):
        permits = [await lim.acquire("key-1", limits) for _ in range(3)]
        assert [p.headers["x-ratelimit-remaining-requests"] for p in permits] == ["2", "1", "0"]
        assert all(p.headers["x-ratelimit-limit-requests"] == "3" for p in permits)
        assert "x-ratelimit-limit-tokens" not in permits[0].headers  # only the limits that are set
        # Reset: until the oldest request leaves the 60 s window.
        assert all(59_000 < ms(p.headers["x-ratelimit-reset-requests"]) <= 60_000 for p in permits)
        for _ in range(2):  # a refusal takes nothing, so the second one looks the same
            with pytest.raises(LimitExceeded) as e:
                await lim.acquire("key-1", limits)
            assert e.value.limit == "requests"
            assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
            assert e.value.headers["x-ratelimit-limit-requests"] == "3"
            reset_ms = ms(e.value.headers["x-ratelimit-reset-requests"])
            assert 59_000 < reset_ms <= 60_000
            assert e.value.retry_after_s == -(-reset_ms // 1000) == 60
            assert "requests per minute (limit 3)" in str(e.value)
        other = await lim.acquire("key-2", limits)  # limits are per key
        assert other.headers["x-ratelimit-remaining-requests"] == "2"

    run_with(make_limiter, body)


def test_windows_slide(make_limiter):
    """After the reset the header gave, the spent limit admits again (requests, then tokens)."""

    async def body(lim):
        limits = KeyLimits(rpm=2)
        await lim.acquire("k", limits)
        await lim.acquire("k", limits)
        with pytest.raises(LimitExceeded) as e:
            await lim.acquire("k", limits)
        assert e.value.retry_after_s == 1  # 0.6 s, rounded up to whole seconds
        await asyncio.sleep(ms(e.value.headers["x-ratelimit-reset-requests"]) / 1000 + 0.05)
        assert (await lim.acquire("k", limits)).headers["x-ratelimit-remaining-requests"] == "1"

        limits = KeyLimits(tpm=10)
        await lim.release(await lim.acquire("t", limits), tokens=10)
        with pytest.raises(LimitExceeded) as e:
            await lim.acquire("t", limits)
        assert e.value.limit == "tokens"
        await asyncio.sleep(ms(e.value.headers["x-ratelimit-reset-tokens"]) / 1000 + 0.05)
        assert (await lim.acquire("t", limits)).headers["x-ratelimit-remaining-tokens"] == "10"

    run_with(make_limiter, body, window_s=0.6)


def test_tpm_counted_on_release(make_limiter):
    limits = KeyLimits(tpm=100)

    async def body(lim):
        p1 = await lim.acquire("k", limits)
        assert p1.headers["x-ratelimit-remaining-tokens"] == "100"
        assert p1.headers["x-ratelimit-reset-tokens"] == "0s"
        p2 = await lim.acquire("k", limits)  # tokens count when released, not when admitted
        assert p2.headers["x-ratelimit-remaining-tokens"] == "100"
        await lim.release(p1, tokens=60)
        p3 = await lim.acquire("k", limits)
        assert p3.headers["x-ratelimit-remaining-tokens"] == "40"
        assert 59_000 < ms(p3.headers["x-ratelimit-reset-tokens"]) <= 60_000
        await lim.release(p2, tokens=30)
        p4 = await lim.acquire("k", limits)  # 90 < 100: the window is not spent yet
        assert p4.headers["x-ratelimit-remaining-tokens"] == "10"
        await lim.release(p3, tokens=20)  # 110: requests in flight may overshoot, later ones wait
        with pytest.raises(LimitExceeded) as e:
            await lim.acquire("k", limits)
        assert e.value.limit == "tokens"
        assert e.value.headers["x-ratelimit-remaining-tokens"] == "0"
        assert e.value.headers["x-ratelimit-limit-tokens"] == "100"
        # Admitted again once p1's 60 tokens leave the window (110 - 60 < 100): 60 s after they were counted.
        assert 58 <= e.value.retry_after_s <= 60
        await lim.release(p4, tokens=0)
        with pytest.raises(ValueError):
            await lim.release(Permit("k", limits, {}), tokens=-1)

    run_with(make_limiter, body)


def test_concurrency_slots_freed_on_release_and_release_is_idempotent(make_limiter):
    limits = KeyLimits(concurrency=2, tpm=1000)

    async def body(lim):
        a = await lim.acquire("k", limits)
        b = await lim.acquire("k", limits)
        with pytest.raises(LimitExceeded) as e:
            await lim.acquire("k", limits)
        assert e.value.limit == "concurrency"
        assert e.value.retry_after_s == 1
        assert "concurrent requests (limit 2)" in str(e.value)
        await asyncio.gather(lim.release(a, tokens=5), lim.release(a, tokens=5))
        await lim.release(a, tokens=5)
        c = await lim.acquire("k", limits)  # a's slot, freed once: only one comes back
        assert c.headers["x-ratelimit-remaining-tokens"] == "995"  # a's tokens, counted once
        with pytest.raises(LimitExceeded):
            await lim.acquire("k", limits)
        await lim.release(b, tokens=0)
        await lim.release(c, tokens=0)
        await asyncio.gather(*[lim.acquire("k", limits) for _ in range(2)])

    run_with(make_limiter, body)


def test_a_refusal_takes_nothing(make_limiter):
    limits = KeyLimits(rpm=2, concurrency=1)

    async def body(lim):
        p = await lim.acquire("k", limits)
        for _ in range(3):  # refused for concurrency: must not count against the RPM
            with pytest.raises(LimitExceeded, match="concurrent"):
                await lim.acquire("k", limits)
        await lim.release(p, tokens=1)
        q = await lim.acquire("k", limits)
        assert q.headers["x-ratelimit-remaining-requests"] == "0"
        await lim.release(q, tokens=1)
        with pytest.raises(LimitExceeded) as e:  # RPM spent: refused without taking the free slot
            await lim.acquire("k", limits)
        assert e.value.limit == "requests"
        assert e.value.retry_after_s > 1

    run_with(make_limiter, body)


def test_no_limits_means_unlimited(make_limiter):
    async def body(lim):
        permits = await asyncio.gather(*[lim.acquire("k", KeyLimits()) for _ in range(200)])
        assert all(p.headers == {} for p in permits)
        await asyncio.gather(*[lim.release(p, tokens=10**6) for p in permits])
        only_rpm = KeyLimits(rpm=1000)
        for _ in range(3):
            p = await lim.acquire("k", only_rpm)
            assert set(p.headers) == {f"x-ratelimit-{w}-requests" for w in ("limit", "remaining", "reset")}
            await lim.release(p, tokens=10**9)  # no TPM set: tokens are not limited

    run_with(make_limiter, body)


def test_50_concurrent_acquires_admit_exactly_the_rpm(make_limiter):
    limits = KeyLimits(rpm=10, concurrency=50)

    async def body(lim):
        results = await asyncio.gather(*[lim.acquire("k", limits) for _ in range(50)], return_exceptions=True)
        admitted = [r for r in results if isinstance(r, Permit)]
        refused = [r for r in results if isinstance(r, LimitExceeded)]
        assert len(admitted) == 10 and len(refused) == 40
        assert all(r.limit == "requests" for r in refused)
        assert sorted(p.headers["x-ratelimit-remaining-requests"] for p in admitted) == sorted(map(str, range(10)))

    run_with(make_limiter, body)


def test_secrets_are_refused_as_key_ids(make_limiter):
    async def body(lim):
        with pytest.raises(ValueError, match="never per key secret"):
            await lim.acquire("sk-tg-" + "x" * 43, KeyLimits(rpm=1))
        with pytest.raises(ValueError):
            await lim.acquire("", KeyLimits(rpm=1))

    run_with(make_limiter, body)


def test_two_redis_limiters_enforce_one_shared_limit(redis_url):
    """Two limiters with their own connections, standing for two gateway processes."""
    prefix = f"thinkgate-test:{uuid.uuid4().hex}:"

    async def main():
        a = RedisRateLimiter.from_url(redis_url, prefix=prefix)
        b = RedisRateLimiter.from_url(redis_url, prefix=prefix)
        try:
            limits = KeyLimits(rpm=10, concurrency=100)
            results = await asyncio.gather(*[(a, b)[i % 2].acquire("k", limits) for i in range(30)],
                                           return_exceptions=True)
            assert sum(isinstance(r, Permit) for r in results) == 10
            for lim in (a, b):
                with pytest.raises(LimitExceeded, match="requests"):
                    await lim.acquire("k", limits)
            one = KeyLimits(concurrency=1)
            held = await a.acquire("c", one)
            with pytest.raises(LimitExceeded, match="concurrent"):
                await b.acquire("c", one)
            await a.release(held, tokens=0)
            await b.release(await b.acquire("c", one), tokens=0)
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())


# Run by a separate Python process: acquires argv[3] times at wall-clock time argv[4], prints how many were admitted.
PROCESS_ACQUIRES = """
import asyncio, sys, time
from thinkgate.gateway.limits import KeyLimits, LimitExceeded, RedisRateLimiter

async def main():
    lim = RedisRateLimiter.from_url(sys.argv[1], prefix=sys.argv[2])
    await lim.acquire("warm-up", KeyLimits())  # connected before the start signal
    await asyncio.sleep(max(0.0, float(sys.argv[4]) - time.time()))
    admitted = 0
    for r in await asyncio.gather(*[lim.acquire("k", KeyLimits(rpm=10)) for _ in range(int(sys.argv[3]))],
                                  return_exceptions=True):
        if isinstance(r, LimitExceeded):
            continue
        if isinstance(r, BaseException):
            raise r
        admitted += 1
    await lim.aclose()
    print(admitted)

asyncio.run(main())
"""


def test_two_os_processes_enforce_one_shared_rpm(redis_url):
    prefix = f"thinkgate-test:{uuid.uuid4().hex}:"
    start = time.time() + 2.0  # both processes fire together, once both have started
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS_ACQUIRES, redis_url, prefix, "15", str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        counts.append(int(out))
    assert sum(counts) == 10, counts


# Run by a separate Python process: takes the only slot of key "k", says so, then holds it until killed.
PROCESS_HOLDS_A_SLOT = """
import asyncio, sys
from thinkgate.gateway.limits import KeyLimits, RedisRateLimiter

async def main():
    lim = RedisRateLimiter.from_url(sys.argv[1], prefix=sys.argv[2], slot_ttl_s=float(sys.argv[3]))
    await lim.acquire("k", KeyLimits(concurrency=1))
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_slot_of_a_killed_process_frees_after_the_slot_ttl(redis_url):
    """The holder refreshes its slot while alive (held well past the TTL); kill -9 it and the slot is free again
    within the TTL, with no release."""
    prefix = f"thinkgate-test:{uuid.uuid4().hex}:"
    ttl = 0.6
    holder = subprocess.Popen([sys.executable, "-c", PROCESS_HOLDS_A_SLOT, redis_url, prefix, str(ttl)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line == "held\n", holder.stderr.read() if holder.poll() is not None else line

        async def main():
            lim = RedisRateLimiter.from_url(redis_url, prefix=prefix, slot_ttl_s=ttl)
            try:
                one = KeyLimits(concurrency=1)
                deadline = time.monotonic() + 4 * ttl
                while time.monotonic() < deadline:  # alive: its refreshed slot stays taken
                    with pytest.raises(LimitExceeded, match="concurrent"):
                        await lim.acquire("k", one)
                    await asyncio.sleep(0.1)
                os.kill(holder.pid, signal.SIGKILL)
                holder.wait(10)
                killed = time.monotonic()
                while True:
                    try:
                        permit = await lim.acquire("k", one)
                        break
                    except LimitExceeded:
                        assert time.monotonic() - killed < ttl + 0.5, "the dead holder's slot leaked"
                        await asyncio.sleep(0.05)
                await lim.release(permit, tokens=0)
            finally:
                await lim.aclose()

        asyncio.run(main())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        holder.stdout.close()
        holder.stderr.close()


def test_redis_keys_are_prefixed_expiring_and_name_only_the_key_id(redis_url):
    prefix = f"thinkgate-test:{uuid.uuid4().hex}:"

    async def main():
        lim = RedisRateLimiter.from_url(redis_url, prefix=prefix, window_s=60, slot_ttl_s=30)
        r = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            limits = KeyLimits(rpm=5, tpm=100, concurrency=2)
            p = await lim.acquire("key-7", limits)
            q = await lim.acquire("key-7", limits)
            await lim.release(p, tokens=12)
            keys = sorted([k async for k in r.scan_iter(match=prefix + "*")])
            base = prefix + "{key-7}:"
            assert keys == [base + "req", base + "slots", base + "tok", base + "toksum"]
            for k in keys:
                ttl_ms = await r.pttl(k)
                assert 0 < ttl_ms <= (30_000 if k.endswith("slots") else 60_000), (k, ttl_ms)
            await lim.release(q, tokens=1)
            assert not await r.exists(base + "slots")  # the last slot freed: nothing left behind
        finally:
            await lim.aclose()
            await r.aclose()

    asyncio.run(main())


def test_make_rate_limiter_without_redis_is_in_process():
    assert isinstance(make_rate_limiter(None), MemoryRateLimiter)
    assert isinstance(make_rate_limiter(""), MemoryRateLimiter)


def test_make_rate_limiter_with_redis(redis_url):
    async def main():
        shared = make_rate_limiter(redis_url, prefix=f"thinkgate-test:{uuid.uuid4().hex}:")
        try:
            assert isinstance(shared, RedisRateLimiter)
            await shared.release(await shared.acquire("k", KeyLimits(rpm=1)), tokens=3)
            with pytest.raises(LimitExceeded):
                await shared.acquire("k", KeyLimits(rpm=1))
        finally:
            await shared.aclose()

    asyncio.run(main())
