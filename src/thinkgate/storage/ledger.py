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
from thinkgate.storage.schema import accounts, api_keys, instances, ledger, usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    cost_units: int
    first: bool  # False when the request had already been settled (an idempotent repeat)


class Ledger:
    def __init__(self, db: Database):
        self.db = db

    def hold(self, request_id: str, account_id: int, key_id: int | None, owner: str,
             plan: Callable[[int], int | None]) -> int | None:
        """Lock the account (and key), call `plan(available units)`, and hold what it returns; None from
        `plan` holds nothing. Returns the units held, or None."""
        with self.db.begin() as c:
            balance = c.execute(sa.select(accounts.c.balance_units).where(accounts.c.id == account_id)
                                .with_for_update()).scalar_one()
            available = balance
            if key_id is not None:
                k = c.execute(sa.select(api_keys.c.limit_units, api_keys.c.spent_units, api_keys.c.held_units)
                              .where(api_keys.c.id == key_id).with_for_update()).one()
                if k.limit_units is not None:
                    available = min(available, k.limit_units - k.spent_units - k.held_units)
            units = plan(max(available, 0))
            if units is None:
                return None
            assert 0 <= units <= available, (units, available)
            c.execute(ledger.insert().values(account_id=account_id, key_id=key_id, request_id=request_id, kind="hold",
                                             amount_units=units, owner=owner, created_at=now()))
            _move(c, account_id, key_id, balance=-units, held=units)
            return units

    def settle(self, request_id: str, cost_units: int, row: dict) -> Settled:
        """Capture the cost (at most the hold), release the rest and write the usage row, in one transaction.
        Idempotent by request id: a repeat returns the first settlement."""
        with self.db.begin() as c:
            hold = c.execute(sa.select(ledger).where(ledger.c.request_id == request_id, ledger.c.kind == "hold")
                             .with_for_update()).first()
            if hold is None:
                raise LookupError(f"no hold for {request_id}")
            done = c.execute(sa.select(ledger.c.amount_units).where(ledger.c.request_id == request_id,
                                                                     ledger.c.kind == "capture")).first()
            if done is not None:
                return Settled(done.amount_units, first=False)
            if c.execute(sa.select(ledger.c.id).where(ledger.c.request_id == request_id,
                                                       ledger.c.kind == "release")).first() is not None:
                return Settled(0, first=False)  # reaped: released whole, nothing captured
            if cost_units > hold.amount_units:
                # Cannot happen for requests whose cap the hold covered; never let it take the balance below 0.
                log.error("request %s cost %d units over its hold of %d: capped", request_id, cost_units,
                          hold.amount_units)
                cost_units = hold.amount_units
            entries = [{"kind": "capture", "amount_units": cost_units},
                       {"kind": "release", "amount_units": hold.amount_units - cost_units}]
            c.execute(ledger.insert(), [{"account_id": hold.account_id, "key_id": hold.key_id,
                                         "request_id": request_id, "created_at": now(), **e} for e in entries])
            _move(c, hold.account_id, hold.key_id, balance=hold.amount_units - cost_units,
                  held=-hold.amount_units, spent=cost_units)
            c.execute(usage.insert().values(request_id=request_id, account_id=hold.account_id, key_id=hold.key_id,
                                            cost_units=cost_units, created_at=now(), **row))
            return Settled(cost_units, first=True)

    def record(self, request_id: str, account_id: int, key_id: int | None, cost_units: int, row: dict) -> None:
        """A usage row for a request that held nothing (an open server's anonymous account): metered, not
        charged. Idempotent by request id."""
        with self.db.begin() as c:
            if c.execute(sa.select(usage.c.request_id).where(usage.c.request_id == request_id)).first() is None:
                c.execute(usage.insert().values(request_id=request_id, account_id=account_id, key_id=key_id,
                                                cost_units=cost_units, created_at=now(), **row))

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


def _move(c, account_id: int, key_id: int | None, balance: int = 0, held: int = 0, spent: int = 0) -> None:
    if balance:
        c.execute(accounts.update().where(accounts.c.id == account_id)
                  .values(balance_units=accounts.c.balance_units + balance))
    if key_id is not None and (held or spent):
        c.execute(api_keys.update().where(api_keys.c.id == key_id).values(
            held_units=api_keys.c.held_units + held, spent_units=api_keys.c.spent_units + spent))


def _is_open(h):
    """A hold entry (of the aliased ledger `h`) with no release for its request."""
    r = ledger.alias("r")
    return sa.and_(h.c.kind == "hold", ~sa.exists().where(r.c.request_id == h.c.request_id, r.c.kind == "release"))

