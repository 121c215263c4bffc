"""Accounts, API keys and top-up codes."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from thinkgate.storage.db import Database
from thinkgate.storage.schema import accounts, api_keys, ledger, topup_codes

ANONYMOUS = "anonymous"


class NotFound(LookupError):
    pass


class AlreadyExists(ValueError):
    pass


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes for timezone-aware columns: they were written in UTC."""
    return t.replace(tzinfo=dt.UTC) if t is not None and t.tzinfo is None else t


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    email: str | None
    balance_units: int
    anonymous: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class Key:
    id: int
    account_id: int
    name: str
    secret_hash: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    models: list[str] | None
    ips: list[str] | None
    limit_units: int | None
    spent_units: int
    held_units: int
    rpm: int | None
    tpm: int | None
    concurrency: int | None

    def usable(self, at: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or at < self.expires_at)


# Built once: constructing a statement per request costs more than running it.
_CALLER_BY_HASH = sa.select(
    api_keys, accounts.c.name.label("account_name"), accounts.c.email.label("account_email"),
    accounts.c.balance_units, accounts.c.anonymous, accounts.c.created_at.label("account_created_at"),
).join(accounts, accounts.c.id == api_keys.c.account_id).where(api_keys.c.secret_hash == sa.bindparam("h"))


def _account(row) -> Account:
    return Account(row.id, row.name, row.email, row.balance_units, row.anonymous, aware(row.created_at))


def _key(row) -> Key:
    m = row._mapping
    return Key(**{k: (aware(m[k]) if k.endswith("_at") else m[k]) for k in Key.__dataclass_fields__})


class AccountStore:
    def __init__(self, db: Database):
        self.db = db

    # -- accounts ---------------------------------------------------------------------------------
    def create_account(self, name: str, email: str | None = None, balance_units: int = 0,
                       anonymous: bool = False) -> Account:
        try:
            with self.db.begin() as c:
                aid = c.execute(accounts.insert().values(name=name, email=email, balance_units=0,
                                                         anonymous=anonymous, created_at=now())).inserted_primary_key[0]
                if balance_units:
                    _credit(c, aid, balance_units, "initial balance")
        except IntegrityError:
            raise AlreadyExists(f"an account named {name!r} exists") from None
        return self.account(name)

    def account(self, name: str) -> Account:
        with self.db.begin() as c:
            row = c.execute(sa.select(accounts).where(accounts.c.name == name)).first()
        if row is None:
            raise NotFound(f"no account named {name!r}")
        return _account(row)

    def account_by_id(self, account_id: int) -> Account:
        with self.db.begin() as c:
            return _account(c.execute(sa.select(accounts).where(accounts.c.id == account_id)).one())

    def accounts(self) -> list[Account]:
        with self.db.begin() as c:
            return [_account(r) for r in c.execute(sa.select(accounts).order_by(accounts.c.id))]

    def anonymous(self) -> Account:
        """The account that meters an open server's requests (created on first use)."""
        try:
            return self.account(ANONYMOUS)
        except NotFound:
            try:
                return self.create_account(ANONYMOUS, anonymous=True)
            except AlreadyExists:  # another process made it first
                return self.account(ANONYMOUS)

    def topup(self, name: str, units: int, note: str = "top-up") -> Account:
        if units <= 0:
            raise ValueError("a top-up must be a positive amount")
        acct = self.account(name)
        with self.db.begin() as c:
            _credit(c, acct.id, units, note)
        return self.account(name)

    # -- keys -------------------------------------------------------------------------------------
    def create_key(self, account: str, name: str, secret_hash: str, prefix: str, *, models=None, ips=None,
                   limit_units=None, expires_at=None, rpm=None, tpm=None, concurrency=None) -> Key:
        acct = self.account(account)
        try:
            with self.db.begin() as c:
                c.execute(api_keys.insert().values(
                    account_id=acct.id, name=name, secret_hash=secret_hash, prefix=prefix, created_at=now(),
                    expires_at=expires_at, models=models, ips=ips, limit_units=limit_units, spent_units=0,
                    held_units=0, rpm=rpm, tpm=tpm, concurrency=concurrency))
        except IntegrityError:
            raise AlreadyExists(f"a key named {name!r} exists") from None
        return self.key(name)

    def key(self, name: str) -> Key:
        with self.db.begin() as c:
            row = c.execute(sa.select(api_keys).where(api_keys.c.name == name)).first()
        if row is None:
            raise NotFound(f"no key named {name!r}")
        return _key(row)

    def caller_by_hash(self, secret_hash: str) -> tuple[Key, Account] | None:
        """The key and its account in one read (every keyed request does this)."""
        with self.db.engine.connect() as c:
            row = c.execute(_CALLER_BY_HASH, {"h": secret_hash}).first()
        if row is None:
            return None
        m = row._mapping
        account = Account(m["account_id"], m["account_name"], m["account_email"], m["balance_units"],
                          m["anonymous"], aware(m["account_created_at"]))
        return _key(row), account

    def keys(self, account: str | None = None) -> list[Key]:
        q = sa.select(api_keys).order_by(api_keys.c.id)
        if account is not None:
            q = q.where(api_keys.c.account_id == self.account(account).id)
        with self.db.begin() as c:
            return [_key(r) for r in c.execute(q)]

    def revoke_key(self, name: str) -> Key:
        with self.db.begin() as c:
            n = c.execute(api_keys.update().where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
                          .values(revoked_at=now())).rowcount
        key = self.key(name)
        if n == 0 and key.revoked_at is None:
            raise NotFound(f"no key named {name!r}")
        return key

    # -- top-up codes -----------------------------------------------------------------------------
    def create_codes(self, batch: str, units: int, code_hashes: list[str]) -> None:
        if units <= 0:
            raise ValueError("a code must be worth a positive amount")
        with self.db.begin() as c:
            c.execute(topup_codes.insert(), [{"code_hash": h, "batch": batch, "amount_units": units,
                                              "created_at": now()} for h in code_hashes])

    def redeem(self, code_hash: str, account_id: int) -> int | None:
        """Credit the code's amount once; None if the code is unknown or was redeemed (also concurrently)."""
        with self.db.begin() as c:
            row = c.execute(sa.select(topup_codes.c.amount_units).where(topup_codes.c.code_hash == code_hash)
                            .with_for_update()).first()
            if row is None:
                return None
            taken = c.execute(topup_codes.update().where(topup_codes.c.code_hash == code_hash,
                                                         topup_codes.c.redeemed_by.is_(None))
                              .values(redeemed_by=account_id, redeemed_at=now())).rowcount
            if taken != 1:
                return None
            _credit(c, account_id, row.amount_units, f"code {code_hash[:8]}", request_id=f"redeem:{code_hash}")
            return row.amount_units


def _credit(c, account_id: int, units: int, note: str, request_id: str | None = None) -> None:
    c.execute(ledger.insert().values(account_id=account_id, kind="credit", amount_units=units, note=note,
                                     request_id=request_id, created_at=now()))
    c.execute(accounts.update().where(accounts.c.id == account_id)
              .values(balance_units=accounts.c.balance_units + units))
