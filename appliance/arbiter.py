"""The compute arbiter: engine time across models, granted by priority.

Every engine call (an embedding or tensor batch, a prefill chunk, a decode step) first takes a
grant. At most ``compute.concurrency`` grants are held at once; when one is released, the most
urgent waiting call gets it, whichever model it belongs to, because priority levels mean the same
in every model. This is the "time-sliced" half of the memory manager: on a GPU box the same grants
time-slice the device between the models' engines; on the CPU they keep a chat decode step and an
embedding batch from fighting over the same cores.

Urgency is the call's priority level improved by one level per ``compute.aging_ms`` of waiting
(on by default) so that a steady stream of priority-1 work cannot starve priority 3 forever; ties
go to the originally more urgent call, then to the earlier one. A priority-1 call therefore waits
at most for the calls already running when it arrives, unless a lower level has aged past it.

A waiter's priority may be raised while it waits (a batcher asks with its most urgent queued item,
and a more urgent one may arrive meanwhile). Cancelling a waiter withdraws it; a grant handed to a
waiter that was cancelled at the same time passes on, so no grant is ever lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol


class ArbiterObserver(Protocol):
    """Metrics hooks, called on the event loop; must be cheap and must not raise."""

    def on_grant(self, model: str, priority: int, waited_s: float) -> None: ...

    def on_waiting(self, priority: int, count: int) -> None: ...

    def on_running(self, count: int) -> None: ...


class Waiter:
    __slots__ = ("future", "model", "priority", "seq", "since")

    def __init__(
        self, model: str, priority: int, seq: int, since: float, future: asyncio.Future[None]
    ) -> None:
        self.model = model
        self.priority = priority
        self.seq = seq
        self.since = since
        self.future = future


class ComputeArbiter:
    def __init__(
        self,
        concurrency: int = 1,
        aging_ms: float = 1000.0,
        *,
        observer: ArbiterObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.aging_ms = aging_ms
        self.observer = observer
        self._clock = clock
        self._running = 0
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()
        self.granted = 0

    # -- public API ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def grant(self, model: str, priority: int) -> AsyncIterator[None]:
        """Hold a grant for the body (callers that promote while waiting use :meth:`waiter`,
        :meth:`acquire` and :meth:`release` instead)."""
        await self.acquire(model, priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, model: str, priority: int, *, waiter: Waiter | None = None) -> Waiter | None:
        """Take a grant (release it with :meth:`release`). Cancelling the wait withdraws it."""
        if self.try_acquire(model, priority):
            return None
        loop = asyncio.get_running_loop()
        w = waiter or Waiter(model, priority, next(self._seq), self._clock(), loop.create_future())
        self._waiters.append(w)
        self._observe_waiting(w.priority)
        try:
            await w.future
        except asyncio.CancelledError:
            if w in self._waiters:
                self._waiters.remove(w)
                self._observe_waiting(w.priority)
            elif w.future.done() and not w.future.cancelled():
                self.release()  # granted in the same turn as the cancellation: pass it on
            raise
        return w

    def try_acquire(self, model: str, priority: int) -> bool:
        """A grant at once when one is free and nobody waits (release it with :meth:`release`),
        else False: the uncontended case costs the caller no task and no loop turn."""
        if self._running < self.concurrency and not self._waiters:
            self._take(model, priority, 0.0)
            return True
        return False

    def waiter(self, model: str, priority: int) -> Waiter:
        """A waiter to pass to :meth:`acquire`, for callers that promote it while it waits."""
        loop = asyncio.get_running_loop()
        return Waiter(model, priority, next(self._seq), self._clock(), loop.create_future())

    def promote(self, waiter: Waiter | None, priority: int) -> None:
        """A waiter now speaks for more urgent work."""
        if waiter is not None and priority < waiter.priority and waiter in self._waiters:
            old = waiter.priority
            waiter.priority = priority
            self._observe_waiting(old)
            self._observe_waiting(priority)

    def release(self) -> None:
        self._running -= 1
        self._dispatch()
        if self.observer is not None:
            self.observer.on_running(self._running)

    def snapshot(self) -> dict[str, object]:
        waiting: dict[int, int] = {}
        for w in self._waiters:
            waiting[w.priority] = waiting.get(w.priority, 0) + 1
        return {
            "concurrency": self.concurrency,
            "aging_ms": self.aging_ms,
            "running": self._running,
            "waiting": dict(sorted(waiting.items())),
            "granted": self.granted,
        }

    def configure(self, concurrency: int, aging_ms: float) -> None:
        self.concurrency = max(1, int(concurrency))
        self.aging_ms = float(aging_ms)
        self._dispatch()

    # -- internals -----------------------------------------------------------------------------

    def _urgency(self, w: Waiter, now: float) -> tuple[float, int, int]:
        aged = (now - w.since) * 1000.0 / self.aging_ms if self.aging_ms > 0 else 0.0
        return (w.priority - aged, w.priority, w.seq)

    def _dispatch(self) -> None:
        while self._running < self.concurrency and self._waiters:
            now = self._clock()
            best = min(self._waiters, key=lambda w: self._urgency(w, now))
            self._waiters.remove(best)
            self._observe_waiting(best.priority)
            if best.future.done():  # cancelled: its handler runs later and finds it gone
                continue
            self._take(best.model, best.priority, now - best.since)
            best.future.set_result(None)

    def _take(self, model: str, priority: int, waited_s: float) -> None:
        self._running += 1
        self.granted += 1
        if self.observer is not None:
            self.observer.on_grant(model, priority, waited_s)
            self.observer.on_running(self._running)

    def _observe_waiting(self, priority: int) -> None:
        if self.observer is not None:
            self.observer.on_waiting(priority, sum(1 for w in self._waiters if w.priority == priority))
