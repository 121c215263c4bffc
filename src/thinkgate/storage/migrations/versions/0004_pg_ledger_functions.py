"""PostgreSQL: the hold and the settlement as server-side functions (one statement, one round trip each)

On PostgreSQL a hold was five statements in two round trips and a settlement six in two, each statement
costing the gateway ~0.1 ms of psycopg's Python and the server a parse/plan/execute on the cores the gateway
shares; as functions each is one statement in one round trip (measured in BENCHMARKS.md, "Gateway overhead").
They do exactly what storage/ledger.py's Python path does on SQLite (same entries, same moves, same
refusals), and tests/gateway/test_pg_ledger_functions.py holds the two to the same answers.
SQLite gets nothing here: it has no server-side language, and its statements cost no round trip.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The plan of a hold (storage/ledger.py HoldPlan.__call__, to the letter): the most completion tokens per
# choice (<= want / n) that `avail` units pay for after the prompt, and the units that costs, rounded up once
# (gateway/money.py's rule). Returns {units, tokens per choice}, or NULL when not even one token per choice
# is affordable. numeric, not bigint: avail * 1000 must not overflow for any balance.
PLAN = """
CREATE OR REPLACE FUNCTION thinkgate_hold_plan(avail bigint, prompt bigint, want bigint, n integer,
                                               price_in bigint, price_out bigint)
RETURNS bigint[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    tokens numeric;
    per bigint;
BEGIN
    IF price_out = 0 THEN
        tokens := CASE WHEN ceil((prompt::numeric * price_in) / 1000) <= avail THEN want ELSE 0 END;
    ELSE
        tokens := greatest(0, least(want, floor((avail::numeric * 1000 - prompt::numeric * price_in) / price_out)));
    END IF;
    per := floor(tokens / n);
    IF per < 1 THEN
        RETURN NULL;
    END IF;
    RETURN ARRAY[ceil((prompt::numeric * price_in + (per * n)::numeric * price_out) / 1000)::bigint, per];
END $$;
"""

# A hold: lock the account (and the key, refused when revoked or expired at p_now), plan against what is
# available, append the hold entry and move the balance and the key's held units. Returns {status, units,
# tokens per choice}: status 0 held, 1 nothing affordable (402), 2 key unusable (401).
HOLD = """
CREATE OR REPLACE FUNCTION thinkgate_hold(p_request varchar, p_account integer, p_key integer, p_owner varchar,
                                          p_now timestamptz, prompt bigint, want bigint, n integer,
                                          price_in bigint, price_out bigint)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    bal bigint;
    lim bigint;
    spent bigint;
    held bigint;
    avail bigint;
    plan bigint[];
BEGIN
    IF p_key IS NULL THEN
        SELECT balance_units INTO bal FROM accounts WHERE id = p_account FOR UPDATE;
        IF NOT FOUND THEN
            RETURN ARRAY[2, 0, 0];
        END IF;
    ELSE
        SELECT a.balance_units, k.limit_units, k.spent_units, k.held_units INTO bal, lim, spent, held
        FROM accounts a JOIN api_keys k ON k.account_id = a.id
        WHERE a.id = p_account AND k.id = p_key AND k.revoked_at IS NULL
          AND (k.expires_at IS NULL OR k.expires_at > p_now)
        FOR UPDATE;
        IF NOT FOUND THEN
            RETURN ARRAY[2, 0, 0];
        END IF;
    END IF;
    avail := CASE WHEN lim IS NULL THEN bal ELSE least(bal, lim - spent - held) END;
    plan := thinkgate_hold_plan(greatest(avail, 0), prompt, want, n, price_in, price_out);
    IF plan IS NULL THEN
        RETURN ARRAY[1, 0, 0];
    END IF;
    INSERT INTO ledger (account_id, key_id, request_id, kind, amount_units, owner, note, created_at)
    VALUES (p_account, p_key, p_request, 'hold', plan[1], p_owner, NULL, p_now);
    IF plan[1] <> 0 THEN
        UPDATE accounts SET balance_units = balance_units - plan[1] WHERE id = p_account;
        IF p_key IS NOT NULL THEN
            UPDATE api_keys SET held_units = held_units + plan[1] WHERE id = p_key;
        END IF;
    END IF;
    RETURN ARRAY[0, plan[1], plan[2]];
END $$;
"""

# A settlement: lock the request's hold, then (a fresh snapshot: a settlement that committed meanwhile is
# seen) answer a repeat with the first settlement, or capture min(cost, hold), release the rest, move the
# balance and the key, and write the usage row from p_usage (a JSON object of the usage columns the caller
# knows; account, key and cost are filled in here). Returns {status, cost, first}: status 0 settled,
# 1 no hold for this request (a LookupError in Python); first is 1 for the settlement that did the work.
SETTLE = """
CREATE OR REPLACE FUNCTION thinkgate_settle(p_request varchar, p_cost bigint, p_now timestamptz, p_usage jsonb)
RETURNS bigint[] LANGUAGE plpgsql AS $$
DECLARE
    h ledger%ROWTYPE;
    done_cost bigint;
    cost bigint := p_cost;
BEGIN
    SELECT * INTO h FROM ledger WHERE request_id = p_request AND kind = 'hold' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN ARRAY[1, 0, 0];
    END IF;
    SELECT amount_units INTO done_cost FROM ledger WHERE request_id = p_request AND kind = 'capture';
    IF FOUND THEN
        RETURN ARRAY[0, done_cost, 0];
    END IF;
    PERFORM 1 FROM ledger WHERE request_id = p_request AND kind = 'release';
    IF FOUND THEN
        RETURN ARRAY[0, 0, 0];  -- reaped: released whole, nothing captured
    END IF;
    IF cost > h.amount_units THEN
        cost := h.amount_units;  -- never past the hold (the caller logs it)
    END IF;
    INSERT INTO ledger (account_id, key_id, request_id, kind, amount_units, owner, note, created_at)
    VALUES (h.account_id, h.key_id, p_request, 'capture', cost, NULL, NULL, p_now),
           (h.account_id, h.key_id, p_request, 'release', h.amount_units - cost, NULL, NULL, p_now);
    IF h.amount_units - cost <> 0 THEN
        UPDATE accounts SET balance_units = balance_units + (h.amount_units - cost) WHERE id = h.account_id;
    END IF;
    IF h.key_id IS NOT NULL AND (h.amount_units <> 0 OR cost <> 0) THEN
        UPDATE api_keys SET held_units = held_units - h.amount_units, spent_units = spent_units + cost
        WHERE id = h.key_id;
    END IF;
    -- FROM, not SELECT (f(...)).*, which would call the function once per column
    INSERT INTO usage SELECT * FROM jsonb_populate_record(NULL::usage, p_usage || jsonb_build_object(
        'request_id', p_request, 'account_id', h.account_id, 'key_id', h.key_id, 'cost_units', cost,
        'created_at', p_now))
    ON CONFLICT (request_id) DO NOTHING;
    RETURN ARRAY[0, cost, 1];
END $$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for sql in (PLAN, HOLD, SETTLE):
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS thinkgate_settle(varchar, bigint, timestamptz, jsonb)")
    op.execute("DROP FUNCTION IF EXISTS thinkgate_hold(varchar, integer, integer, varchar, timestamptz, bigint, "
               "bigint, integer, bigint, bigint)")
    op.execute("DROP FUNCTION IF EXISTS thinkgate_hold_plan(bigint, bigint, bigint, integer, bigint, bigint)")
