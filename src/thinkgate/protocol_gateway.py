"""What the gateway's endpoints answer, as pydantic models for /openapi.json (api/openapi.py): the caller's own
`/v1/key`, `/v1/generation`, `/v1/redeem` (api/account.py), and the admin API's views (api/admin.py, built by
gateway/manage.py). Like protocol_responses.py, these describe bodies the routes build as dicts; the test
of the document checks real answers against them.

Money: the caller's endpoints write CNY as JSON numbers, the admin API as decimal strings ("12.5").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- the caller's own ----------------------------------------------------------------------------------------
class RateLimit(_Body):
    requests: int | None = Field(description="requests per interval (null: no limit)")
    interval: str
    tokens: int | None = Field(description="tokens per interval")
    concurrency: int | None = Field(description="requests at once")


class KeyInfo(_Body):
    label: str = Field(description="the key's name")
    prefix: str | None = Field(description="the key's display prefix")
    account: str
    limit: float | None = Field(description="the key's spending limit, CNY (null: none)")
    usage: float | None = Field(description="CNY the key has spent")
    limit_remaining: float | None = Field(description="the limit less what was spent and what running requests hold")
    is_free_tier: bool
    rate_limit: RateLimit
    balance: float | None = Field(description="the account's balance, CNY")
    currency: Literal["CNY"]
    expires_at: str | None
    models: list[str] | None = Field(description="the models the key may use (null: all)")


class KeyInfoResponse(_Body):
    data: KeyInfo


class CostPart(_Body):
    tokens: int
    price_per_1k: float = Field(description="CNY per 1000 tokens")
    cost: float


class CostBreakdown(_Body):
    input: CostPart
    cached_input: CostPart
    output: CostPart
    rounding: str


class Generation(_Body):
    id: str
    model: str
    created_at: str
    tokens_prompt: int
    tokens_cached: int
    tokens_completion: int
    tokens_reasoning: int
    total_cost: float = Field(description="CNY")
    currency: Literal["CNY"]
    cost_breakdown: CostBreakdown
    latency: float | None = Field(description="milliseconds")
    ttft: float | None = Field(description="time to first token, milliseconds")
    finish_reason: str | None
    native_finish_reason: str | None
    cancelled: bool
    ended_by: str | None
    user: str | None


class GenerationResponse(_Body):
    data: Generation


class Redeemed(_Body):
    credited: float = Field(description="CNY added to the account")
    balance: float
    currency: Literal["CNY"]


class RedeemResponse(_Body):
    data: Redeemed


# -- admin -----------------------------------------------------------------------------------------------
class Totals(_Body):
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: str = Field(description="CNY, a decimal string")
    cost_number: float = Field(description="the same cost as a JSON number")


class KeyView(_Body):
    name: str
    prefix: str
    account: str
    status: Literal["active", "expired", "revoked"]
    created_at: str | None
    expires_at: str | None
    revoked_at: str | None
    models: list[str] | None
    ips: list[str] | None
    limit: str | None
    spent: str
    held: str
    limit_remaining: str | None
    rpm: int | None
    tpm: int | None
    concurrency: int | None


class AccountView(_Body):
    name: str
    email: str | None
    balance: str = Field(description="CNY, a decimal string")
    currency: Literal["CNY"]
    anonymous: bool
    created_at: str | None
    keys: list[KeyView] | None = Field(None, description="one account's view only")
    usage: Totals | None = Field(None, description="one account's view only")


class AccountList(_Body):
    data: list[AccountView]


class LedgerEntry(_Body):
    id: int
    kind: str
    amount: str
    request_id: str | None
    key: str | None
    note: str | None
    created_at: str | None


class LedgerView(_Body):
    account: str
    currency: Literal["CNY"]
    data: list[LedgerEntry]


class NewKeyView(_Body):
    secret: str = Field(description="shown this once; stored only hashed")
    key: KeyView


class KeyList(_Body):
    data: list[KeyView]


class NewCodesView(_Body):
    batch: str
    amount: str
    currency: Literal["CNY"]
    count: int
    codes: list[str] = Field(description="shown this once; stored only hashed")


class UsageView(_Body):
    group: Literal["key", "account", "model", "day"]
    currency: Literal["CNY"]
    data: list[dict[str, Any]] = Field(description="Totals, each with its group's label (key, account, model or day)")
    total: Totals


class ModelBackends(_Body):
    model: str
    type: Literal["local", "openai"]
    active_requests: int
    backends: list[dict[str, Any]] = Field(description="name, type, state (running/stopped, or a circuit "
                                                       "breaker's closed/open/half_open) and failures")


class BackendsView(_Body):
    data: list[ModelBackends]
