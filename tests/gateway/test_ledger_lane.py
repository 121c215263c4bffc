"""The gateway's own ledger operations (Ledger.hold_op / settle_op / record_op with a HoldPlan) through the
writer: on SQLite the writer's thread and Python's arithmetic, on PostgreSQL the event loop's lane
(storage/ledger_lane.py) and migration 0004's functions. Both backends run the same assertions, so the
functions are held to what the Python path does; the plan's arithmetic is also compared directly."""

from __future__ import annotations

import asyncio
import random

import pytest
import sqlalchemy as sa

from tests.gateway.dbs import BACKENDS, fresh_database
from tests.gateway.test_ledger import ROW
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.ledger import HoldPlan, KeyUnusable, Ledger
from thinkgate.storage.ledger_writer import LedgerWriter
from thinkgate.storage.schema import ledger as ledger_table
from thinkgate.storage.schema import usage as usage_table


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


def plan(want: int, prompt: int = 10, n: int = 1, price_in: int = 2, price_out: int = 1000) -> HoldPlan:
    """Units per 1000 tokens: with price_out 1000 a completion token costs one unit."""
    return HoldPlan(prompt, want, n, price_in, price_out)


def test_holds_and_settlements_of_many_requests_keep_the_invariant(db):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    accts = [store.create_account(f"a{i}", balance_units=1_000) for i in range(4)]
    keys = [store.create_key(a.name, f"k{i}", f"{i}" * 64, "sk-tg-x") for i, a in enumerate(accts)]

    async def one(i):
        acct, key = accts[i % 4], keys[i % 4]
        p = plan(70)
        held = await writer.submit(ledger.hold_op(f"r{i}", acct.id, key.id, "me", p), acct.id)
        if held is None:
            return 0, None
        assert held == -(-(10 * 2 + p.tokens_per_choice * 1000) // 1000)  # the prompt's 0.02 rounds up
        settled = await writer.submit(ledger.settle_op(f"r{i}", 5 + i % 60, ROW), acct.id)
        return settled.cost_units, p.tokens_per_choice

    async def main():
        out = await asyncio.gather(*(one(i) for i in range(200)))
        await writer.aclose()
        return out

    results = asyncio.run(main())
    assert writer.operations > writer.batches  # operations queued together went out together
    lowered = [t for _, t in results if t is not None and t < 70]
    assert lowered  # some holds met a balance that paid less than the cap, and were lowered
    for k, acct in enumerate(accts):
        spent = sum(c for i, (c, _) in enumerate(results) if i % 4 == k)
        assert store.account(acct.name).balance_units == 1_000 - spent >= 0
        with db.engine.connect() as c:
            captured = c.execute(sa.select(sa.func.sum(ledger_table.c.amount_units)).where(
                ledger_table.c.account_id == acct.id, ledger_table.c.kind == "capture")).scalar_one()
            billed = c.execute(sa.select(sa.func.sum(usage_table.c.cost_units)).where(
                usage_table.c.account_id == acct.id)).scalar_one()
        assert captured == billed == spent
        key = store.key(f"k{k}")
        assert (key.spent_units, key.held_units) == (spent, 0)
    assert ledger.open_holds() == 0


def test_refusals_and_repeats_are_answers(db):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=1_000)
    key = store.create_key("a", "k", "a" * 64, "sk-tg-x")
    gone = store.create_key("a", "gone", "b" * 64, "sk-tg-y")
    store.revoke_key("gone")
    poor = store.create_account("poor", balance_units=5)

    async def main():
        first = [writer.submit(ledger.hold_op("ok", acct.id, key.id, "me", plan(100)), acct.id),
                 writer.submit(ledger.hold_op("revoked", acct.id, gone.id, "me", plan(1)), acct.id),
                 writer.submit(ledger.hold_op("broke", poor.id, None, "me", plan(100, prompt=10_000)), poor.id),
                 writer.submit(ledger.settle_op("never-held", 5, ROW), acct.id)]
        out = await asyncio.gather(*first, return_exceptions=True)
        out.append(await writer.submit(ledger.settle_op("ok", 40, ROW), acct.id))
        out.append(await writer.submit(ledger.settle_op("ok", 99, ROW), acct.id))  # a repeat
        await writer.aclose()
        return out

    ok, revoked, broke, missing, settled, again = asyncio.run(main())
    assert ok == 101 and isinstance(revoked, KeyUnusable) and broke is None
    assert isinstance(missing, LookupError) and not isinstance(missing, KeyUnusable)
    assert (settled.cost_units, settled.first) == (40, True) and (again.cost_units, again.first) == (40, False)
    assert store.account("a").balance_units == 960 and store.account("poor").balance_units == 5
    assert ledger.generation("ok")["cost_units"] == 40 and ledger.generation("never-held") is None


def test_a_settlement_over_its_hold_is_capped(db, caplog):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=1_000)

    async def main():
        await writer.submit(ledger.hold_op("r", acct.id, None, "me", plan(10)), acct.id)
        out = await writer.submit(ledger.settle_op("r", 500, ROW), acct.id)
        await writer.aclose()
        return out

    assert asyncio.run(main()).cost_units == 11  # the hold: 10 tokens and the prompt's 0.02 rounded up
    assert store.account("a").balance_units == 989
    assert "over its hold" in caplog.text


def test_records_of_unpriced_requests(db):
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("anon", balance_units=0)

    async def main():
        await asyncio.gather(*(writer.submit(ledger.record_op(f"m{i}", acct.id, None, 0, ROW), acct.id)
                               for i in range(30)))
        await writer.submit(ledger.record_op("m0", acct.id, None, 0, ROW), acct.id)  # idempotent
        await writer.aclose()

    asyncio.run(main())
    rows = ledger.totals("account")
    assert rows[0]["requests"] == 30 and rows[0]["prompt_tokens"] == 30 * ROW["prompt_tokens"]
    row = ledger.generation("m7")
    assert row["model"] == ROW["model"] and row["usage_source"] == "engine" and row["created_at"] is not None


@pytest.fixture
def pg(tmp_path):
    """The lane and the ledger functions are PostgreSQL's (SQLite runs the Python path)."""
    d = fresh_database("postgres", tmp_path)
    yield d
    d.dispose()


def test_a_failing_batch_runs_each_operation_alone(pg, caplog):
    """Two holds of one request id in one batch: the batch's statement fails on the unique index, then each
    runs alone: one holds, the other fails by itself, and the rest of the batch holds."""
    db = pg
    store, ledger, writer = AccountStore(db), Ledger(db), LedgerWriter(db)
    acct = store.create_account("a", balance_units=1_000)

    async def main():
        futs = [writer.submit(ledger.hold_op(f"r{i}", acct.id, None, "me", plan(10)), acct.id) for i in range(3)]
        futs.append(writer.submit(ledger.hold_op("r1", acct.id, None, "me", plan(10)), acct.id))
        out = await asyncio.gather(*futs, return_exceptions=True)
        await writer.aclose()
        return out

    out = asyncio.run(main())
    assert out[:3] == [11, 11, 11] and isinstance(out[3], Exception)
    assert store.account("a").balance_units == 1_000 - 33
    assert ledger.open_holds() == 3
    assert "a ledger batch of 4 failed" in caplog.text


def test_the_sql_plan_is_the_python_plan(pg):
    db = pg
    rng = random.Random(7)
    cases = [(rng.choice([0, 1, 7, 999, 10**4, 10**9, 10**15, 2**62]), rng.randint(0, 10**5), rng.randint(0, 10**5),
              rng.randint(1, 8), rng.choice([0, 1, 3, 275_000, 10**9]), rng.choice([0, 1, 7, 950_000, 10**9]))
             for _ in range(400)]
    with db.engine.connect() as c:
        for avail, prompt, want, n, pin, pout in cases:
            got = c.execute(sa.text("SELECT thinkgate_hold_plan(:a, :p, :w, :n, :i, :o)"),
                            {"a": avail, "p": prompt, "w": want, "n": n, "i": pin, "o": pout}).scalar_one()
            p = HoldPlan(prompt, want, n, pin, pout)
            units = p(avail)
            assert (got is None) == (units is None), (avail, prompt, want, n, pin, pout)
            if units is not None:
                assert got == [units, p.tokens_per_choice], (avail, prompt, want, n, pin, pout)
                assert units <= avail
