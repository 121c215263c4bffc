"""The admin HTTP API under /admin/: accounts, keys, top-up codes, usage totals and ledgers.

Every route requires `Authorization: Bearer <admin token>` (`--admin-token` or THINKGATE_ADMIN_TOKEN), compared
in constant time; without a configured token every /admin/ path answers 404 saying the admin API is disabled.
Bodies are JSON objects; unknown fields are refused. Amounts of CNY are sent as decimal strings ("10.50") or
JSON numbers, read from their decimal text (never through a float), at most 8 decimal places. Responses show
money as CNY decimal strings ("balance": "12.5"); usage totals also as JSON numbers (`cost_number`).
A new key's secret and new codes appear once, in the response that creates them, and are stored only hashed.

| method and path | body / query | answer |
| --- | --- | --- |
| POST /admin/accounts | name, email?, balance? | 201, the account |
| GET /admin/accounts | | {"data": [accounts]} |
| GET /admin/accounts/{name} | | the account with its keys and usage totals |
| POST /admin/accounts/{name}/topup | amount, note? | the account |
| GET /admin/accounts/{name}/ledger | ?limit=N (the last N entries, default 1000) | {"data": [entries]} |
| POST /admin/keys | account, name, models?, ips?, limit?, expires?, rpm?, tpm?, concurrency? | 201, {"secret", "key"} |
| GET /admin/keys | ?account=NAME | {"data": [keys]} (display prefixes only) |
| GET /admin/keys/{name} | | the key |
| POST /admin/keys/{name}/revoke | | the key |
| POST /admin/codes | amount, count, batch? | 201, {"batch", "amount", "codes"} |
| GET /admin/usage | ?group=key,account,model,day ?account=NAME | {"data": [totals], "total": totals} |
| GET /admin/backends | | {"data": [per model: type, active_requests, backends with their state]} |
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from thinkgate.api.openapi import ADMIN, documented
from thinkgate.api.requests import as_model, read_limited, validation_error
from thinkgate.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)
from thinkgate.gateway import manage
from thinkgate.protocol_gateway import (
    AccountList,
    AccountView,
    BackendsView,
    KeyList,
    KeyView,
    LedgerView,
    NewCodesView,
    NewKeyView,
    UsageView,
)
from thinkgate.storage.accounts import AccountStore, AlreadyExists, NotFound
from thinkgate.storage.ledger import Ledger

MAX_BODY = 1 << 20
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
M = TypeVar("M", bound=BaseModel)


def _check(fn, *args, **kw) -> BeforeValidator:
    return BeforeValidator(lambda v: fn(v, *args, **kw))


def _optional(fn, *args, **kw) -> BeforeValidator:
    return BeforeValidator(lambda v: None if v is None else fn(v, *args, **kw))


# What each check (gateway/manage.py) accepts, as /openapi.json shows it.
_NULL = {"type": "null"}
_NAME = {"type": "string", "pattern": f"^{manage.NAME.pattern}$", "description": "letters, digits, . _ @ + -"}
_AMOUNT = {"anyOf": [{"type": "string", "pattern": r"^\s*[0-9]{1,10}(\.[0-9]{1,8})?\s*$"},
                     {"type": "number", "minimum": 0, "maximum": manage.MAX_AMOUNT_CNY}],
           "description": f'CNY: a decimal string such as "10.50" or a number, at most 8 decimal places, at most '
                          f'{manage.MAX_AMOUNT_CNY}'}
_COUNT = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
_LIMIT = {"pattern": r"^\s*[0-9]{1,10}\s*$", "description": "the last N entries (1 to 2147483647)"}
_LIST = {"anyOf": [{"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                   {"type": "string", "minLength": 1, "description": "comma-separated"}]}


def _schema(schema: dict, nullable: bool = False) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [schema, _NULL]} if nullable else schema)


Amount = Annotated[int, _check(manage.amount), _schema(_AMOUNT)]
PositiveAmount = Annotated[int, _check(manage.amount, positive=True), _schema(_AMOUNT)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewAccount(_Body):
    name: Annotated[str, _check(manage.account_name), _schema(_NAME)]
    email: Annotated[str | None, _check(manage.email),
                     _schema({"type": "string", "maxLength": 320, "pattern": r"^[^@\s]+@[^@\s]+$"}, True)] = None
    balance: Amount = 0


class TopUp(_Body):
    amount: PositiveAmount
    note: str = Field("top-up", min_length=1, max_length=200)


class NewKey(_Body):
    account: str
    name: Annotated[str, _check(manage.name, "key name"), _schema(_NAME)]
    models: Annotated[list[str] | None, _check(manage.models), _schema(_LIST, True)] = Field(
        None, description="the models the key may use (default: all)")
    ips: Annotated[list[str] | None, _check(manage.cidrs), _schema(_LIST, True)] = Field(
        None, description="client address ranges (CIDRs) the key may be used from")
    limit: Annotated[int | None, _optional(manage.amount), _schema(_AMOUNT, True)] = Field(
        None, description="a spending limit, CNY")
    expires: Annotated[dt.datetime | None, _check(manage.expiry), _schema({"type": "string"}, True)] = Field(
        None, description="an ISO date (00:00 UTC that day) or datetime in the future")
    rpm: Annotated[int | None, _optional(manage.positive_int, "requests per minute"), _schema(_COUNT, True)] = None
    tpm: Annotated[int | None, _optional(manage.positive_int, "tokens per minute"), _schema(_COUNT, True)] = None
    concurrency: Annotated[int | None, _optional(manage.positive_int, "concurrent requests"),
                           _schema(_COUNT, True)] = None


class NewCodes(_Body):
    amount: PositiveAmount
    count: Annotated[int, _check(manage.positive_int, "count"),
                     _schema({**_COUNT, "maximum": manage.MAX_CODES})]
    batch: Annotated[str | None, _optional(manage.name, "batch name"), _schema(_NAME, True)] = None


def _fail(message: str):
    raise ValueError(message)


def body_error(e: ValidationError) -> InvalidRequestError:
    """The first problem, named by its field: our checks' own messages, else pydantic's (errors.py shape)."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "value_error":
        return InvalidRequestError(f"invalid {param}: {first['ctx']['error']}", param=param)
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(f"unknown parameter: {param}", param=param)
    return validation_error(e)


async def read_json(request: Request, model: type[M]) -> M:
    """The JSON object body as `model`, or a 400 naming the field. JSON numbers become Decimals from their
    text, so an amount sent as 12345678.12345678 arrives exact."""
    raw = await read_limited(request, MAX_BODY)
    try:
        data = json.loads(raw or b"{}", parse_float=Decimal, parse_constant=_fail)
    except ValueError:
        raise InvalidRequestError("the request body is not valid JSON") from None
    return as_model(data, model, body_error)


def json_body(model: type[BaseModel]):
    """`read_json` as a route dependency (admin routes: it runs after the admin token's check)."""

    async def parse(request: Request):
        return await read_json(request, model)

    return Depends(parse)


@contextmanager
def storage_errors(param: str | None = None) -> Iterator[None]:
    """Storage's refusals as HTTP errors: unknown name 404 (400 naming `param` when it came in the body),
    duplicate name 409, a refused value 400."""
    try:
        yield
    except NotFound as e:
        raise (NotFoundError(str(e), code="not_found") if param is None else
               InvalidRequestError(str(e), param=param)) from None
    except AlreadyExists as e:
        raise ConflictError(str(e), param="name", code="already_exists") from None
    except ValueError as e:
        raise InvalidRequestError(str(e), param=param) from None


def admin_doc(request: type[BaseModel] | None, response: type[BaseModel], status: int = 200, *more: int) -> dict:
    return documented(request, response, status=status, errors=(*ADMIN, *more), auth="admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def backends_view(providers: dict) -> dict:
    """Each served model's backends: an upstream's circuit breaker (closed, open, half_open) and its consecutive
    failures; a local model's engine (running or stopped)."""
    out = []
    for model, p in providers.items():
        if hasattr(p, "health"):
            health = p.health()
            backends = [{"name": name, "type": "openai", "base_url": p.backends[name].base_url, **state}
                        for name, state in health.items()]
            kind = "openai"
        else:
            engine = getattr(p, "engine", None)
            running = engine is None or not hasattr(engine, "alive") or engine.alive()
            backends, kind = [{"name": "local", "type": "local", "state": "running" if running else "stopped"}], "local"
        out.append({"model": model, "type": kind, "active_requests": p.num_active(), "backends": backends})
    return {"data": out}


def add_admin_routes(app: FastAPI, store: AccountStore, ledger: Ledger, admin_token: str | None,
                     providers: dict | None = None) -> None:
    if not admin_token:
        async def disabled(path: str = ""):
            raise NotFoundError("the admin API is disabled on this server: start it with --admin-token or "
                                "THINKGATE_ADMIN_TOKEN", code="admin_disabled")

        app.add_api_route("/admin", disabled, methods=ALL_METHODS, include_in_schema=False)
        app.add_api_route("/admin/{path:path}", disabled, methods=ALL_METHODS, include_in_schema=False)
        return
    expected = _digest(admin_token)

    async def require_admin(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
        # Digests of equal length: the comparison takes the same time whatever was sent.
        if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(value.strip()), expected):
            raise AuthenticationError("invalid admin token: send 'Authorization: Bearer <admin token>'",
                                      code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})

    r = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

    def key_names() -> dict[int, str]:
        return {k.id: k.name for k in store.keys()}

    def account_names() -> dict[int, str]:
        return {a.id: a.name for a in store.accounts()}

    # FastAPI runs these plain functions in its thread pool: the blocking database calls stay off the loop.
    @r.post("/accounts", status_code=201, **admin_doc(NewAccount, AccountView, 201, 409, 413))
    def create_account(body: NewAccount = json_body(NewAccount)):
        with storage_errors():
            acct = store.create_account(body.name, email=body.email, balance_units=body.balance)
        return manage.account_view(store, ledger, acct)

    @r.get("/accounts", **admin_doc(None, AccountList))
    def list_accounts():
        return {"data": [manage.account_view(store, ledger, a, with_keys=False) for a in store.accounts()]}

    @r.get("/accounts/{name}", **admin_doc(None, AccountView))
    def show_account(name: str):
        with storage_errors():
            return manage.account_view(store, ledger, store.account(name))

    @r.post("/accounts/{name}/topup", **admin_doc(TopUp, AccountView, 200, 413))
    def topup(name: str, body: TopUp = json_body(TopUp)):
        with storage_errors():
            acct = store.topup(name, body.amount, note=body.note)
        return manage.account_view(store, ledger, acct, with_keys=False)

    @r.get("/accounts/{name}/ledger", **admin_doc(None, LedgerView))
    def account_ledger(name: str, limit: Annotated[str, Query(json_schema_extra=_LIMIT)] = "1000"):
        with storage_errors(param="limit"):
            n = manage.positive_int(limit, "limit")
        with storage_errors():
            acct = store.account(name)
        names = key_names()
        return {"account": acct.name, "currency": "CNY",
                "data": [manage.entry_view(e, names) for e in ledger.entries(acct.id)[-n:]]}

    @r.post("/keys", status_code=201, **admin_doc(NewKey, NewKeyView, 201, 409, 413))
    def create_key(body: NewKey = json_body(NewKey)):
        with storage_errors(param="account"):
            key, secret = manage.create_key(store, body.account, body.name, models=body.models, ips=body.ips,
                                            limit_units=body.limit, expires_at=body.expires, rpm=body.rpm,
                                            tpm=body.tpm, concurrency=body.concurrency)
        return {"secret": secret, "key": manage.key_view(key, body.account)}

    @r.get("/keys", **admin_doc(None, KeyList))
    def list_keys(account: str | None = None):
        names = account_names()
        with storage_errors(param="account"):
            keys = store.keys(account)
        return {"data": [manage.key_view(k, names[k.account_id]) for k in keys]}

    @r.get("/keys/{name}", **admin_doc(None, KeyView))
    def show_key(name: str):
        with storage_errors():
            key = store.key(name)
        return manage.key_view(key, store.account_by_id(key.account_id).name)

    @r.post("/keys/{name}/revoke", **admin_doc(None, KeyView))
    def revoke_key(name: str):
        with storage_errors():
            key = store.revoke_key(name)
        return manage.key_view(key, store.account_by_id(key.account_id).name)

    @r.post("/codes", status_code=201, **admin_doc(NewCodes, NewCodesView, 201, 413))
    def create_codes(body: NewCodes = json_body(NewCodes)):
        with storage_errors(param="count"):
            batch, codes = manage.create_codes(store, body.amount, body.count, body.batch)
        return {"batch": batch, "amount": manage.cny(body.amount), "currency": "CNY", "count": len(codes),
                "codes": codes}

    @r.get("/usage", **admin_doc(None, UsageView))
    def usage(group: Annotated[str, Query(json_schema_extra={"enum": list(manage.USAGE_GROUPS)})] = "account",
              account: str | None = None):
        if group not in manage.USAGE_GROUPS:
            raise InvalidRequestError(f"group is one of {', '.join(manage.USAGE_GROUPS)}", param="group")
        with storage_errors(param="account"):
            return manage.usage_view(store, ledger, group, account)

    @r.get("/backends", **admin_doc(None, BackendsView))
    async def backends():
        return backends_view(providers or {})

    @r.api_route("/{path:path}", methods=ALL_METHODS, include_in_schema=False)
    def unknown(path: str):
        raise NotFoundError(f"no admin route /admin/{path}", code="not_found")

    app.include_router(r)
