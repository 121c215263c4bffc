"""The ledger: hold before generation, capture and release when it ends, usage rows, the crash reaper.

Every change of money is one transaction that appends entries and moves `accounts.balance_units` (and the
key's held/spent) by the same amounts, so balance = credits - captures - open holds at every commit. A hold
is open until its request's `release` entry exists (every settlement writes one, of 0 when all was spent).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import sqlalchemy as sa

from thinkgate.storage.accounts import aware, now
from thinkgate.storage.db import Database
from thinkgate.storage.pg_calls import Call
from thinkgate.storage.schema import instances, ledger, usage

log = logging.getLogger(__name__)


class KeyUnusable(LookupError):
    """The key was revoked or expired (found so inside the hold's transaction)."""


@dataclass
class HoldPlan:
    """What a request asks to hold: its prompt and up to `want` completion tokens over `n` choices, at integer
    unit prices per 1000 tokens. Called with the units available, it returns the units to hold for the most
    completion tokens per choice they pay for (rounded up once: gateway/money.py's rule), or None when not
    even one token per choice is affordable; `tokens_per_choice` then says what it granted.
    PostgreSQL runs the same arithmetic inside the hold (migration 0004's thinkgate_hold_plan)."""

    prompt_tokens: int
    want_tokens: int
    n: int
    input_per_1k: int
    output_per_1k: int
    tokens_per_choice: int | None = field(default=None, compare=False)

    def __call__(self, available: int) -> int | None:
        if self.output_per_1k == 0:
            tokens = self.want_tokens if self._cost(0) <= available else 0
        else:
            room = available * 1000 - self.prompt_tokens * self.input_per_1k
            tokens = max(0, min(self.want_tokens, room // self.output_per_1k))
        per = tokens // self.n
        if per < 1:
            return None
        self.tokens_per_choice = per
        return self._cost(per * self.n)

    def full_cost(self) -> int:
        """The units of a hold that grants every token asked for."""
        return self._cost(self.want_tokens)

    def _cost(self, completion: int) -> int:
        return -(-(self.prompt_tokens * self.input_per_1k + completion * self.output_per_1k) // 1000)


@dataclass(frozen=True)
class Settled:
    cost_units: int
    first: bool  # False when the request had already been settled (an idempotent repeat)


# The hot path (every request holds once and settles once) runs on the driver's own cursor: SQLAlchemy's
# statement machinery cost more than the database work (measured: a settlement took ~8 ms of Python built
# from expressions, ~1.2 ms as text() statements, against ~0.3 ms of SQLite). Written in SQLite's
# named-parameter style, turned into psycopg's for PostgreSQL.
# The key's row is read in the hold's own transaction, so a key revoked (or expired) after a process cached it
# holds nothing: revocation stops generation at once in every gateway process (see gateway/service.py).
_HOLD_ROW_KEY = """SELECT a.balance_units, k.limit_units, k.spent_units, k.held_units FROM accounts a
JOIN api_keys k ON k.account_id = a.id WHERE a.id = :account_id AND k.id = :key_id
AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > :now)"""
_HOLD_ROW = "SELECT balance_units, NULL, 0, 0 FROM accounts WHERE id = :account_id"
_INSERT_ENTRY = """INSERT INTO ledger (account_id, key_id, request_id, kind, amount_units, owner, note, created_at)
VALUES (:account_id, :key_id, :request_id, :kind, :amount_units, :owner, :note, :created_at)"""
_MOVE_BALANCE = "UPDATE accounts SET balance_units = balance_units + :d WHERE id = :id"
_MOVE_KEY = "UPDATE api_keys SET held_units = held_units + :held, spent_units = spent_units + :spent WHERE id = :id"
_ENTRIES_OF = "SELECT kind, amount_units, account_id, key_id FROM ledger WHERE request_id = :r"
_USAGE_COLUMNS = [c.name for c in usage.columns]
_QUOTED = ", ".join(f'"{c}"' for c in _USAGE_COLUMNS)  # "user" is a reserved word in PostgreSQL
_INSERT_USAGE = (f"INSERT INTO usage ({_QUOTED}) VALUES ({', '.join(':' + c for c in _USAGE_COLUMNS)}) "
                 "ON CONFLICT (request_id) DO NOTHING")


class _Hot:
    """The hot statements in the connected database's dialect, run on the raw DBAPI cursor."""

    def __init__(self, sqlite: bool):
        self.sqlite = sqlite
        lock = "" if sqlite else " FOR UPDATE"  # SQLite: BEGIN IMMEDIATE already holds the write lock
        sql = (lambda q: q) if sqlite else (lambda q: re.sub(r":(\w+)", r"%(\1)s", q))
        self.hold_row_key, self.hold_row = sql(_HOLD_ROW_KEY + lock), sql(_HOLD_ROW + lock)
        self.insert_entry, self.move_balance, self.move_key = sql(_INSERT_ENTRY), sql(_MOVE_BALANCE), sql(_MOVE_KEY)
        self.entries_locked, self.insert_usage = sql(_ENTRIES_OF + lock), sql(_INSERT_USAGE)

    def now(self):
        """A timestamp as SQLAlchemy's DateTime(timezone=True) stores it (SQLite: text, naive UTC)."""
        t = now()
        return t.replace(tzinfo=None).isoformat(" ", "microseconds") if self.sqlite else t

    def entry(self, account_id, key_id, request_id, kind, units, owner=None, note=None) -> dict:
        return {"account_id": account_id, "key_id": key_id, "request_id": request_id, "kind": kind,
                "amount_units": units, "owner": owner, "note": note, "created_at": self.now()}

    def usage(self, request_id, account_id, key_id, cost_units, row: dict) -> dict:
        return {"request_id": request_id, "account_id": account_id, "key_id": key_id, "cost_units": cost_units,
                "created_at": self.now(), "usage_source": "engine", "backend": None, **row}

    def move(self, cur, account_id: int, key_id: int | None, balance: int = 0, held: int = 0, spent: int = 0):
        if balance:
            cur.execute(self.move_balance, {"d": balance, "id": account_id})
        if key_id is not None and (held or spent):
            cur.execute(self.move_key, {"held": held, "spent": spent, "id": key_id})


class Ledger:
    def __init__(self, db: Database):
        self.db = db
        self._hot = _Hot(db.is_sqlite)

    @contextmanager
    def _cursor(self):
        """A raw cursor inside one transaction (BEGIN IMMEDIATE on SQLite).

        On PostgreSQL the transaction runs in psycopg's pipeline mode: statements whose results are not read
        are sent without waiting for each answer, so a hold or a settlement costs two round trips to the
        server (BEGIN with the locking read; then the writes with the COMMIT) instead of one per statement.
        Each round trip is a context switch on a machine whose cores the server shares."""
        with self.db.begin() as c:
            raw = c.connection.driver_connection
            cur = raw.cursor()
            try:
                if self._hot.sqlite:
                    yield cur
                else:
                    with raw.pipeline():
                        yield cur
                        raw.commit()  # in the writes' round trip; SQLAlchemy's commit then has nothing to do
            finally:
                cur.close()

    def hold(self, request_id: str, account_id: int, key_id: int | None, owner: str,
             plan: Callable[[int], int | None]) -> int | None:
        """Lock the account (and key), call `plan(available units)`, and hold what it returns; None from
        `plan` holds nothing. Returns the units held, or None; KeyUnusable if the key is revoked or expired."""
        with self._cursor() as cur:
            return self.hold_on(cur, request_id, account_id, key_id, owner, plan)

    def settle(self, request_id: str, cost_units: int, row: dict) -> Settled:
        """Capture the cost (at most the hold), release the rest and write the usage row, in one transaction.
        Idempotent by request id: a repeat returns the first settlement."""
        with self._cursor() as cur:
            return self.settle_on(cur, request_id, cost_units, row)

    def record(self, request_id: str, account_id: int, key_id: int | None, cost_units: int, row: dict) -> None:
        """A usage row for a request that held nothing (an open server's anonymous account): metered, not
        charged. Idempotent by request id."""
        with self._cursor() as cur:
            self.record_on(cur, request_id, account_id, key_id, cost_units, row)

    # The same three on a cursor inside a transaction the caller owns (storage/ledger_writer.py runs many in
    # one). Each refuses (LookupError) before it writes anything, so a refusal never leaves half an operation
    # in a shared transaction.
    def hold_on(self, cur, request_id: str, account_id: int, key_id: int | None, owner: str,
                plan: Callable[[int], int | None]) -> int | None:
        h = self._hot
        if not h.sqlite and isinstance(plan, HoldPlan):
            return self.hold_call(request_id, account_id, key_id, owner, plan).run(cur)
        if key_id is None:
            cur.execute(h.hold_row, {"account_id": account_id})
        else:
            cur.execute(h.hold_row_key, {"key_id": key_id, "account_id": account_id, "now": h.now()})
        row = cur.fetchone()
        if row is None:
            raise KeyUnusable(key_id)
        balance, limit, spent, held = row
        available = balance if limit is None else min(balance, limit - spent - held)
        units = plan(max(available, 0))
        if units is None:
            return None
        if not 0 <= units <= available:
            raise ValueError(f"a hold of {units} units with {available} available")
        cur.execute(h.insert_entry, h.entry(account_id, key_id, request_id, "hold", units, owner=owner))
        h.move(cur, account_id, key_id, balance=-units, held=units)
        return units

    def settle_on(self, cur, request_id: str, cost_units: int, row: dict) -> Settled:
        h = self._hot
        if not h.sqlite:
            return self.settle_call(request_id, cost_units, row).run(cur)
        cur.execute(h.entries_locked, {"r": request_id})
        entries = {kind: (units, account_id, key_id) for kind, units, account_id, key_id in cur.fetchall()}
        if "hold" not in entries:
            raise LookupError(f"no hold for {request_id}")
        held, account_id, key_id = entries["hold"]
        if "capture" in entries:
            return Settled(entries["capture"][0], first=False)
        if "release" in entries:
            return Settled(0, first=False)  # reaped: released whole, nothing captured
        if cost_units > held:
            # Cannot happen for requests whose cap the hold covered; never let it take the balance below 0.
            log.error("request %s cost %d units over its hold of %d: capped", request_id, cost_units, held)
            cost_units = held
        cur.executemany(h.insert_entry, [h.entry(account_id, key_id, request_id, "capture", cost_units),
                                         h.entry(account_id, key_id, request_id, "release", held - cost_units)])
        h.move(cur, account_id, key_id, balance=held - cost_units, held=-held, spent=cost_units)
        cur.execute(h.insert_usage, h.usage(request_id, account_id, key_id, cost_units, row))
        return Settled(cost_units, first=True)

    def record_on(self, cur, request_id: str, account_id: int, key_id: int | None, cost_units: int,
                  row: dict) -> None:
        cur.execute(self._hot.insert_usage, self._hot.usage(request_id, account_id, key_id, cost_units, row))

    # -- the same three as operations for storage/ledger_writer.py: a Call (one statement) on PostgreSQL,
    # a function of a cursor on SQLite ----------------------------------------------------------------
    def hold_op(self, request_id: str, account_id: int, key_id: int | None, owner: str, plan: HoldPlan):
        if self._hot.sqlite:
            return partial(self.hold_on, request_id=request_id, account_id=account_id, key_id=key_id,
                           owner=owner, plan=plan)
        return self.hold_call(request_id, account_id, key_id, owner, plan)

    def settle_op(self, request_id: str, cost_units: int, row: dict):
        if self._hot.sqlite:
            return partial(self.settle_on, request_id=request_id, cost_units=cost_units, row=row)
        return self.settle_call(request_id, cost_units, row)

    def record_op(self, request_id: str, account_id: int, key_id: int | None, cost_units: int, row: dict):
        if self._hot.sqlite:
            return partial(self.record_on, request_id=request_id, account_id=account_id, key_id=key_id,
                           cost_units=cost_units, row=row)
        values = self._hot.usage(request_id, account_id, key_id, cost_units, row)
        return Call("record", (json.dumps({**values, "created_at": values["created_at"].isoformat()}),), _nothing)

    def hold_call(self, request_id: str, account_id: int, key_id: int | None, owner: str,
                  plan: HoldPlan) -> Call:
        """PostgreSQL: the hold as one statement (migration 0004), the plan's arithmetic included."""
        def finish(row):
            status, units, per = row
            if status == 2:
                raise KeyUnusable(key_id)
            if status == 1:
                return None
            plan.tokens_per_choice = per
            return units

        return Call("hold", (request_id, account_id, key_id, owner, self._hot.now(), plan.prompt_tokens,
                             plan.want_tokens, plan.n, plan.input_per_1k, plan.output_per_1k), finish)

    def settle_call(self, request_id: str, cost_units: int, row: dict) -> Call:
        """PostgreSQL: the settlement as one statement (migration 0004); the usage row goes as JSON, the
        columns it lacks (account, key, cost, time) filled in by the function."""
        def finish(answer):
            status, cost, first = answer
            if status == 1:
                raise LookupError(f"no hold for {request_id}")
            if first and cost < cost_units:
                log.error("request %s cost %d units over its hold of %d: capped", request_id, cost_units, cost)
            return Settled(cost, first=bool(first))

        usage_json = json.dumps({"usage_source": "engine", "backend": None, **row})
        return Call("settle", (request_id, cost_units, self._hot.now(), usage_json), finish)

    # -- instances and the reaper -----------------------------------------------------------------
    def register(self, instance_id: str, host: str, pid: int) -> None:
        t = now()
        with self.db.begin() as c:
            c.execute(instances.insert().values(id=instance_id, host=host, pid=pid, started_at=t, heartbeat_at=t))

    def heartbeat(self, instance_id: str) -> None:
        with self.db.begin() as c:
            c.execute(instances.update().where(instances.c.id == instance_id).values(heartbeat_at=now()))

    def reap(self, is_dead: Callable[[str, int, dt.datetime], bool]) -> int:
        """Release every open hold whose instance `is_dead(host, pid, heartbeat_at)` (crashed or killed before
        it settled), recording each request as cut by a restart: nothing captured, since what it generated
        was never counted. Returns how many were released."""
        with self.db.begin() as c:
            dead = {r.id for r in c.execute(sa.select(instances))
                    if is_dead(r.host, r.pid, aware(r.heartbeat_at))}
            if not dead:
                return 0
            h = ledger.alias("h")
            rows = c.execute(sa.select(h).where(_is_open(h), h.c.owner.in_(dead))).all()
            cur = c.connection.driver_connection.cursor()
            for hold in rows:
                cur.execute(self._hot.insert_entry, self._hot.entry(
                    hold.account_id, hold.key_id, hold.request_id, "release", hold.amount_units,
                    note="cut by a restart"))
                self._hot.move(cur, hold.account_id, hold.key_id, balance=hold.amount_units, held=-hold.amount_units)
            cur.close()
            c.execute(instances.delete().where(instances.c.id.in_(dead)))
            return len(rows)

    def open_holds(self) -> int:
        h = ledger.alias("h")
        with self.db.engine.connect() as c:
            return c.execute(sa.select(sa.func.count()).select_from(h).where(_is_open(h))).scalar_one()

    # -- reading ----------------------------------------------------------------------------------
    def generation(self, request_id: str) -> dict | None:
        with self.db.engine.connect() as c:
            row = c.execute(sa.select(usage).where(usage.c.request_id == request_id)).first()
        return dict(row._mapping) if row is not None else None

    def totals(self, group: str, account_id: int | None = None) -> list[dict]:
        """Usage summed per key, account, model or day."""
        col = {"key": usage.c.key_id, "account": usage.c.account_id, "model": usage.c.model,
               "day": sa.func.date(usage.c.created_at)}[group]
        q = sa.select(col.label(group), sa.func.count().label("requests"),
                      *[sa.func.coalesce(sa.func.sum(usage.c[k]), 0).label(k) for k in
                        ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_units")]
                      ).group_by(col).order_by(col)
        if account_id is not None:
            q = q.where(usage.c.account_id == account_id)
        with self.db.engine.connect() as c:
            return [{**r._mapping, group: str(r._mapping[group]) if group == "day" else r._mapping[group]}
                    for r in c.execute(q)]

    def entries(self, account_id: int) -> list[dict]:
        with self.db.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(ledger).where(ledger.c.account_id == account_id)
                                                        .order_by(ledger.c.id))]


def _nothing(_row) -> None:
    return None


def _is_open(h):
    """A hold entry (of the aliased ledger `h`) with no release for its request."""
    r = ledger.alias("r")
    return sa.and_(h.c.kind == "hold", ~sa.exists().where(r.c.request_id == h.c.request_id, r.c.kind == "release"))

