"""Money and the ledger on real databases (SQLite, PostgreSQL): exact amounts, a balance that never goes
negative under concurrency, settlement once per request, the crash reaper, single-use top-up codes."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pytest
import sqlalchemy as sa

from tests.gateway.dbs import BACKENDS, fresh_database
from thinkgate.gateway.keys import hash_secret, new_secret
from thinkgate.gateway.money import Price, json_number, to_cny, to_units
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.ledger import Ledger
from thinkgate.storage.schema import ledger as ledger_table

ROW = {"model": "m", "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 5, "reasoning_tokens": 2,
       "price_input_per_1k": 275_000, "price_output_per_1k": 950_000, "price_cached_per_1k": None,
       "finish_reason": "stop", "native_finish_reason": "eos", "ended_by": "finished", "cancelled": False,
       "latency_ms": 1.0, "ttft_ms": 0.5, "user": None}


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    d = fresh_database(request.param, tmp_path)
    yield d
    d.dispose()


def test_money_is_exact_and_rounds_up_once_per_request():
    seed = Price.cny("0.00275", "0.0095", "0.0011")
    assert (seed.input_per_1k, seed.output_per_1k, seed.cached_input_per_1k) == (275_000, 950_000, 110_000)
    # 1000 prompt tokens (400 cached) and 1 completion token: 600*275000 + 400*110000 + 950000 = 209,950,000 / 1000
    assert seed.cost(1000, 1, cached_tokens=400) == 209_950
    assert Price.cny("0.00000001", "0").cost(1, 0) == 1  # a thousandth of a unit still costs one unit
    assert to_cny(209_950) == Decimal("0.0020995") and json_number(209_950) == 0.0020995
    with pytest.raises(TypeError):
        to_units(0.1)
    with pytest.raises(ValueError):
        to_units("0.000000001")


def test_balance_equals_credits_minus_captures_minus_open_holds(db):
    store, ledger = AccountStore(db), Ledger(db)
    acct = store.create_account("a", balance_units=1000)
    key = store.create_key("a", "k", hash_secret(new_secret()), "sk-tg-x...", limit_units=600)
    assert ledger.hold("r1", acct.id, key.id, "me", lambda avail: min(avail, 400)) == 400
    assert store.account("a").balance_units == 600 and store.key("k").held_units == 400
    # The key's own limit (600, 400 held) leaves 200, less than the balance.
    assert ledger.hold("r2", acct.id, key.id, "me", lambda avail: avail) == 200
    assert ledger.open_holds() == 2
    first = ledger.settle("r1", 150, ROW)
    again = ledger.settle("r1", 999, ROW)
    assert (first.cost_units, first.first) == (150, True) and (again.cost_units, again.first) == (150, False)
    assert store.account("a").balance_units == 1000 - 150 - 200
    k = store.key("k")
    assert (k.spent_units, k.held_units) == (150, 200)
    assert ledger.open_holds() == 1
    kinds = [(e["kind"], e["amount_units"]) for e in ledger.entries(acct.id)]
    assert kinds == [("credit", 1000), ("hold", 400), ("hold", 200), ("capture", 150), ("release", 250)]
    assert ledger.generation("r1")["cost_units"] == 150 and ledger.generation("r2") is None


def test_a_plan_that_refuses_holds_nothing(db):
    store, ledger = AccountStore(db), Ledger(db)
    acct = store.create_account("poor", balance_units=5)
    assert ledger.hold("r", acct.id, None, "me", lambda avail: None) is None
    assert store.account("poor").balance_units == 5 and ledger.entries(acct.id)[-1]["kind"] == "credit"


def test_the_database_refuses_a_negative_balance(db):
    store, ledger = AccountStore(db), Ledger(db)
    acct = store.create_account("a", balance_units=10)
    with pytest.raises(ValueError):
        ledger.hold("r", acct.id, None, "me", lambda avail: avail + 1)
    with pytest.raises(sa.exc.IntegrityError), db.begin() as c:
        c.execute(sa.text("UPDATE accounts SET balance_units = -1 WHERE id = :i"), {"i": acct.id})


def test_concurrent_holds_never_overdraw(db):
    store, ledger = AccountStore(db), Ledger(db)
    acct = store.create_account("a", balance_units=1000)
    granted = []

    def one(i):
        units = ledger.hold(f"r{i}", acct.id, None, "me", lambda avail: 70 if avail >= 70 else None)
        granted.append(units)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [g for g in granted if g is not None]
    assert len(held) == 1000 // 70 and store.account("a").balance_units == 1000 - 70 * len(held)


def test_reaper_releases_only_the_holds_of_dead_instances(db):
    store, ledger = AccountStore(db), Ledger(db)
    acct = store.create_account("a", balance_units=100)
    ledger.register("dead", "h", 1)
    ledger.register("alive", "h", 2)
    ledger.hold("r-dead", acct.id, None, "dead", lambda a: 30)
    ledger.hold("r-alive", acct.id, None, "alive", lambda a: 20)
    assert ledger.reap(lambda host, pid, beat: pid == 1) == 1
    assert store.account("a").balance_units == 80 and ledger.open_holds() == 1
    assert ledger.settle("r-dead", 5, ROW).cost_units == 0  # released by the reaper: nothing to capture
    assert ledger.reap(lambda host, pid, beat: False) == 0
    assert isinstance(ledger.entries(acct.id)[-1]["created_at"], dt.datetime)


def test_one_code_redeemed_by_twenty_concurrent_callers_credits_once(db):
    store = AccountStore(db)
    accts = [store.create_account(f"a{i}") for i in range(20)]
    code = new_secret()
    store.create_codes("batch1", 500, [hash_secret(code)])
    results = []
    threads = [threading.Thread(target=lambda a=a: results.append(store.redeem(hash_secret(code), a.id)))
               for a in accts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: r or 0) == [None] * 19 + [500]
    assert sum(store.account(a.name).balance_units for a in accts) == 500
    with db.begin() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(ledger_table)
                         .where(ledger_table.c.kind == "credit")).scalar_one() == 1
