"""thinkgate.eager: a task's first step runs in the caller; afterwards it behaves as any task (result, exception,
cancellation), on asyncio's loop and on uvloop (what uvicorn serves with)."""

import asyncio

import pytest
import uvloop

from thinkgate.eager import eager_task

LOOPS = [pytest.param(asyncio.run, id="asyncio"), pytest.param(uvloop.run, id="uvloop")]


@pytest.mark.parametrize("run", LOOPS)
def test_the_first_step_runs_before_eager_task_returns(run):
    async def main():
        seen = []

        async def work():
            seen.append("first step")
            await asyncio.sleep(0.01)
            seen.append("rest")
            return 7

        t = eager_task(work())
        assert seen == ["first step"] and not t.done()
        assert await t == 7
        assert seen == ["first step", "rest"]

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_requests_in_a_burst_each_send_in_their_own_step(run):
    """Two requests queued together: started eagerly, each one's send comes right after its own intake; as plain
    tasks, both intakes run before either send (the gateway's burst, BENCHMARKS.md ninth round)."""

    async def main(spawn):
        order = []
        gate = asyncio.get_running_loop().create_future()

        async def send(name):
            order.append(f"{name} sent")
            await gate

        async def request(name):
            order.append(f"{name} intake")
            task = spawn(send(name))
            await asyncio.sleep(0)
            return task

        tasks = await asyncio.gather(request("a"), request("b"))
        gate.set_result(None)
        await asyncio.gather(*tasks)
        return order

    assert run(main(eager_task)) == ["a intake", "a sent", "b intake", "b sent"]
    assert run(main(asyncio.ensure_future)) == ["a intake", "b intake", "a sent", "b sent"]


@pytest.mark.parametrize("run", LOOPS)
def test_results_and_exceptions_with_and_without_a_suspension(run):
    async def main():
        async def value_now():
            return 1

        async def raise_now():
            raise ValueError("now")

        async def raise_later():
            await asyncio.sleep(0)
            raise KeyError("later")

        async def through_wait_for():  # what tripped a hand-made driver: a future awaited twice
            await asyncio.wait_for(asyncio.sleep(0.005), 1)
            await asyncio.sleep(0)  # a bare yield
            return await asyncio.shield(asyncio.sleep(0.001, result="shielded"))

        done = eager_task(value_now())
        assert done.done() and done.result() == 1
        with pytest.raises(ValueError, match="now"):
            await eager_task(raise_now())
        with pytest.raises(KeyError, match="later"):
            await eager_task(raise_later())
        assert await eager_task(through_wait_for()) == "shielded"

    run(main())


@pytest.mark.parametrize("run", LOOPS)
def test_cancelling_reaches_the_coroutine_where_it_waits(run):
    async def main():
        cleaned = []

        async def waits_forever():
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                await asyncio.sleep(0)  # cleanup may itself wait
                cleaned.append(True)

        t = eager_task(waits_forever())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert cleaned == [True] and t.cancelled()

        async def swallows():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return "kept going"

        t = eager_task(swallows())
        await asyncio.sleep(0)
        t.cancel()
        assert await t == "kept going"

        async def outer_cancelled_while_inner_done():
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)  # done: the cancellation comes at the next step instead
            await asyncio.sleep(0)
            await fut
            await asyncio.sleep(10)

        t = eager_task(outer_cancelled_while_inner_done())
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    run(main())
