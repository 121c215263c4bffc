"""The admin view's JSON (under /console/api/admin): the admin session only (a customer session gets 403,
no session 401). The same operations as the token-authenticated /admin API (api/admin.py), through the same
functions (gateway/manage.py), for the browser: accounts, keys (and revoking one), top-up codes, usage
across accounts and backend health."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

from fastapi import FastAPI, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict

from thinkgate.api.admin import backends_view, read_json, storage_errors
from thinkgate.console.api import USAGE_DAYS, money_rows, request_rows
from thinkgate.console.context import Console
from thinkgate.gateway import manage
from thinkgate.storage.accounts import now


class NewCodes(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    amount: Annotated[int, BeforeValidator(lambda v: manage.amount(v, positive=True))]
    count: Annotated[int, BeforeValidator(lambda v: manage.positive_int(v, "count"))]


def add_admin_api(app: FastAPI, console: Console) -> None:
    auth = console.auth

    async def admin(request: Request, write: bool = False):
        await auth.require(request, admin=True, write=write)
        return console.need_gateway()

    @app.get("/console/api/admin/accounts", include_in_schema=False)
    async def accounts(request: Request):
        gw = await admin(request)
        accts = await asyncio.to_thread(gw.store.accounts)
        totals = {r["account"]: r for r in (await asyncio.to_thread(manage.usage_view, gw.store, gw.ledger,
                                                                   "account"))["data"]}
        return {"data": [{**manage.account_view(gw.store, gw.ledger, a, with_keys=False),
                          "spent": totals.get(a.name, {}).get("cost", "0"),
                          "requests": totals.get(a.name, {}).get("requests", 0)} for a in accts]}

    @app.get("/console/api/admin/keys", include_in_schema=False)
    async def keys(request: Request):
        gw = await admin(request)
        names = {a.id: a.name for a in await asyncio.to_thread(gw.store.accounts)}
        return {"data": [manage.key_view(k, names[k.account_id]) for k in await asyncio.to_thread(gw.store.keys)]}

    @app.post("/console/api/admin/keys/{name}/revoke", include_in_schema=False)
    async def revoke(request: Request, name: str):
        gw = await admin(request, write=True)
        with storage_errors():
            key = await asyncio.to_thread(gw.store.revoke_key, name)
        gw.forget_key(key.secret_hash)
        return manage.key_view(key, (await asyncio.to_thread(gw.store.account_by_id, key.account_id)).name)

    @app.post("/console/api/admin/codes", status_code=201, include_in_schema=False)
    async def codes(request: Request):
        gw = await admin(request, write=True)
        body = await read_json(request, NewCodes)
        with storage_errors(param="count"):
            batch, made = await asyncio.to_thread(manage.create_codes, gw.store, body.amount, body.count)
        return {"batch": batch, "amount": manage.cny(body.amount), "currency": "CNY", "codes": made}

    @app.get("/console/api/admin/usage", include_in_schema=False)
    async def usage(request: Request):
        gw = await admin(request)
        since = now() - dt.timedelta(days=USAGE_DAYS)
        per_account = await asyncio.to_thread(manage.usage_view, gw.store, gw.ledger, "account")
        rows = await asyncio.to_thread(console.store.usage_by_day_and_model, None, since)
        recent = await asyncio.to_thread(console.store.recent_requests, None, 50)
        return {"currency": "CNY", "days": USAGE_DAYS, "data": money_rows(rows), "accounts": per_account["data"],
                "total": per_account["total"], "recent": request_rows(recent)}

    @app.get("/console/api/admin/backends", include_in_schema=False)
    async def backends(request: Request):
        await admin(request)
        return backends_view(console.providers)
