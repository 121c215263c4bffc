"""Managing accounts, keys and top-up codes: the checks and operations behind both `thinkgate accounts|keys|codes`
and the admin HTTP API, and the plain views of what they manage.

Inputs are checked here once (names, amounts, CIDRs, expiry dates, positive counts): each check raises
ValueError with a message fit for a person, which the CLI shows under the option's name (exit code 2) and the
admin API under the field's name (400). Views show money as CNY decimal strings ("12.5"), never floats.
Secrets (keys, codes) are made here and returned once; only their hashes are stored.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from decimal import Decimal

from thinkgate.gateway.keys import display_prefix, hash_secret, looks_like_key, new_secret
from thinkgate.gateway.money import json_number, to_cny, to_units
from thinkgate.storage.accounts import ANONYMOUS, Account, AccountStore, Key, aware, now
from thinkgate.storage.ledger import Ledger

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
CODE_PREFIX = "tg-code-"
MAX_CODES = 10_000
# The most one amount may be (1e17 units of 1e-8 CNY): a balance takes about 90 of them before it would pass
# the database's 64-bit integers.
MAX_AMOUNT_CNY = 10**9
USAGE_GROUPS = ("key", "account", "model", "day")
TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")


# -- checks: each returns the value to store or raises ValueError ------------------------------------
def name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"a {what} is 1 to 128 letters, digits or . _ @ + - (starting with a letter or digit)")
    if looks_like_key(value) or value.startswith("sk-"):
        raise ValueError(f"a {what} must not look like an API key (it is shown in listings and logs)")
    return value


def account_name(value: str) -> str:
    name(value, "account name")
    if value == ANONYMOUS:
        raise ValueError(f"{ANONYMOUS!r} is reserved for the account that meters open servers")
    return value


def email(value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 320 or not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        raise ValueError("not an email address")
    return value


def amount(value: str | int | Decimal, *, positive: bool = False) -> int:
    """CNY as a decimal string, an integer or a Decimal (never a float) -> units, exactly."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError("an amount of CNY is a decimal string such as \"10.50\" (or an integer)")
    try:
        units = to_units(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError(f"{str(value)[:40]!r} is not an amount of CNY with at most 8 decimal places") from None
    if units < 0 or (positive and units == 0):
        raise ValueError(f"the amount must be {'more than' if positive else 'at least'} 0 CNY")
    if units > to_units(MAX_AMOUNT_CNY):
        raise ValueError(f"the amount must be at most {MAX_AMOUNT_CNY} CNY")
    return units


def positive_int(value: str | int, what: str = "value") -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,10}\s*", value):
        n = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        n = 0
    if not 1 <= n <= 2**31 - 1:
        raise ValueError(f"the {what} must be a whole number from 1 to {2**31 - 1}")
    return n


def _split(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a list of strings (or, on the command line, one comma-separated string)")
    items = [i.strip() for i in items]
    if not items or any(not i for i in items):
        raise ValueError("an empty entry in the list")
    return list(dict.fromkeys(items))


def models(value: str | list[str] | None) -> list[str] | None:
    return _split(value)


def cidrs(value: str | list[str] | None) -> list[str] | None:
    """Client address ranges: CIDRs or single addresses, IPv4 or IPv6, stored in their normal form."""
    items = _split(value)
    if items is None:
        return None
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as e:
            raise ValueError(f"{item[:60]!r} is not an IP address range (CIDR such as 10.0.0.0/8): {e}") from None
    return out


def expiry(value: str | None, at: dt.datetime | None = None) -> dt.datetime | None:
    """An ISO date (the key expires at 00:00 UTC that day) or an ISO datetime (UTC unless it names an
    offset); it must lie in the future."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("an expiry is an ISO date (2026-12-31) or datetime (2026-12-31T18:00:00Z)")
    try:
        t = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not an ISO date (2026-12-31) or datetime (2026-12-31T18:00:00Z)") from None
    t = t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)
    if t <= (at or now()):
        raise ValueError(f"{t.isoformat()} is in the past")
    return t


# -- operations ------------------------------------------------------------------------------------
def create_key(store: AccountStore, account: str, key_name: str, **limits) -> tuple[Key, str]:
    """A new key for `account`; returns it and its secret (shown once; only its hash is stored)."""
    if store.account(account).anonymous:
        raise ValueError(f"the {ANONYMOUS!r} account meters open servers and holds no keys")
    secret = new_secret()
    return store.create_key(account, key_name, hash_secret(secret), display_prefix(secret), **limits), secret


def new_code() -> str:
    return CODE_PREFIX + secrets.token_urlsafe(18)


def create_codes(store: AccountStore, units: int, count: int, batch: str | None = None) -> tuple[str, list[str]]:
    """`count` single-use codes worth `units` each; returns the batch name and the codes (shown once)."""
    if count > MAX_CODES:
        raise ValueError(f"at most {MAX_CODES} codes per batch")
    batch = batch or "batch-" + now().strftime("%Y%m%dT%H%M%SZ")
    codes = [new_code() for _ in range(count)]
    store.create_codes(batch, units, [hash_secret(c) for c in codes])
    return batch, codes


def redeem(store: AccountStore, account_id: int, code: str) -> int | None:
    """Credit the code's amount to the account once; None when the code is unknown or already used."""
    return store.redeem(hash_secret(code.strip()), account_id)


# -- views -----------------------------------------------------------------------------------------
def cny(units: int | None) -> str | None:
    """Units as a CNY decimal string in plain notation ("12.5", "100", "0.00000001")."""
    return None if units is None else format(to_cny(units), "f")


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def key_status(key: Key, at: dt.datetime | None = None) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "active" if key.usable(at or now()) else "expired"


def key_view(key: Key, account: str) -> dict:
    remaining = None if key.limit_units is None else max(0, key.limit_units - key.spent_units - key.held_units)
    return {"name": key.name, "prefix": key.prefix, "account": account, "status": key_status(key),
            "created_at": _iso(key.created_at), "expires_at": _iso(key.expires_at),
            "revoked_at": _iso(key.revoked_at), "models": key.models, "ips": key.ips,
            "limit": cny(key.limit_units), "spent": cny(key.spent_units), "held": cny(key.held_units),
            "limit_remaining": cny(remaining), "rpm": key.rpm, "tpm": key.tpm, "concurrency": key.concurrency}


def totals_view(row: dict | None) -> dict:
    row = row or {}
    cost = int(row.get("cost_units", 0))
    return {"requests": int(row.get("requests", 0)), **{f: int(row.get(f, 0)) for f in TOKEN_FIELDS},
            "cost": cny(cost), "cost_number": json_number(cost)}


def account_view(store: AccountStore, ledger: Ledger, acct: Account, with_keys: bool = True) -> dict:
    view = {"name": acct.name, "email": acct.email, "balance": cny(acct.balance_units), "currency": "CNY",
            "anonymous": acct.anonymous, "created_at": _iso(acct.created_at)}
    if with_keys:
        view["keys"] = [key_view(k, acct.name) for k in store.keys(acct.name)]
        rows = ledger.totals("account", acct.id)
        view["usage"] = totals_view(rows[0] if rows else None)
    return view


def usage_view(store: AccountStore, ledger: Ledger, group: str, account: str | None = None) -> dict:
    """Usage summed per key, account, model or day, with a grand total; keys and accounts by name."""
    if group not in USAGE_GROUPS:
        raise ValueError(f"group is one of {', '.join(USAGE_GROUPS)}")
    acct_id = store.account(account).id if account is not None else None
    rows = ledger.totals(group, acct_id)
    names: dict = {}
    if group == "key":
        names = {k.id: k.name for k in store.keys()}
    elif group == "account":
        names = {a.id: a.name for a in store.accounts()}
    total = {"requests": 0, **dict.fromkeys(TOKEN_FIELDS, 0), "cost_units": 0}
    out = []
    for r in rows:
        for f in total:
            total[f] += int(r[f])
        label = names.get(r[group], r[group]) if names else r[group]
        out.append({group: label, **totals_view(r)})
    return {"group": group, "currency": "CNY", "data": out, "total": totals_view(total)}


def entry_view(entry: dict, key_names: dict[int, str]) -> dict:
    return {"id": entry["id"], "kind": entry["kind"], "amount": cny(entry["amount_units"]),
            "request_id": entry["request_id"], "key": key_names.get(entry["key_id"]), "note": entry["note"],
            "created_at": _iso(aware(entry["created_at"]))}
