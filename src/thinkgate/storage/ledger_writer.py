"""One thread that runs the ledger's hot operations (hold, settle, record), many to a transaction.

Every keyed request holds before it generates and settles after; run one by one, each is a trip to a
worker thread, a pooled connection's checkout, a BEGIN and a COMMIT, and on this kind of machine those cost
more than the statements themselves (measured on SQLite: ~0.35 ms of a hold's ~0.8 ms was SQLAlchemy's
connection and transaction handling, ~0.2 ms the commit). Here one thread owns one connection and takes
whatever operations are queued when it wakes, up to `max_batch`, into one transaction: one commit for all,
one wake-up of each event loop that waits on them (group commit, as databases do with their own log).
At one request at a time nothing waits for a batch to fill: a lone operation runs at once.

Semantics are those of one transaction per operation:
- an operation that refuses (LookupError: unknown request, key revoked) does so before writing anything
  (storage/ledger.py guarantees it), so the rest of its batch commits without it;
- any other failure (a constraint, a lost connection, a PostgreSQL deadlock) rolls the whole batch back and
  every operation of it runs again alone, in a transaction of its own, so one bad operation never takes
  another's hold or settlement with it;
- operations of a batch run in the order of their accounts, so two gateway processes' batches lock account
  rows in the same order (no deadlock between them on PostgreSQL).

On SQLite the writer's commits never checkpoint the write-ahead log: SQLite's automatic checkpoint runs inside
whichever commit crosses 1,000 pages and writes and syncs the database file there, ~20 ms for the request
that happens to commit it (about one in a hundred: the p99 of the gateway benchmark). A checkpointer thread
with a connection of its own does it instead, PASSIVE (it never blocks the writer), every CHECKPOINT_EVERY
commits.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from thinkgate.storage.db import Database
from thinkgate.storage.ledger_lane import Lane, Refusal, settle_futures
from thinkgate.storage.pg_calls import Call

log = logging.getLogger(__name__)
_STOP = object()
CHECKPOINT_EVERY = 64  # writer commits between two checkpoints (each commit is a few pages of the log)


class LedgerWriter:
    def __init__(self, db: Database, max_batch: int = 64):
        self.db = db
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fairy = None  # the pool's handle on this thread's connection: held, so the pool never lends it
        self._conn = None  # its DBAPI connection
        self._lock = threading.Lock()
        self.batches = 0  # how many transactions ran (tests and benchmarks read these)
        self.operations = 0
        self.checkpoints = 0
        self._checkpointer = _Checkpointer(db) if db.is_sqlite else None
        self._lanes: dict[asyncio.AbstractEventLoop, Lane] = {}

    def submit(self, op: Callable[[Any], Any] | Call, account_id: int) -> asyncio.Future:
        """Queue `op` to run inside a ledger transaction; the future gets its result or exception. Once
        queued it runs, whatever becomes of the future (a cancelled waiter loses only the answer).
        `op` is a function of a cursor (run on this writer's thread), or on PostgreSQL a Call: one statement,
        run on the event loop's own connection (storage/ledger_lane.py), which saves two thread switches."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if isinstance(op, Call) and not self.db.is_sqlite:
            lane = self._lanes.get(loop)
            if lane is None:
                lane = self._lanes[loop] = Lane(self.db.url, self.max_batch, self)
            lane.put(account_id, op, fut)
            return fut
        self._ensure_started()
        self._queue.put((account_id, op, loop, fut))
        return fut

    async def aclose(self) -> None:
        """Finish what is queued (this event loop's lane, then the thread) and stop."""
        lane = self._lanes.pop(asyncio.get_running_loop(), None)
        if lane is not None:
            await lane.aclose()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Finish what is queued, then stop the thread and close its connection."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self.checkpoints = self._checkpointer.done

    def _ensure_started(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="thinkgate-ledger", daemon=True)
                    self._thread.start()

    # -- the thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            stop = False
            while not stop:
                item = self._queue.get()
                if item is _STOP:
                    break
                batch = [item]
                while len(batch) < self.max_batch:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)
                self._deliver(batch, self._execute(batch))
        finally:
            self._disconnect()

    def _execute(self, batch: list) -> list:
        ordered = sorted(range(len(batch)), key=lambda i: batch[i][0])
        try:
            results = self._transaction([batch[i][1] for i in ordered])
        except Exception as e:
            if len(batch) == 1:
                return [e]
            log.warning("a ledger batch of %d failed (%s: %s); running each alone", len(batch),
                        type(e).__name__, e)
            return [self._execute([item])[0] for item in batch]
        out: list = [None] * len(batch)
        for i, r in zip(ordered, results, strict=True):
            out[i] = r
        return out

    def _transaction(self, ops: list[Callable]) -> list:
        """Run `ops` in one transaction; a LookupError is that operation's answer, anything else aborts all."""
        conn = self._connect()
        cur = conn.cursor()
        results = []
        try:
            if self.db.is_sqlite:
                cur.execute("BEGIN IMMEDIATE")  # the write lock up front (storage/db.py says why)
                for op in ops:
                    results.append(_refusal_or(op, cur))
                conn.commit()
            else:
                with conn.pipeline():  # statements whose answers are not read go out without a round trip
                    for op in ops:
                        results.append(_refusal_or(op, cur))
                    conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                self._disconnect(broken=True)  # one that cannot roll back is replaced on the next batch
            raise
        finally:
            try:
                cur.close()
            except Exception:
                pass
        self.batches += 1
        self.operations += len(ops)
        if self._checkpointer is not None and self.batches % CHECKPOINT_EVERY == 0:
            self._checkpointer.wake()
        return results

    def _connect(self):
        if self._conn is None:
            # Through the engine's pool, so the connection gets the same set-up as every other (SQLite's
            # PRAGMAs: WAL, busy timeout, foreign keys); this thread keeps it for its life.
            self._fairy = self.db.engine.raw_connection()
            self._conn = self._fairy.driver_connection
            if self.db.is_sqlite:
                self._conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's job (see above)
            else:
                self._conn.autocommit = False
        return self._conn

    def _disconnect(self, broken: bool = False) -> None:
        fairy, self._fairy, self._conn = self._fairy, None, None
        if fairy is not None:
            try:
                fairy.invalidate() if broken else fairy.close()  # close: back to the pool
            except Exception:
                pass

    @staticmethod
    def _deliver(batch: list, results: list) -> None:
        by_loop: dict = {}
        for (_, _, loop, fut), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((fut, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(settle_futures, pairs)
            except RuntimeError:  # that loop is closed: nobody waits for these any more
                pass


class _Checkpointer:
    """Checkpoints SQLite's write-ahead log off the writer's path, when woken."""

    def __init__(self, db: Database):
        self.db = db
        self.done = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="thinkgate-checkpoint", daemon=True)
            self._thread.start()
        self._wake.set()

    def close(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        fairy = self.db.engine.raw_connection()  # held for the thread's life, like the writer's
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                try:
                    fairy.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
                except Exception as e:  # a failed checkpoint only leaves the log longer: the next one retries
                    log.warning("WAL checkpoint failed: %s", e)
                if self._stop:
                    return
        finally:
            fairy.close()


def _refusal_or(op: Callable, cur) -> Any:
    try:
        return op(cur)
    except LookupError as e:
        return Refusal(e)


