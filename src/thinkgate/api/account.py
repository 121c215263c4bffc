"""What a caller may ask about itself, with its own key (under /v1 and /api/gpt/v1):

- `GET /v1/key`: OpenRouter's shape, `{"data": {"label", "limit", "usage", "limit_remaining", "is_free_tier",
  "rate_limit", ...}}`, plus the account's `balance` and `currency: "CNY"`. `usage` is what the key has spent
  (captured), `limit_remaining` its limit less what it spent and holds for running requests.
- `GET /v1/generation?id=ID`: one of the caller's account's finished requests (another account's id is
  unknown, as a made-up one is): tokens, cost with its breakdown by price, latency and time to first token
  (milliseconds), finish reason, cancelled flag.
- `POST /v1/redeem {"code": "..."}`: credit a top-up code to the caller's account, once.

Money here is CNY as JSON numbers, each written from an exact decimal (the shortest float that prints as it).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Annotated

from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from thinkgate.api.admin import read_json
from thinkgate.api.openapi import READS, documented
from thinkgate.errors import InvalidRequestError, NotFoundError, PermissionDenied
from thinkgate.gateway import manage
from thinkgate.gateway.money import UNITS_PER_CNY, json_number
from thinkgate.gateway.service import Caller
from thinkgate.protocol_gateway import GenerationResponse, KeyInfoResponse, RedeemResponse
from thinkgate.storage.accounts import AccountStore, aware
from thinkgate.storage.ledger import Ledger

BASES = ("/v1", "/api/gpt/v1")
GENERATION_ID = {"name": "id", "in": "query", "required": True, "description": "a finished request's id (its answer's id)",
                 "schema": {"type": "string", "minLength": 1}}


class Redeem(BaseModel):
    model_config = ConfigDict(frozen=True)
    code: str = Field(min_length=1, max_length=200, description="a top-up code (once per code)")


def _money(units: int | None) -> float | None:
    return None if units is None else json_number(units)


def key_info(store: AccountStore, ledger: Ledger, caller: Caller) -> dict:
    acct, key = caller.account, caller.key
    if key is None:  # an open server: its anonymous account is metered, not charged
        rows = ledger.totals("account", acct.id)
        spent, limit, remaining = (rows[0]["cost_units"] if rows else 0), None, None
        label, rate = acct.name, {"requests": None, "interval": "1m", "tokens": None, "concurrency": None}
    else:
        spent, limit, label = key.spent_units, key.limit_units, key.name
        remaining = None if limit is None else max(0, limit - key.spent_units - key.held_units)
        rate = {"requests": key.rpm, "interval": "1m", "tokens": key.tpm, "concurrency": key.concurrency}
    return {"label": label, "prefix": key.prefix if key else None, "account": acct.name,
            "limit": _money(limit), "usage": _money(int(spent)), "limit_remaining": _money(remaining),
            "is_free_tier": False, "rate_limit": rate, "balance": _money(acct.balance_units), "currency": "CNY",
            "expires_at": key.expires_at.isoformat() if key and key.expires_at else None,
            "models": key.models if key else None}


def _part(tokens: int, price_units: int) -> dict:
    """One price's share: tokens x CNY per 1000 tokens, exact (before the request's one rounding up)."""
    cost = Decimal(tokens * price_units) / (1000 * UNITS_PER_CNY)
    return {"tokens": tokens, "price_per_1k": json_number(price_units), "cost": float(cost)}


def generation_info(row: dict) -> dict:
    prompt, cached = row["prompt_tokens"], min(row["cached_tokens"], row["prompt_tokens"])
    cached_price = row["price_cached_per_1k"]
    breakdown = {
        "input": _part(prompt - cached, row["price_input_per_1k"]),
        "cached_input": _part(cached, row["price_input_per_1k"] if cached_price is None else cached_price),
        "output": _part(row["completion_tokens"], row["price_output_per_1k"]),
        "rounding": "the sum of the parts, rounded up to a whole 1e-8 CNY once per request",
    }
    ms = {k: None if row[k] is None else round(row[k], 3) for k in ("latency_ms", "ttft_ms")}
    return {"id": row["request_id"], "model": row["model"], "created_at": aware(row["created_at"]).isoformat(),
            "tokens_prompt": prompt, "tokens_cached": cached, "tokens_completion": row["completion_tokens"],
            "tokens_reasoning": row["reasoning_tokens"], "total_cost": json_number(row["cost_units"]),
            "currency": "CNY", "cost_breakdown": breakdown, "latency": ms["latency_ms"], "ttft": ms["ttft_ms"],
            "finish_reason": row["finish_reason"], "native_finish_reason": row["native_finish_reason"],
            "cancelled": bool(row["cancelled"]), "ended_by": row["ended_by"], "user": row["user"]}


def add_account_routes(app: FastAPI, store: AccountStore, ledger: Ledger, bases: tuple[str, ...] = BASES) -> None:
    async def caller_of(request: Request) -> Caller:
        """Authenticate first (401/403 before anything else is read)."""
        caller = await request.app.state.dispatch.caller(request)
        if caller is None:
            raise NotFoundError("this server runs without a gateway: it has no keys, balances or generations",
                                code="no_gateway")
        return caller

    async def get_key(request: Request):
        caller = await caller_of(request)
        return {"data": await asyncio.to_thread(key_info, store, ledger, caller)}

    # Checked here, after the caller (401 first): FastAPI's own check of a required parameter comes earlier.
    async def get_generation(request: Request, id: Annotated[str | None, Query(include_in_schema=False)] = None):
        caller = await caller_of(request)
        if not id:
            raise InvalidRequestError("missing required parameter: id", param="id")
        row = await asyncio.to_thread(ledger.generation, id)
        if row is None or row["account_id"] != caller.account.id:  # another account's: as if unknown
            raise NotFoundError(f"no generation with id {id[:100]!r} (finished requests of this account only)",
                                param="id", code="generation_not_found")
        return {"data": generation_info(row)}

    async def redeem(request: Request):
        caller = await caller_of(request)
        if caller.key is None:
            raise PermissionDenied("this server is open (no keys): there is no account to credit a code to",
                                   code="open_server")
        body = await read_json(request, Redeem)
        units = await asyncio.to_thread(manage.redeem, store, caller.account.id, body.code)
        if units is None:
            raise InvalidRequestError("this code is unknown or has already been redeemed", param="code",
                                      code="invalid_code")
        acct = await asyncio.to_thread(store.account_by_id, caller.account.id)
        return {"data": {"credited": json_number(units), "balance": json_number(acct.balance_units),
                         "currency": "CNY"}}

    for base in bases:
        app.add_api_route(f"{base}/key", get_key, methods=["GET"], **documented(response=KeyInfoResponse, errors=READS))
        app.add_api_route(f"{base}/generation", get_generation, methods=["GET"],
                          **documented(response=GenerationResponse, errors=(400, *READS), parameters=[GENERATION_ID]))
        app.add_api_route(f"{base}/redeem", redeem, methods=["POST"],
                          **documented(Redeem, RedeemResponse, errors=(400, 401, 403, 404, 413)))
