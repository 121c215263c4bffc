"""Tasks whose first step runs at once, in the caller, as Python 3.12's eager tasks do.

Why: asyncio runs ready tasks first in, first out. In a burst of requests, one that hands its upstream call to a
new task waits, before that task first runs, for the intake of every request already queued on the loop: the
gateway then sent all 32 requests of a burst only after reading the last one (BENCHMARKS.md, "Gateway in front
of an upstream", ninth round). Started eagerly, a request's call goes out in the request's own step, and the
requests reach the upstream one by one as they arrive.

On 3.12+ this is `asyncio.Task(..., eager_start=True)`. On 3.11 the coroutine's first step is driven here and
the rest handed to a task that waits for what it waits for; one difference remains: during the first step,
`asyncio.current_task()` is the caller's task, so code that captures it (`asyncio.timeout`) must not run
before the coroutine's first suspension.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any


def eager_task(coro: Coroutine) -> asyncio.Future:
    """Run `coro` until it first waits, then as a task; a coroutine that finishes without waiting gives a done
    future (its result or exception), as an eager task does."""
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    try:
        waited = _taken(coro.send(None))
    except StopIteration as stop:
        done = loop.create_future()
        done.set_result(stop.value)
        return done
    except asyncio.CancelledError:
        done = loop.create_future()
        done.cancel()
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        done = loop.create_future()
        done.set_exception(e)
        return done
    return loop.create_task(_resume(coro, waited))


async def _resume(coro: Coroutine, waited: Any) -> Any:
    """Drive `coro` on from a suspension, as a task would: wait for the future it yielded (a bare yield: one turn
    of the loop), then resume it; the future's outcome reaches the coroutine through the future itself (its
    `await` reads the result or raises). This task's cancellation is thrown into the coroutine where it waits."""
    while True:
        try:
            if waited is None:
                await asyncio.sleep(0)
            else:
                await waited
        except asyncio.CancelledError as cancelled:
            try:
                waited = _taken(coro.throw(cancelled))
            except StopIteration as stop:
                return stop.value
            continue
        except GeneratorExit:  # this task's coroutine closed: close the driven one too
            coro.close()
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # noqa: BLE001 - the future's own exception: the coroutine reads it below
            pass
        try:
            waited = _taken(coro.send(None))
        except StopIteration as stop:
            return stop.value


def _taken(waited: Any) -> Any:
    """What a task does at once with the future its coroutine yielded: clear the future's "blocking" mark (set by
    the `await` that yielded it). Left set, the next coroutine to await that future would be refused ("await
    wasn't used with future"), and so would our own wait for it."""
    if getattr(waited, "_asyncio_future_blocking", False):
        waited._asyncio_future_blocking = False
    return waited
