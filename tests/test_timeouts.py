"""appliance.timeouts.within: the request path's one bounded await.

``asyncio.wait_for`` before Python 3.12 drops the caller's cancellation when the awaited thing
finishes in the same loop turn (CPython gh-86296); a client hanging up just as its next token was
ready then went unnoticed, and its generation ran on to ``max_tokens``.
"""

from __future__ import annotations

import asyncio

import pytest

from appliance.timeouts import within


async def test_a_cancellation_in_the_turn_the_awaitable_completes_is_not_lost() -> None:
    loop = asyncio.get_running_loop()
    for _ in range(20):
        ready: asyncio.Future[int] = loop.create_future()
        task = asyncio.ensure_future(within(ready, 5.0))
        await asyncio.sleep(0)  # the task now waits on ``ready``
        ready.set_result(1)  # the result and the hang-up land in the same turn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_within_returns_the_result_times_out_and_may_be_unbounded() -> None:
    assert await within(asyncio.sleep(0, result="done"), 1.0) == "done"
    assert await within(asyncio.sleep(0.01, result="slow"), None) == "slow"
    with pytest.raises(asyncio.TimeoutError):
        await within(asyncio.sleep(5), 0.02)


async def test_a_timed_out_awaitable_is_cancelled_not_left_running() -> None:
    started, finished = asyncio.Event(), []

    async def work() -> None:
        started.set()
        try:
            await asyncio.sleep(5)
        finally:
            finished.append(True)

    with pytest.raises(asyncio.TimeoutError):
        await within(work(), 0.02)
    await asyncio.sleep(0)
    assert started.is_set() and finished == [True]
