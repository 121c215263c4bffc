"""The gateway's tables (SQLAlchemy Core). Migrations in storage/migrations create them; this module is
what queries are written against. Money columns are BIGINT units of 1e-8 CNY (gateway/money.py).

The ledger is append-only: a row is never updated or deleted. `accounts.balance_units` is the spendable
balance kept beside it, changed in the same transaction as each entry, and always equals
credits - captures - open holds; a CHECK keeps it >= 0, so no race can drive it negative.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

accounts = Table(
    "accounts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("email", String(320)),
    Column("balance_units", BigInteger, nullable=False, default=0),
    Column("anonymous", Boolean, nullable=False, default=False),  # meters open servers; never charged
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("balance_units >= 0", name="balance_not_negative"),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("models", JSON),  # allowed model ids; null = all
    Column("ips", JSON),  # allowed client CIDRs; null = any
    Column("limit_units", BigInteger),  # the key's own spending limit; null = the account's balance only
    Column("spent_units", BigInteger, nullable=False, default=0),  # captured
    Column("held_units", BigInteger, nullable=False, default=0),  # open holds
    Column("rpm", Integer),
    Column("tpm", Integer),
    Column("concurrency", Integer),
    CheckConstraint("limit_units IS NULL OR spent_units + held_units <= limit_units", name="key_within_limit"),
)

ledger = Table(
    "ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("key_id", Integer, ForeignKey("api_keys.id")),
    Column("request_id", String(80)),
    Column("kind", String(16), nullable=False),  # credit | hold | capture | release
    Column("amount_units", BigInteger, nullable=False),
    Column("owner", String(80)),  # holds: the gateway instance that placed it (for the reaper)
    Column("note", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("amount_units >= 0", name="amount_not_negative"),
    CheckConstraint("kind IN ('credit', 'hold', 'capture', 'release')", name="known_kind"),
    # Each request is held, captured and released at most once: the idempotency of billing.
    Index("one_entry_per_request_kind", "request_id", "kind", unique=True),
)

usage = Table(
    "usage", metadata,
    Column("request_id", String(80), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("key_id", Integer, ForeignKey("api_keys.id"), index=True),
    Column("model", String(256), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("reasoning_tokens", Integer, nullable=False),
    Column("cost_units", BigInteger, nullable=False),
    Column("price_input_per_1k", BigInteger, nullable=False),
    Column("price_output_per_1k", BigInteger, nullable=False),
    Column("price_cached_per_1k", BigInteger),
    Column("finish_reason", String(32)),
    Column("native_finish_reason", String(64)),
    Column("ended_by", String(32), nullable=False),  # finished | client_disconnect | error | restart
    Column("cancelled", Boolean, nullable=False),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Column("user", String(256)),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    # Where the token counts come from: engine | upstream | tokenizer / estimate (an upstream sent none).
    Column("usage_source", String(16), nullable=False, server_default="engine"),
    Column("backend", String(128)),  # the upstream backend that served it
)

topup_codes = Table(
    "topup_codes", metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("batch", String(64), nullable=False),
    Column("amount_units", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("redeemed_by", Integer, ForeignKey("accounts.id")),
    Column("redeemed_at", DateTime(timezone=True)),
)

instances = Table(
    "gateway_instances", metadata,
    Column("id", String(80), primary_key=True),
    Column("host", String(256), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)
