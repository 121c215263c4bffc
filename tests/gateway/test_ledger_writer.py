"""The ledger's writer thread (storage/ledger_writer.py) on real databases: many holds and settlements share a
transaction, yet each behaves as if it had its own: refusals and failures stay with their operation, every
queued operation runs, and a request cancelled while its hold is placed leaves no hold open."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
import sqlalchemy as sa

from tests.gateway.dbs import BACKENDS, fresh_database
from tests.gateway.test_ledger import ROW
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price
from thinkgate.gateway.providers.base import PreparedRequest
from thinkgate.gateway.service import Caller, Gateway
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.ledger import KeyUnusable, Ledger
from thinkgate.storage.ledger_writer import LedgerWriter
from thinkgate.storage.schema import ledger as ledger_table


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


def hold_op(ledger, rid, account_id, units):
    return partial(ledger.hold_on, request_id=rid, account_id=account_id, key_id=None, owner="me",
                   plan=lambda avail: units if avail >= units else None)


def settle_op(ledger, rid, cost):
    return partial(ledger.settle_on, request_id=rid, cost_units=cost, row=ROW)


def test_concurrent_operations_share_transactions_and_keep_the_invariant(db):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    accts = [store.create_account(f"a{i}", balance_units=1_000) for i in range(4)]

    async def one(i):
        acct = accts[i % 4]
        held = await writer.submit(hold_op(ledger, f"r{i}", acct.id, 70), acct.id)
        if held is None:
            return 0
        return (await writer.submit(settle_op(ledger, f"r{i}", 30 + i % 7), acct.id)).cost_units

    async def main():
        return await asyncio.gather(*(one(i) for i in range(200)))

    try:
        spent = asyncio.run(main())
    finally:
        writer.close()
    assert writer.operations > writer.batches  # operations were grouped: fewer commits than operations
    for k, acct in enumerate(accts):
        mine = [s for i, s in enumerate(spent) if i % 4 == k]
        # 1000 units pay 14 holds of 70 at a time; each settlement frees 70 - cost, so more than 14 run
        assert sum(1 for s in mine if s) >= 14
        assert store.account(acct.name).balance_units == 1_000 - sum(mine) >= 0
    assert ledger.open_holds() == 0


def test_a_refusal_stays_with_its_operation(db):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=1_000)

    async def main():
        ops = [writer.submit(hold_op(ledger, "ok1", acct.id, 100), acct.id),
               writer.submit(settle_op(ledger, "never-held", 5), acct.id),  # LookupError: no hold
               writer.submit(partial(ledger.hold_on, request_id="k", account_id=acct.id, key_id=10**6,
                                     owner="me", plan=lambda a: 1), acct.id),  # KeyUnusable: no such key
               writer.submit(hold_op(ledger, "ok2", acct.id, 200), acct.id)]
        return await asyncio.gather(*ops, return_exceptions=True)

    try:
        ok1, missing, unusable, ok2 = asyncio.run(main())
    finally:
        writer.close()
    assert (ok1, ok2) == (100, 200)
    assert isinstance(missing, LookupError) and isinstance(unusable, KeyUnusable)
    assert store.account("a").balance_units == 700


def test_a_failing_operation_rolls_back_alone(db):
    """An operation that fails after writing takes its writes back with it, and only its own: the rest of
    its batch runs again, each alone, and commits."""
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=1_000)

    def half_then_fail(cur):
        ledger.hold_on(cur, "bad", acct.id, None, "me", lambda a: 300)  # written, then...
        raise RuntimeError("boom")

    async def main():
        ops = [writer.submit(hold_op(ledger, f"good{i}", acct.id, 10), acct.id) for i in range(5)]
        ops.insert(2, writer.submit(half_then_fail, acct.id))
        ops += [writer.submit(hold_op(ledger, f"late{i}", acct.id, 10), acct.id) for i in range(5)]
        return await asyncio.gather(*ops, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        writer.close()
    assert isinstance(results[2], RuntimeError)
    assert [r for i, r in enumerate(results) if i != 2] == [10] * 10
    assert store.account("a").balance_units == 900
    with db.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(ledger_table)
                         .where(ledger_table.c.request_id == "bad")).scalar_one() == 0


def test_close_runs_what_is_queued(db):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=1_000)

    async def main():
        futs = [writer.submit(hold_op(ledger, f"r{i}", acct.id, 1), acct.id) for i in range(50)]
        await asyncio.to_thread(writer.close)  # before anyone awaited them
        return [f.result() for f in futs]

    assert asyncio.run(main()) == [1] * 50
    assert store.account("a").balance_units == 950


def test_a_request_cancelled_while_its_hold_is_placed_leaves_no_hold(db):
    store = AccountStore(db)
    acct = store.create_account("a", balance_units=10**9)
    key = store.create_key("a", "k", "h" * 64, "sk-tg-x", rpm=10**6)
    gw = Gateway(db, {"m": Price.cny("0.001", "0.002")}, require_keys=True, limiter=MemoryRateLimiter())
    gw.start_sync()
    caller = Caller(store.account("a"), key)

    class Params:
        n = 1

    prepared = PreparedRequest(Params(), "none", prompt_tokens=10, max_tokens=100)

    async def main():
        for i in range(20):
            task = asyncio.ensure_future(gw.admit(caller, f"c{i}", "m", gw.prices["m"], prepared))
            await asyncio.sleep(0)  # the hold is queued...
            task.cancel()  # ...and its request goes away before the answer
            with pytest.raises(asyncio.CancelledError):
                await task
        await gw.aclose()

    asyncio.run(main())
    assert gw.ledger.open_holds() == 0
    assert store.account("a").balance_units == 10**9  # released whole: nothing was generated
    assert acct.id == caller.account.id


def test_sqlite_checkpoints_run_off_the_writer(tmp_path, monkeypatch):
    """The writer's connection never checkpoints inside a commit; the checkpointer thread keeps the log short."""
    from thinkgate.storage import ledger_writer
    from thinkgate.storage.db import Database

    monkeypatch.setattr(ledger_writer, "CHECKPOINT_EVERY", 10)
    db = Database(f"sqlite:///{tmp_path}/cp.db")
    db.upgrade()
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=10**9)

    async def main():
        for i in range(200):  # one at a time: 200 commits
            await writer.submit(hold_op(ledger, f"r{i}", acct.id, 1), acct.id)
        return writer._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]

    try:
        autocheckpoint = asyncio.run(main())
    finally:
        writer.close()
    assert autocheckpoint == 0
    assert writer.checkpoints >= 1
    wal = tmp_path / "cp.db-wal"
    import sqlite3

    with sqlite3.connect(tmp_path / "cp.db") as c:  # everything the writer committed is in the database file
        busy, frames, copied = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and copied == frames and wal.exists()
    assert store.account("a").balance_units == 10**9 - 200
    db.dispose()
