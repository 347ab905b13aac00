"""A bounded await that never loses a cancellation.

``asyncio.wait_for`` before Python 3.12 runs its awaitable as a separate task, and when the
caller is cancelled in the same loop turn that the awaitable finishes, it returns the result and
drops the cancellation (CPython gh-86296). On a request path that cancellation is the client
hanging up: a probe's non-streamed chat whose client left after 3 s went on decoding to its
``max_tokens`` (1 in 4-8 hang-ups, 30+ s of a batch slot and its KV reservation each), because
``LiveStream`` took the next token through ``wait_for`` and the handler never learnt it was
cancelled. ``within`` is the one bounded await of the request path and the schedulers:
``asyncio.timeout`` from 3.11 (the awaitable runs in the caller's task, so a cancellation reaches
it directly); on 3.10 a task watched with ``asyncio.wait``, which re-raises the caller's
cancellation whatever the task did meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


def retrieve(fut: asyncio.Future[Any]) -> None:
    """A done-callback for a future or task given up on: it may still end in an exception, and
    reading it keeps asyncio from logging "... exception was never retrieved" (with a traceback,
    at ERROR) for an outcome nobody waits for any more."""
    if not fut.cancelled():
        fut.exception()


async def within(aw: Awaitable[T], seconds: float | None) -> T:
    """``await aw``, raising ``asyncio.TimeoutError`` after ``seconds`` (None: no bound); the
    caller's cancellation is never swallowed, even when ``aw`` completes in the same turn."""
    if seconds is None:
        return await aw
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):  # novermin (guarded by the version check)
            return await aw
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(retrieve)
        raise asyncio.TimeoutError
    return task.result()


__all__ = ["retrieve", "within"]
