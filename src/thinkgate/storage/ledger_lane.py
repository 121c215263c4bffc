"""PostgreSQL's ledger operations on the event loop itself: one asyncpg connection and one task per loop.

What storage/ledger_writer.py's thread does for SQLite, without the thread. A keyed request holds and settles
once each; on this kind of machine each switch to another thread and back, and each wake-up of the database's
process, costs more than the statement (measured: a hold or settlement through the thread and psycopg took
~1.6 ms in the served benchmark, ~1.2 ms here; BENCHMARKS.md "Gateway overhead"). So:
- every operation is one statement, a transaction by itself (storage/pg_calls.py): no BEGIN, no COMMIT;
- operations queued while a statement runs are sent together: one statement per kind over arrays (one round
  trip and one commit for all the holds of a batch), in the order of their accounts, so that two gateway
  processes lock account rows in the same order;
- a refusal (unknown request, key revoked, nothing affordable) is an answer, not an error: the functions
  refuse before they write;
- any other failure of a batched statement (a deadlock, a lost connection) rolled back all of it, and each of
  its operations runs again alone, so one bad operation never takes another's hold or settlement with it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import sqlalchemy as sa

from thinkgate.storage.pg_calls import STATEMENTS, Call

log = logging.getLogger(__name__)


class Refusal:
    """An operation's LookupError, delivered to its waiter as its answer (the batch went on without it)."""

    __slots__ = ("error",)

    def __init__(self, error: LookupError):
        self.error = error


class Lane:
    def __init__(self, url: str, max_batch: int, counts: Any):
        # asyncpg takes a libpq-style URL: the SQLAlchemy one without its "+psycopg" driver name.
        self.dsn = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.max_batch = max_batch
        self.counts = counts  # has .batches and .operations (the writer's, which tests and benchmarks read)
        self._items: list[tuple[int, Call, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._conn = None
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="thinkgate-ledger-lane")

    def put(self, account_id: int, call: Call, fut: asyncio.Future) -> None:
        if self._closing:
            raise RuntimeError("the ledger is closed")
        self._items.append((account_id, call, fut))
        self._wake.set()

    async def aclose(self) -> None:
        """Run what is queued, then close the connection."""
        self._closing = True
        self._wake.set()
        await self._task

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._items:
                    batch, self._items = self._items[:self.max_batch], self._items[self.max_batch:]
                    batch.sort(key=lambda item: item[0])
                    kinds: dict[str, list] = {}
                    for item in batch:
                        kinds.setdefault(item[1].kind, []).append(item)
                    for items in kinds.values():
                        results = await self._run_kind([call for _, call, _ in items])
                        settle_futures([(fut, r) for (_, _, fut), r in zip(items, results, strict=True)])
                if self._closing:
                    return
        finally:
            if self._conn is not None:
                await self._conn.close()

    async def _run_kind(self, calls: list[Call]) -> list:
        try:
            answers = await self._statement(calls)
        except Exception as e:
            if len(calls) == 1:
                return [e]
            log.warning("a ledger batch of %d failed (%s: %s); running each alone", len(calls),
                        type(e).__name__, e)
            return [(await self._run_kind([call]))[0] for call in calls]
        self.counts.batches += 1
        self.counts.operations += len(calls)
        return [_finished(call, answer) for call, answer in zip(calls, answers, strict=True)]

    async def _statement(self, calls: list[Call]) -> list:
        import asyncpg  # only where PostgreSQL is used

        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)
        statement = STATEMENTS[calls[0].kind]
        try:
            if len(calls) == 1:
                answer = await self._conn.fetchval(statement.single, *calls[0].args)
                return [answer if statement.returns else None]
            rows = await self._conn.fetch(statement.batch, *statement.pack([call.args for call in calls]))
        except (OSError, asyncpg.InterfaceError, asyncpg.exceptions.ConnectionDoesNotExistError):
            await self._drop()
            raise
        if not statement.returns:
            return [None] * len(calls)
        answers: list = [None] * len(calls)
        for ordinal, answer in rows:
            answers[ordinal - 1] = answer
        return answers

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _finished(call: Call, answer: Any) -> Any:
    try:
        return call.finish(answer)
    except LookupError as e:
        return Refusal(e)


def settle_futures(pairs: list) -> None:
    for fut, result in pairs:
        if fut.done():  # its request was cancelled meanwhile: only the answer is lost
            continue
        if isinstance(result, Refusal):
            fut.set_exception(result.error)
        elif isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
