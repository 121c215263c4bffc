"""The web console's storage: sign-in identities (an email and an argon2 password hash per account), console
sessions (stored as hashes of their cookie values, like API keys), failed sign-ins for rate limiting, and the
usage reads the console's charts and tables need (recent requests, usage per day and model).

Password hashing itself is not here (console/auth.py): this module only stores the hash it is given."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from thinkgate.storage.accounts import Account, AlreadyExists, _account, aware, now
from thinkgate.storage.db import Database
from thinkgate.storage.schema import accounts, api_keys, metadata, usage

console_users = sa.Table(
    "console_users", metadata,
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),  # stored lower-cased
    sa.Column("password_hash", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

console_sessions = sa.Table(
    "console_sessions", metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id")),  # null: the admin's session
    sa.Column("is_admin", sa.Boolean, nullable=False),
    # An admin session holds the SHA-256 of the admin token it was opened with: a new token ends it.
    sa.Column("admin_token_hash", sa.String(64)),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

login_failures = sa.Table(
    "console_login_failures", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("subject", sa.String(400), nullable=False),  # "email:..." or "ip:..."
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("console_login_failures_subject_at", "subject", "at"),
)


@dataclass(frozen=True)
class Session:
    token_hash: str
    account_id: int | None
    is_admin: bool
    admin_token_hash: str | None
    csrf_token: str
    expires_at: dt.datetime


class ConsoleStore:
    def __init__(self, db: Database):
        self.db = db

    # -- identities ---------------------------------------------------------------------------------
    def sign_up(self, account_name: str, email: str, password_hash: str) -> Account:
        """A new account (balance 0) and its sign-in identity, in one transaction."""
        try:
            with self.db.begin() as c:
                aid = c.execute(accounts.insert().values(name=account_name, email=email, balance_units=0,
                                                         anonymous=False, created_at=now())).inserted_primary_key[0]
                c.execute(console_users.insert().values(account_id=aid, email=email, password_hash=password_hash,
                                                        created_at=now()))
                row = c.execute(sa.select(accounts).where(accounts.c.id == aid)).one()
        except IntegrityError:
            raise AlreadyExists("this email is already registered") from None
        return _account(row)

    def identity(self, email: str) -> tuple[int, str] | None:
        """(account id, password hash) of a registered email."""
        with self.db.engine.connect() as c:
            row = c.execute(sa.select(console_users.c.account_id, console_users.c.password_hash)
                            .where(console_users.c.email == email)).first()
        return None if row is None else (row.account_id, row.password_hash)

    def set_password_hash(self, account_id: int, password_hash: str) -> None:
        with self.db.begin() as c:
            c.execute(console_users.update().where(console_users.c.account_id == account_id)
                      .values(password_hash=password_hash))

    # -- sessions -----------------------------------------------------------------------------------
    def create_session(self, token_hash: str, account_id: int | None, is_admin: bool, csrf_token: str,
                       lifetime: dt.timedelta, admin_token_hash: str | None = None) -> None:
        t = now()
        with self.db.begin() as c:
            c.execute(console_sessions.delete().where(console_sessions.c.expires_at < t))  # tidy as we go
            c.execute(console_sessions.insert().values(token_hash=token_hash, account_id=account_id,
                                                       is_admin=is_admin, admin_token_hash=admin_token_hash,
                                                       csrf_token=csrf_token, created_at=t,
                                                       expires_at=t + lifetime))

    def session(self, token_hash: str) -> Session | None:
        """A session that has not expired."""
        with self.db.engine.connect() as c:
            row = c.execute(sa.select(console_sessions).where(console_sessions.c.token_hash == token_hash)).first()
        if row is None or aware(row.expires_at) <= now():
            return None
        return Session(row.token_hash, row.account_id, row.is_admin, row.admin_token_hash, row.csrf_token,
                       aware(row.expires_at))

    def end_session(self, token_hash: str) -> None:
        with self.db.begin() as c:
            c.execute(console_sessions.delete().where(console_sessions.c.token_hash == token_hash))

    # -- sign-in rate limiting ------------------------------------------------------------------------
    def failures_since(self, subject: str, since: dt.datetime) -> list[dt.datetime]:
        with self.db.engine.connect() as c:
            rows = c.execute(sa.select(login_failures.c.at).where(login_failures.c.subject == subject,
                                                                  login_failures.c.at >= since)
                             .order_by(login_failures.c.at))
            return [aware(r.at) for r in rows]

    def note_failure(self, subjects: list[str], forget_before: dt.datetime) -> None:
        t = now()
        with self.db.begin() as c:
            c.execute(login_failures.delete().where(login_failures.c.at < forget_before))
            c.execute(login_failures.insert(), [{"subject": s, "at": t} for s in subjects])

    def clear_failures(self, subject: str) -> None:
        with self.db.begin() as c:
            c.execute(login_failures.delete().where(login_failures.c.subject == subject))

    # -- usage reads ----------------------------------------------------------------------------------
    def recent_requests(self, account_id: int | None, limit: int = 50) -> list[dict]:
        """The latest usage rows (of one account, or all), newest first, with the key's and account's names."""
        q = (sa.select(usage.c.request_id, usage.c.model, usage.c.prompt_tokens, usage.c.cached_tokens,
                       usage.c.completion_tokens, usage.c.reasoning_tokens, usage.c.cost_units,
                       usage.c.finish_reason, usage.c.ended_by, usage.c.latency_ms, usage.c.ttft_ms,
                       usage.c.created_at, api_keys.c.name.label("key"), accounts.c.name.label("account"))
             .select_from(usage.outerjoin(api_keys, api_keys.c.id == usage.c.key_id)
                          .join(accounts, accounts.c.id == usage.c.account_id))
             .order_by(usage.c.created_at.desc(), usage.c.request_id).limit(limit))
        if account_id is not None:
            q = q.where(usage.c.account_id == account_id)
        with self.db.engine.connect() as c:
            return [{**r._mapping, "created_at": aware(r.created_at)} for r in c.execute(q)]

    def usage_by_day_and_model(self, account_id: int | None, since: dt.datetime) -> list[dict]:
        """Requests, tokens and cost summed per (UTC day, model) since `since`, oldest day first."""
        day = sa.func.date(usage.c.created_at)
        q = (sa.select(day.label("day"), usage.c.model, sa.func.count().label("requests"),
                       *[sa.func.coalesce(sa.func.sum(usage.c[k]), 0).label(k) for k in
                         ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_units")])
             .where(usage.c.created_at >= since).group_by(day, usage.c.model).order_by(day, usage.c.model))
        if account_id is not None:
            q = q.where(usage.c.account_id == account_id)
        with self.db.engine.connect() as c:
            return [{**r._mapping, "day": str(r.day)} for r in c.execute(q)]
