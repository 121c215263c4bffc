"""PostgreSQL's hot ledger operations as single statements: the hold, the settlement (migration 0004's
functions) and the usage row of an unpriced request. Each is a transaction by itself, so it needs no BEGIN or
COMMIT around it: one round trip. Each also has a batch form over arrays, so that many operations of a kind
queued at once are still one statement, one round trip, one commit (storage/ledger_lane.py runs them).

Written with asyncpg's $n placeholders; `Call.run` runs the single form on a psycopg cursor (the synchronous
Ledger.hold / settle on PostgreSQL).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Statement:
    single: str
    batch: str  # over arrays of each argument; answers rows of (ordinal, answer)
    returns: bool  # False: the statement answers nothing (its operations' answers are None)
    pack: Callable[[list[tuple]], tuple] | None = None  # the batch's parameters, when not one array per argument

    @property
    def psycopg(self) -> str:
        return re.sub(r"\$\d+", "%s", self.single)


def _arrays(args: list[tuple]) -> tuple:
    return tuple(list(column) for column in zip(*args, strict=True))


STATEMENTS = {
    "hold": Statement(
        "SELECT thinkgate_hold($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        "SELECT u.ord, thinkgate_hold(u.r, u.a, u.k, u.o, u.t, u.p, u.w, u.n, u.i, u.x) FROM unnest("
        "$1::varchar[], $2::int[], $3::int[], $4::varchar[], $5::timestamptz[], $6::bigint[], $7::bigint[], "
        "$8::int[], $9::bigint[], $10::bigint[]) WITH ORDINALITY AS u(r, a, k, o, t, p, w, n, i, x, ord)",
        returns=True, pack=_arrays),
    "settle": Statement(
        "SELECT thinkgate_settle($1, $2, $3, $4::jsonb)",
        "SELECT u.ord, thinkgate_settle(u.r, u.c, u.t, u.j) FROM unnest("
        "$1::varchar[], $2::bigint[], $3::timestamptz[], $4::jsonb[]) WITH ORDINALITY AS u(r, c, t, j, ord)",
        returns=True, pack=_arrays),
    # ON CONFLICT: idempotent by request id, as on SQLite. The row is a JSON object of every usage column.
    "record": Statement(
        "INSERT INTO usage SELECT * FROM jsonb_populate_record(NULL::usage, $1::jsonb) "
        "ON CONFLICT (request_id) DO NOTHING",
        "INSERT INTO usage SELECT * FROM jsonb_populate_recordset(NULL::usage, $1::jsonb) "
        "ON CONFLICT (request_id) DO NOTHING",
        returns=False, pack=lambda args: ("[" + ",".join(a[0] for a in args) + "]",)),
}


@dataclass(frozen=True)
class Call:
    """One ledger operation on PostgreSQL: a STATEMENTS kind, its arguments, and `finish`, which turns the
    statement's answer (None for a statement that answers nothing) into the operation's result or raises
    LookupError, a refusal (the functions refuse before they write, answering a status)."""

    kind: str
    args: tuple
    finish: Callable[[Any], Any]

    def run(self, cur) -> Any:
        """On a synchronous psycopg cursor."""
        statement = STATEMENTS[self.kind]
        cur.execute(statement.psycopg, self.args)
        return self.finish(cur.fetchone()[0] if statement.returns else None)
