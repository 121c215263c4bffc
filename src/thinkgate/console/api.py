"""The console's JSON for signing in and for a customer's own account (under /console/api).

Sign-up and sign-in take `{"email", "password"}`, admin sign-in `{"token"}`; each answers with the page to go
to and sets the session cookie. Everything else needs a customer session; writes also need the CSRF token
(console/auth.py). Money is CNY as decimal strings; errors are the API's OpenAI-shaped errors naming the field.
A new key's secret appears once, in the answer that creates it."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from thinkgate.api.admin import read_json, storage_errors
from thinkgate.console.auth import (
    check_password_text,
    client_subject,
    hash_password,
    needs_rehash,
    verify_password,
)
from thinkgate.console.context import Console
from thinkgate.errors import AuthenticationError, ConflictError, InvalidRequestError, NotFoundError
from thinkgate.gateway import manage
from thinkgate.storage.accounts import AlreadyExists, NotFound, aware, now

USAGE_DAYS = 30
RECENT = 50


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _email(v):
    if not isinstance(v, str):
        raise ValueError("not an email address")
    manage.email(v.strip())
    return v.strip().lower()


class Credentials(_Body):
    email: Annotated[str, BeforeValidator(_email)]
    password: Annotated[str, BeforeValidator(check_password_text)]


class AdminToken(_Body):
    token: str = Field(min_length=1, max_length=1000)


class NewOwnKey(_Body):
    name: Annotated[str, BeforeValidator(lambda v: manage.name(v, "key name"))]
    limit: Annotated[int | None, BeforeValidator(lambda v: None if v in (None, "") else manage.amount(v))] = None
    expires: Annotated[dt.datetime | None, BeforeValidator(lambda v: manage.expiry(v or None))] = None
    rpm: Annotated[int | None, BeforeValidator(
        lambda v: None if v in (None, "") else manage.positive_int(v, "requests per minute"))] = None


class Code(_Body):
    code: str = Field(min_length=1, max_length=200)


def account_name_for(email: str) -> str:
    """A signed-up account is named after its email when that is a valid account name."""
    if manage.NAME.fullmatch(email) and not email.startswith("sk-"):
        return email
    return "user-" + re.sub(r"[^A-Za-z0-9]", "", email)[:40] + "-" + secrets.token_hex(4)


def own_key_name(account_id: int, label: str) -> str:
    """Key names are unique across accounts: a customer's label is kept under its account's id."""
    return f"u{account_id}-{label}"


def money_rows(rows: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in r.items() if k != "cost_units"}, "cost": manage.cny(int(r["cost_units"]))}
            for r in rows]


def request_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in money_rows(rows):
        r["created_at"] = aware(r["created_at"]).isoformat()
        r["latency_ms"] = None if r["latency_ms"] is None else round(r["latency_ms"], 1)
        r["ttft_ms"] = None if r["ttft_ms"] is None else round(r["ttft_ms"], 1)
        out.append(r)
    return out


def add_customer_api(app: FastAPI, console: Console) -> None:
    auth = console.auth

    async def session_answer(request: Request, account_id: int | None, is_admin: bool, go: str) -> JSONResponse:
        response = JSONResponse({"ok": True, "redirect": go})
        await auth.start_session(request, response, account_id, is_admin)
        return response

    @app.post("/console/api/signup", include_in_schema=False)
    async def signup(request: Request):
        console.need_gateway()
        auth.check_origin(request)
        body = await read_json(request, Credentials)
        throttle = ["signup:" + client_subject(request)]
        await auth.check_rate(throttle)
        hashed = await hash_password(body.password)
        try:
            acct = await asyncio.to_thread(console.store.sign_up, account_name_for(body.email), body.email, hashed)
        except AlreadyExists:
            raise ConflictError("this email is already registered: sign in instead", param="email",
                                code="email_taken") from None
        await auth.note_failure(throttle)  # counts sign-ups per address, like failed sign-ins
        return await session_answer(request, acct.id, False, "/console")

    @app.post("/console/api/signin", include_in_schema=False)
    async def signin(request: Request):
        console.need_gateway()
        auth.check_origin(request)
        body = await read_json(request, Credentials)
        subjects = ["email:" + body.email, client_subject(request)]
        await auth.check_rate(subjects)
        found = await asyncio.to_thread(console.store.identity, body.email)
        if not await verify_password(found[1] if found else None, body.password):
            await auth.note_failure(subjects)
            raise AuthenticationError("wrong email or password", param="password", code="bad_credentials")
        account_id, stored = found
        await asyncio.to_thread(console.store.clear_failures, subjects[0])
        if needs_rehash(stored):
            await asyncio.to_thread(console.store.set_password_hash, account_id, await hash_password(body.password))
        return await session_answer(request, account_id, False, "/console")

    @app.post("/console/api/admin-signin", include_in_schema=False)
    async def admin_signin(request: Request):
        console.need_gateway()
        if not auth.admin_enabled:
            raise NotFoundError("the admin view is disabled on this server: start it with --admin-token or "
                                "THINKGATE_ADMIN_TOKEN", code="admin_disabled")
        auth.check_origin(request)
        subjects = ["admin:" + client_subject(request)]
        await auth.check_rate(subjects)
        body = await read_json(request, AdminToken)
        if not auth.admin_token_ok(body.token):
            await auth.note_failure(subjects)
            raise AuthenticationError("wrong admin token", param="token", code="bad_admin_token")
        return await session_answer(request, None, True, "/console/admin")

    @app.post("/console/api/signout", include_in_schema=False)
    async def signout(request: Request):
        await auth.require(request, write=True)
        response = JSONResponse({"ok": True, "redirect": "/"})
        await auth.end_session(request, response)
        return response

    # -- the customer's own account --------------------------------------------------------------------
    @app.get("/console/api/me", include_in_schema=False)
    async def me(request: Request):
        acct = (await auth.require(request, customer=True)).account
        gw = console.need_gateway()
        view = await asyncio.to_thread(manage.account_view, gw.store, gw.ledger, acct)
        return {"name": view["name"], "email": view["email"], "balance": view["balance"], "currency": "CNY",
                "spent": view["usage"]["cost"], "requests": view["usage"]["requests"], "keys": view["keys"]}

    @app.get("/console/api/usage", include_in_schema=False)
    async def usage(request: Request):
        acct = (await auth.require(request, customer=True)).account
        since = now() - dt.timedelta(days=USAGE_DAYS)
        rows = await asyncio.to_thread(console.store.usage_by_day_and_model, acct.id, since)
        return {"currency": "CNY", "days": USAGE_DAYS, "data": money_rows(rows)}

    @app.get("/console/api/requests", include_in_schema=False)
    async def recent(request: Request):
        acct = (await auth.require(request, customer=True)).account
        rows = await asyncio.to_thread(console.store.recent_requests, acct.id, RECENT)
        return {"currency": "CNY", "data": request_rows(rows)}

    @app.post("/console/api/keys", status_code=201, include_in_schema=False)
    async def create_key(request: Request):
        acct = (await auth.require(request, customer=True, write=True)).account
        gw = console.need_gateway()
        body = await read_json(request, NewOwnKey)
        full_name = own_key_name(acct.id, body.name)
        if len(full_name) > 128:  # the stored name (the label under the account's id) has room for 128
            raise InvalidRequestError(f"invalid name: at most {128 - len(full_name) + len(body.name)} characters",
                                      param="name")
        with storage_errors(param="name"):
            key, secret = await asyncio.to_thread(
                manage.create_key, gw.store, acct.name, full_name,
                limit_units=body.limit, expires_at=body.expires, rpm=body.rpm)
        return {"secret": secret, "key": manage.key_view(key, acct.name)}

    @app.post("/console/api/keys/{name}/revoke", include_in_schema=False)
    async def revoke_key(request: Request, name: str):
        acct = (await auth.require(request, customer=True, write=True)).account
        gw = console.need_gateway()
        try:
            key = await asyncio.to_thread(gw.store.key, name)
        except NotFound:
            key = None
        if key is None or key.account_id != acct.id:  # another account's key: as if unknown
            raise NotFoundError(f"no key named {name[:100]!r} in this account", code="not_found")
        key = await asyncio.to_thread(gw.store.revoke_key, name)
        gw.forget_key(key.secret_hash)
        return manage.key_view(key, acct.name)

    @app.post("/console/api/redeem", include_in_schema=False)
    async def redeem(request: Request):
        acct = (await auth.require(request, customer=True, write=True)).account
        gw = console.need_gateway()
        body = await read_json(request, Code)
        units = await asyncio.to_thread(manage.redeem, gw.store, acct.id, body.code)
        if units is None:
            raise InvalidRequestError("this code is unknown or has already been redeemed", param="code",
                                      code="invalid_code")
        fresh = await asyncio.to_thread(gw.store.account_by_id, acct.id)
        return {"credited": manage.cny(units), "balance": manage.cny(fresh.balance_units), "currency": "CNY"}
