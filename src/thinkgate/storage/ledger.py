"""The ledger: hold before generation, capture and release when it ends, usage rows, the crash reaper.

Every change of money is one transaction that appends entries and moves `accounts.balance_units` (and the
key's held/spent) by the same amounts, so balance = credits - captures - open holds at every commit. A hold
is open until its request's `release` entry exists (every settlement writes one, of 0 when all was spent).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from thinkgate.storage.accounts import aware, now
from thinkgate.storage.db import Database
from thinkgate.storage.schema import instances, ledger, usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    cost_units: int
    first: bool  # False when the request had already been settled (an idempotent repeat)


# The hot path (every request holds once and settles once) as plain SQL: building SQLAlchemy expressions per
# call cost more than the database work (measured: ~8 ms of Python per settlement, ~0.7 ms of SQLite).
_HOLD_ROW_KEY = """SELECT a.balance_units, k.limit_units, k.spent_units, k.held_units FROM accounts a
JOIN api_keys k ON k.account_id = a.id WHERE a.id = :account_id AND k.id = :key_id"""
_HOLD_ROW = """SELECT balance_units, NULL AS limit_units FROM accounts WHERE id = :account_id"""
_TIME = sa.bindparam("created_at", type_=sa.DateTime(timezone=True))  # stored as SQLAlchemy stores datetimes
_INSERT_ENTRY = sa.text("""INSERT INTO ledger (account_id, key_id, request_id, kind, amount_units, owner, note,
created_at) VALUES (:account_id, :key_id, :request_id, :kind, :amount_units, :owner, :note, :created_at)"""
                        ).bindparams(_TIME)
_MOVE_BALANCE = sa.text("UPDATE accounts SET balance_units = balance_units + :d WHERE id = :id")
_MOVE_KEY = sa.text("UPDATE api_keys SET held_units = held_units + :held, spent_units = spent_units + :spent "
                    "WHERE id = :id")
_ENTRIES_OF = sa.text("SELECT kind, amount_units, account_id, key_id FROM ledger WHERE request_id = :r")
_USAGE_COLUMNS = [c.name for c in usage.columns]
_QUOTED = ", ".join(f'"{c}"' for c in _USAGE_COLUMNS)  # "user" is a reserved word in PostgreSQL
_INSERT_USAGE = sa.text(f"INSERT INTO usage ({_QUOTED}) VALUES "
                        f"({', '.join(':' + c for c in _USAGE_COLUMNS)}) ON CONFLICT (request_id) DO NOTHING"
                        ).bindparams(_TIME, sa.bindparam("cancelled", type_=sa.Boolean))


class Ledger:
    def __init__(self, db: Database):
        self.db = db
        lock = "" if db.is_sqlite else " FOR UPDATE"  # SQLite: BEGIN IMMEDIATE already holds the write lock
        self._hold_row_key = sa.text(_HOLD_ROW_KEY + lock)
        self._hold_row = sa.text(_HOLD_ROW + lock)
        self._entries_locked = sa.text(_ENTRIES_OF.text + lock)

    def hold(self, request_id: str, account_id: int, key_id: int | None, owner: str,
             plan: Callable[[int], int | None]) -> int | None:
        """Lock the account (and key), call `plan(available units)`, and hold what it returns; None from
        `plan` holds nothing. Returns the units held, or None."""
        with self.db.begin() as c:
            if key_id is None:
                r = c.execute(self._hold_row, {"account_id": account_id}).one()
            else:
                r = c.execute(self._hold_row_key, {"key_id": key_id, "account_id": account_id}).one()
            available = r.balance_units
            if r.limit_units is not None:
                available = min(available, r.limit_units - r.spent_units - r.held_units)
            units = plan(max(available, 0))
            if units is None:
                return None
            assert 0 <= units <= available, (units, available)
            c.execute(_INSERT_ENTRY, _entry(account_id, key_id, request_id, "hold", units, owner=owner))
            _move(c, account_id, key_id, balance=-units, held=units)
            return units

    def settle(self, request_id: str, cost_units: int, row: dict) -> Settled:
        """Capture the cost (at most the hold), release the rest and write the usage row, in one transaction.
        Idempotent by request id: a repeat returns the first settlement."""
        with self.db.begin() as c:
            entries = {e.kind: e for e in c.execute(self._entries_locked, {"r": request_id})}
            hold = entries.get("hold")
            if hold is None:
                raise LookupError(f"no hold for {request_id}")
            if "capture" in entries:
                return Settled(entries["capture"].amount_units, first=False)
            if "release" in entries:
                return Settled(0, first=False)  # reaped: released whole, nothing captured
            if cost_units > hold.amount_units:
                # Cannot happen for requests whose cap the hold covered; never let it take the balance below 0.
                log.error("request %s cost %d units over its hold of %d: capped", request_id, cost_units,
                          hold.amount_units)
                cost_units = hold.amount_units
            c.execute(_INSERT_ENTRY, [_entry(hold.account_id, hold.key_id, request_id, "capture", cost_units),
                                      _entry(hold.account_id, hold.key_id, request_id, "release",
                                             hold.amount_units - cost_units)])
            _move(c, hold.account_id, hold.key_id, balance=hold.amount_units - cost_units,
                  held=-hold.amount_units, spent=cost_units)
            c.execute(_INSERT_USAGE, _usage(request_id, hold.account_id, hold.key_id, cost_units, row))
            return Settled(cost_units, first=True)

    def record(self, request_id: str, account_id: int, key_id: int | None, cost_units: int, row: dict) -> None:
        """A usage row for a request that held nothing (an open server's anonymous account): metered, not
        charged. Idempotent by request id."""
        with self.db.begin() as c:
            c.execute(_INSERT_USAGE, _usage(request_id, account_id, key_id, cost_units, row))

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
            for hold in rows:
                c.execute(ledger.insert().values(account_id=hold.account_id, key_id=hold.key_id,
                                                 request_id=hold.request_id, kind="release",
                                                 amount_units=hold.amount_units, note="cut by a restart",
                                                 created_at=now()))
                _move(c, hold.account_id, hold.key_id, balance=hold.amount_units, held=-hold.amount_units)
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


def _entry(account_id, key_id, request_id, kind, units, owner=None, note=None) -> dict:
    return {"account_id": account_id, "key_id": key_id, "request_id": request_id, "kind": kind,
            "amount_units": units, "owner": owner, "note": note, "created_at": now()}


def _usage(request_id, account_id, key_id, cost_units, row: dict) -> dict:
    return {"request_id": request_id, "account_id": account_id, "key_id": key_id, "cost_units": cost_units,
            "created_at": now(), "usage_source": "engine", "backend": None, **row}


def _move(c, account_id: int, key_id: int | None, balance: int = 0, held: int = 0, spent: int = 0) -> None:
    if balance:
        c.execute(_MOVE_BALANCE, {"d": balance, "id": account_id})
    if key_id is not None and (held or spent):
        c.execute(_MOVE_KEY, {"held": held, "spent": spent, "id": key_id})


def _is_open(h):
    """A hold entry (of the aliased ledger `h`) with no release for its request."""
    r = ledger.alias("r")
    return sa.and_(h.c.kind == "hold", ~sa.exists().where(r.c.request_id == h.c.request_id, r.c.kind == "release"))

