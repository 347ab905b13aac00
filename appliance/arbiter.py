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

The urgent lane: ``compute.urgent_lane`` extra grants that only priority-1 work may take, so that
a priority-1 call never waits for lower-priority work already running (a chat decode step of 8
rows, an embedding batch full of priority-2 sentences). A model's own batches still never overlap
beyond its ``engine.instances``; a batcher that gets an urgent grant takes only priority-1 items,
which keeps that batch short. On the CPU the urgent call shares the cores with the running one for
its duration; on a GPU the two run as concurrent streams, except TensorRT engines that share one
device arena, which never overlap.

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

    def on_grant(self, model: str, priority: int, waited_s: float, urgent: bool) -> None: ...

    def on_waiting(self, priority: int, count: int) -> None: ...

    def on_running(self, count: int) -> None: ...


class Grant:
    """Engine time held: one normal grant, or one of the urgent lane (priority 1 only)."""

    __slots__ = ("urgent",)

    def __init__(self, urgent: bool = False) -> None:
        self.urgent = urgent

    def __repr__(self) -> str:
        return f"Grant(urgent={self.urgent})"


NORMAL = Grant(False)
URGENT = Grant(True)


class Waiter:
    __slots__ = ("future", "model", "priority", "seq", "since")

    def __init__(
        self, model: str, priority: int, seq: int, since: float, future: asyncio.Future[Grant]
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
        urgent_lane: int = 0,
        *,
        observer: ArbiterObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.aging_ms = aging_ms
        self.urgent_lane = max(0, urgent_lane)
        self.observer = observer
        self._clock = clock
        self._running = 0
        self._urgent_running = 0
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()
        self.granted = 0
        self._granted_at: dict[int, float] = {}  # priority -> when a call of it last got a grant
        # The last normal grant's (model, priority), and per model the priority of the other
        # model's call whose grant came just before its latest one (None: its own came before).
        self._last: tuple[str, int] | None = None
        self._turns: dict[str, int | None] = {}
        self._quiet = 0  # quiet periods open (see quiet): no grant is handed out meanwhile
        self._idle: asyncio.Event | None = None  # set when the last grant held comes back

    # -- public API ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def grant(self, model: str, priority: int) -> AsyncIterator[Grant]:
        """Hold a grant for the body (callers that promote while waiting use :meth:`ask`,
        :meth:`wait` and :meth:`release` instead)."""
        held = await self.acquire(model, priority)
        try:
            yield held
        finally:
            self.release(held)

    @contextlib.asynccontextmanager
    async def quiet(self, timeout_s: float) -> AsyncIterator[bool]:
        """No engine call runs during the body: grants wait until it ends, and it starts once the
        calls running now have given theirs back. For a load's memory measurement, which reads
        the process's RSS: another model's batch running meanwhile was counted as the new model's
        working memory. Bounded: after ``timeout_s`` (a hung call) the body runs anyway and is
        told so (False); grants are handed out again when it ends, by urgency as usual."""
        self._quiet += 1
        try:
            quiet = True
            if self.held():
                self._idle = self._idle or asyncio.Event()
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout_s)
                except asyncio.TimeoutError:
                    quiet = False
            yield quiet
        finally:
            self._quiet -= 1
            if not self._quiet:
                self._idle = None
            self._dispatch()

    async def acquire(self, model: str, priority: int) -> Grant:
        """Take a grant (give it back with :meth:`release`). Cancelling the wait withdraws it."""
        held = self.try_acquire(model, priority)
        if held is not None:
            return held
        return await self.wait(self.ask(model, priority))

    def ask(self, model: str, priority: int) -> Waiter:
        """Queue a request for a grant now, without awaiting it (await it with :meth:`wait`): a
        batcher asks for its next batch before giving back the grant of the last one, so that the
        arbiter weighs its queued work against the other models' waiters instead of handing the
        grant to whoever was already waiting."""
        loop = asyncio.get_running_loop()
        w = Waiter(model, priority, next(self._seq), self._clock(), loop.create_future())
        self._waiters.append(w)
        self._observe_waiting(w.priority)
        self._dispatch()  # a priority-1 arrival may take the urgent lane past the queued others
        return w

    async def wait(self, w: Waiter) -> Grant:
        """The grant :meth:`ask` queued for. Cancelling the wait withdraws it."""
        try:
            return await w.future
        except asyncio.CancelledError:
            if w in self._waiters:
                self._waiters.remove(w)
                self._observe_waiting(w.priority)
            elif w.future.done() and not w.future.cancelled():
                self.release(w.future.result())  # granted as it was cancelled: pass it on
            raise

    def try_acquire(self, model: str, priority: int) -> Grant | None:
        """A grant at once when one is free and nobody waits (give it back with :meth:`release`),
        else None: the uncontended case costs the caller no task and no loop turn."""
        if not self._waiters and not self._quiet:
            if self._running < self.concurrency:
                return self._take(model, priority, 0.0, urgent=False)
            if priority == 1 and self._urgent_running < self.urgent_lane:
                return self._take(model, priority, 0.0, urgent=True)
        return None

    def promote(self, waiter: Waiter | None, priority: int) -> None:
        """A waiter now speaks for more urgent work (at priority 1 it may take the urgent lane)."""
        if waiter is not None and priority < waiter.priority and waiter in self._waiters:
            old = waiter.priority
            waiter.priority = priority
            self._observe_waiting(old)
            self._observe_waiting(priority)
            self._dispatch()

    def release(self, held: Grant = NORMAL) -> None:
        if held.urgent:
            self._urgent_running -= 1
        else:
            self._running -= 1
        if self._idle is not None and not self.held():
            self._idle.set()
        self._dispatch()
        if self.observer is not None:
            self.observer.on_running(self._running + self._urgent_running)

    def pressed(self, priority: int, within_s: float = 1.0) -> bool:
        """Whether work more urgent than ``priority`` is waiting, or was granted within the last
        ``within_s``: a long call of ``priority`` started now would likely hold it up."""
        if any(w.priority < priority for w in self._waiters):
            return True
        since = self._clock() - within_s
        return any(at >= since for p, at in self._granted_at.items() if p < priority)

    def turn(self, model: str) -> int | None:
        """The priority of another model's call whose grant came just before ``model``'s latest
        normal grant: the engine has come back to ``model`` from that work. None when the grant
        before was ``model``'s own (it held the engine back to back) or there was none."""
        return self._turns.get(model)

    def forget(self, model: str) -> None:
        """Drop ``model``'s turn: its folder is gone (ModelManager.rescan), and with it its calls."""
        self._turns.pop(model, None)

    def held(self) -> int:
        """Grants held now (the urgent lane's included)."""
        return self._running + self._urgent_running

    def waiting(self) -> int:
        """How many calls wait for a grant now (any model, any priority)."""
        return len(self._waiters)

    def snapshot(self) -> dict[str, object]:
        waiting: dict[int, int] = {}
        for w in self._waiters:
            waiting[w.priority] = waiting.get(w.priority, 0) + 1
        return {
            "concurrency": self.concurrency,
            "aging_ms": self.aging_ms,
            "running": self._running,
            "urgent_lane": self.urgent_lane,
            "urgent_running": self._urgent_running,
            "waiting": dict(sorted(waiting.items())),
            "granted": self.granted,
        }

    def configure(self, concurrency: int, aging_ms: float, urgent_lane: int | None = None) -> None:
        self.concurrency = max(1, int(concurrency))
        self.aging_ms = float(aging_ms)
        if urgent_lane is not None:
            self.urgent_lane = max(0, int(urgent_lane))
        self._dispatch()

    # -- internals -----------------------------------------------------------------------------

    def _urgency(self, w: Waiter, now: float) -> tuple[float, int, int]:
        aged = (now - w.since) * 1000.0 / self.aging_ms if self.aging_ms > 0 else 0.0
        return (w.priority - aged, w.priority, w.seq)

    def _dispatch(self) -> None:
        while self._waiters and not self._quiet:
            now = self._clock()
            urgent = False
            if self._running < self.concurrency:
                best = min(self._waiters, key=lambda w: self._urgency(w, now))
            elif self._urgent_running < self.urgent_lane:
                # By priority as asked, not as aged: aging orders the normal grants, it does not
                # open the urgent lane to priority 3.
                first = [w for w in self._waiters if w.priority == 1]
                if not first:
                    return
                best, urgent = min(first, key=lambda w: w.seq), True
            else:
                return
            self._waiters.remove(best)
            self._observe_waiting(best.priority)
            if best.future.done():  # cancelled: its handler runs later and finds it gone
                continue
            best.future.set_result(self._take(best.model, best.priority, now - best.since, urgent=urgent))

    def _take(self, model: str, priority: int, waited_s: float, *, urgent: bool) -> Grant:
        if urgent:
            self._urgent_running += 1
        else:
            self._running += 1
            last = self._last
            self._turns[model] = last[1] if last is not None and last[0] != model else None
            self._last = (model, priority)
        self.granted += 1
        self._granted_at[priority] = self._clock()
        if self.observer is not None:
            self.observer.on_grant(model, priority, waited_s, urgent)
            self.observer.on_running(self._running + self._urgent_running)
        return URGENT if urgent else NORMAL

    def _observe_waiting(self, priority: int) -> None:
        if self.observer is not None:
            self.observer.on_waiting(priority, sum(1 for w in self._waiters if w.priority == priority))
