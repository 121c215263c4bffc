"""The gateway's decisions for one request: who calls (key or anonymous), may they use this model from this
address, rate limits, the hold that guarantees payment, and the capture when the request ends.

No SQL here (storage/ does that) and no HTTP (the API turns the errors raised here into 401/402/403/429).
Blocking database calls run off the event loop: holds and settlements on the ledger's own thread, many to a
transaction (storage/ledger_writer.py), the rest in worker threads.

Keys are cached per process by their hash (`authenticate(..., cached=True)`), which the API asks for only on
the routes that generate: their next step, the hold, reads the key's row again inside its transaction and
refuses a revoked or expired key (401), so revocation still stops generation at once, in this process and in
any other gateway process on the same database. Every other route (GET /v1/key, /v1/generation, redeem,
/v1/models, ...) reads the key fresh. A cached entry lives at most KEY_CACHE_S (keys cannot be edited, only
revoked, so this only bounds how long an entry may stay unused in memory).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial

from thinkgate.errors import (
    AuthenticationError,
    InvalidRequestError,
    PaymentRequired,
    PermissionDenied,
    RateLimited,
)
from thinkgate.gateway.keys import hash_secret, looks_like_key, same_hash
from thinkgate.gateway.limits import KeyLimits, LimitExceeded, Permit, RateLimiter
from thinkgate.gateway.money import Price, to_cny
from thinkgate.gateway.providers.base import PreparedRequest, UsageRecord
from thinkgate.storage.accounts import Account, AccountStore, Key, now
from thinkgate.storage.db import Database
from thinkgate.storage.ledger import HoldPlan, KeyUnusable, Ledger
from thinkgate.storage.ledger_writer import LedgerWriter

log = logging.getLogger(__name__)
BAD_KEY = "invalid API key: it is unknown, revoked or expired"  # one message for every case
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0  # an instance silent this long is dead: its open holds are released
QUERY_KEY_NAMES = ("key", "api_key", "api-key", "apikey", "token", "access_token")
KEY_CACHE_S = 60.0
KEY_CACHE_SIZE = 10_000  # the oldest entry goes first past this


@dataclass(frozen=True)
class Caller:
    account: Account
    key: Key | None  # None: an open server's anonymous caller


@dataclass
class Admission:
    """A request the gateway let through: its permit, its hold, and the (maybe lowered) prepared request."""

    caller: Caller
    request_id: str
    model: str
    price: Price
    prepared: PreparedRequest
    permit: Permit | None
    held_units: int | None  # None: nothing held (anonymous, metered only)
    user: str | None

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.permit.headers) if self.permit is not None else {}


class Gateway:
    def __init__(self, db: Database, prices: dict[str, Price], require_keys: bool, limiter: RateLimiter):
        self.db = db
        self.store = AccountStore(db)
        self.ledger = Ledger(db)
        self.writer = LedgerWriter(db)
        self.prices = prices
        self.require_keys = require_keys
        self.limiter = limiter
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._anonymous: Account | None = None
        self._heartbeat: asyncio.Task | None = None
        self._keys: dict[str, tuple[float, Key, Account]] = {}  # hash -> (monotonic expiry, key, account)
        self._orphans: set[asyncio.Future] = set()  # releases of holds whose request was cancelled meanwhile

    # -- lifecycle --------------------------------------------------------------------------------
    def start_sync(self) -> None:
        """Migrate, register this instance and release the holds of dead ones (before serving)."""
        self.db.upgrade()
        self.ledger.register(self.instance_id, socket.gethostname(), os.getpid())
        reaped = self.ledger.reap(self._is_dead)
        if reaped:
            log.warning("released %d holds left open by a gateway process that stopped without settling", reaped)
        if not self.require_keys:
            self._anonymous = self.store.anonymous()

    async def aclose(self) -> None:
        """After the drain: finish the ledger's queued work and stop its thread."""
        while self._orphans:  # a hold still being placed may add its release
            await asyncio.gather(*self._orphans, return_exceptions=True)
        await self.writer.aclose()

    async def run_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await asyncio.to_thread(self.ledger.heartbeat, self.instance_id)
                await asyncio.to_thread(self.ledger.reap, self._is_dead)
            except Exception:
                log.exception("gateway heartbeat failed")

    @staticmethod
    def _is_dead(host: str, pid: int, heartbeat_at: dt.datetime) -> bool:
        if host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid):
            return True
        return (now() - heartbeat_at).total_seconds() > STALE_AFTER_S

    # -- who calls --------------------------------------------------------------------------------
    async def authenticate(self, authorization: str | None, query: dict[str, str], client_ip: str | None,
                           cached: bool = False) -> Caller:
        """The caller; `cached` allows this process's key cache, only for a request that holds before it
        generates (the hold re-checks revocation and expiry: see the module's docstring)."""
        for name, value in query.items():
            if name.lower() in QUERY_KEY_NAMES or looks_like_key(value):
                raise InvalidRequestError("API keys are not accepted in the URL (they end up in logs); send "
                                          "them as 'Authorization: Bearer <key>'", param=name)
        if not self.require_keys:
            return Caller(self._anonymous, None)
        secret = _bearer(authorization)
        if secret is None:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        digest = hash_secret(secret)
        found = self._cached_key(digest) if cached else None
        if found is None:
            found = await asyncio.to_thread(self.store.caller_by_hash, digest)
            self._remember_key(digest, found)
        # Found by its hash; compared again in constant time, so no timing tells how much of a guess matched.
        if found is None or not same_hash(found[0].secret_hash, digest) or not found[0].usable(now()):
            raise AuthenticationError(BAD_KEY, code="invalid_api_key")
        key, account = found
        if key.ips and not _ip_allowed(client_ip, key.ips):
            raise PermissionDenied("this key may not be used from this address", code="ip_not_allowed")
        return Caller(account, key)

    def _cached_key(self, digest: str) -> tuple[Key, Account] | None:
        hit = self._keys.get(digest)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1], hit[2]

    def _remember_key(self, digest: str, found: tuple[Key, Account] | None) -> None:
        """Cache a usable key; forget an unknown, revoked or expired one (never cached: a key made after a
        miss must work at once)."""
        if found is None or not found[0].usable(now()):
            self._keys.pop(digest, None)
            return
        if len(self._keys) >= KEY_CACHE_SIZE:
            del self._keys[next(iter(self._keys))]
        self._keys[digest] = (time.monotonic() + KEY_CACHE_S, *found)

    def forget_key(self, secret_hash: str) -> None:
        self._keys.pop(secret_hash, None)

    def authorize_model(self, caller: Caller, model: str) -> Price:
        if caller.key is not None and caller.key.models and model not in caller.key.models:
            raise PermissionDenied(f"this key may not use the model {model!r}", param="model",
                                   code="model_not_allowed")
        price = self.prices.get(model)
        if price is None:
            if self.require_keys:
                raise PermissionDenied(f"the model {model!r} has no price on this server", param="model",
                                       code="model_not_priced")
            price = Price()
        return price

    # -- before generation: limits and the hold -----------------------------------------------------
    async def admit(self, caller: Caller, request_id: str, model: str, price: Price, prepared: PreparedRequest,
                    user: str | None = None) -> Admission:
        permit = await self.acquire(caller)
        return await self.hold(caller, permit, request_id, model, price, prepared, user)

    async def acquire(self, caller: Caller) -> Permit | None:
        """The key's rate limits (429), the first half of `admit`."""
        if caller.key is None:
            return None
        k = caller.key
        try:
            return await self.limiter.acquire(str(k.id), KeyLimits(k.rpm, k.tpm, k.concurrency))
        except LimitExceeded as e:
            raise RateLimited(f"rate limit reached for {e.limit}: retry after {e.retry_after_s} s",
                              code=f"rate_limit_{e.limit}",
                              headers={"Retry-After": str(e.retry_after_s), **e.headers}) from None

    def likely_holds_in_full(self, caller: Caller, price: Price, prepared: PreparedRequest) -> bool:
        """Whether the hold will almost surely cover the whole request, judged from this process's cached key:
        the account's balance when the key was cached (at most KEY_CACHE_S ago) is at least twice the full
        hold, and the key has no spending limit. The API may then start an upstream request while the hold
        is placed (api/dispatch.py); when the guess is wrong it stops that request and nothing is billed."""
        if caller.key is None or caller.key.limit_units is not None:
            return False
        return 2 * _plan(price, prepared).full_cost() <= caller.account.balance_units

    async def hold(self, caller: Caller, permit: Permit | None, request_id: str, model: str, price: Price,
                   prepared: PreparedRequest, user: str | None = None) -> Admission:
        """The hold that guarantees payment (402 when not even one token is affordable), the second half of
        `admit`; the permit is released if it fails."""
        adm = Admission(caller, request_id, model, price, prepared, permit, None, user)
        if caller.key is None:
            return adm
        plan = _plan(price, prepared)
        op = self.ledger.hold_op(request_id, caller.account.id, caller.key.id, self.instance_id, plan)
        hold = self.writer.submit(op, caller.account.id)
        try:
            held = await asyncio.shield(hold)
        except asyncio.CancelledError:
            # The request was cancelled while its hold was being placed: the hold may still commit, and
            # nobody would settle it. Release it (a 0-token usage row) as soon as it is known.
            self._orphans.add(hold)
            hold.add_done_callback(partial(self._release_orphan, adm))
            hold.add_done_callback(self._orphans.discard)
            raise
        except KeyUnusable:  # revoked or expired since this process cached it
            self.forget_key(caller.key.secret_hash)
            await self.limiter.release(permit, 0)
            raise AuthenticationError(BAD_KEY, code="invalid_api_key") from None
        except BaseException:
            await self.limiter.release(permit, 0)
            raise
        if held is None:
            await self.limiter.release(permit, 0)
            self.forget_key(caller.key.secret_hash)  # its cached balance was too high: read it afresh next time
            raise PaymentRequired("the balance cannot pay for this request's prompt and one output token "
                                  f"at {model!r}'s prices", code="insufficient_balance")
        adm.held_units = held
        if plan.tokens_per_choice < prepared.max_tokens:
            adm.prepared = prepared.capped(plan.tokens_per_choice)  # the balance pays this much: finish "length" at the cap
        return adm

    def _release_orphan(self, adm: Admission, hold: asyncio.Future) -> None:
        if hold.cancelled() or hold.exception() is not None or hold.result() is None:
            if adm.permit is not None:
                self._spawn(self.limiter.release(adm.permit, 0))
            return
        adm.held_units = hold.result()
        self._spawn(self.release(adm))

    async def release_permit(self, permit: Permit | None) -> None:
        """Give back the rate-limit slot of a request that ended before its hold was placed."""
        if permit is not None:
            await self.limiter.release(permit, 0)

    async def release(self, adm: Admission) -> None:
        """Give a hold back whole: its request generated nothing (a 0-token usage row)."""
        await self.settle(adm, UsageRecord(adm.request_id, adm.model, adm.prepared.params.n, 0, 0, 0, 0, None, None,
                                           "client_disconnect", None, 0.0))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    # -- after: capture --------------------------------------------------------------------------
    async def settle(self, adm: Admission, record: UsageRecord) -> UsageRecord:
        cost = adm.price.cost(record.prompt_tokens, record.completion_tokens, record.cached_prompt_tokens)
        row = {"model": adm.model, "prompt_tokens": record.prompt_tokens,
               "cached_tokens": record.cached_prompt_tokens, "completion_tokens": record.completion_tokens,
               "reasoning_tokens": record.reasoning_tokens, "price_input_per_1k": adm.price.input_per_1k,
               "price_output_per_1k": adm.price.output_per_1k, "price_cached_per_1k": adm.price.cached_input_per_1k,
               "finish_reason": record.finish_reason, "native_finish_reason": record.native_finish_reason,
               "ended_by": record.ended_by, "cancelled": record.ended_by == "client_disconnect",
               "latency_ms": record.total_time_s * 1000,
               "ttft_ms": None if record.time_to_first_token_s is None else record.time_to_first_token_s * 1000,
               "user": adm.user, "usage_source": record.usage_source, "backend": record.backend}
        account_id = adm.caller.account.id
        try:
            if adm.held_units is None:
                await self.writer.submit(self.ledger.record_op(adm.request_id, account_id, None, cost, row),
                                         account_id)
            else:
                settled = await self.writer.submit(self.ledger.settle_op(adm.request_id, cost, row), account_id)
                cost = settled.cost_units
        finally:
            if adm.permit is not None:
                await self.limiter.release(adm.permit, record.prompt_tokens + record.completion_tokens)
        return replace(record, cost=to_cny(cost) if adm.held_units is not None else to_cny(0))


def _plan(price: Price, prepared: PreparedRequest) -> HoldPlan:
    return HoldPlan(prepared.prompt_tokens, prepared.max_tokens * prepared.params.n, prepared.params.n,
                    price.input_per_1k, price.output_per_1k)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _ip_allowed(ip: str | None, cidrs: list[str]) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

