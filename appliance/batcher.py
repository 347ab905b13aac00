"""Per-model priority dynamic batcher with admission control.

Modelled on Triton's dynamic batcher (max and preferred batch sizes, queue delay, priority levels,
per-level queue bounds, timeout override rules), with three deliberate differences: an invalid
priority is refused rather than remapped, a request that cannot meet its deadline is refused on
arrival, and an expired request is answered by its own timer instead of when the running batch ends.
No HTTP and no metrics library here: the server connects a ``BatcherObserver``.

Dispatch runs in loop callbacks and a grant task, outside any caller: an exception there fails
the batch it was forming with an ``EngineError``, is logged and reported (``on_failure``), and
dispatch is tried again shortly, so the rest of the queue is served rather than left to expire.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from appliance.admission import (
    REJECT_REASONS,
    AdmissionError,
    BatcherClosed,
    BatchPolicy,
    DeadlineExceeded,
    EarlyAdmission,
    InvalidPriority,
    Reservation,
    _is_int,
)
from appliance.admission import QueueFull as QueueFull  # re-exported: admission's refusals, by name
from appliance.admission import WouldMissDeadline as WouldMissDeadline
from appliance.drain import WINDOW_S, DrainMeter
from appliance.engines.base import EngineError

if TYPE_CHECKING:
    from appliance.arbiter import ComputeArbiter, Grant, Waiter

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_SERVICE_RATE = 100.0  # items/s assumed before any batch has completed; only feeds retry hints
_EWMA_ALPHA = 0.2
_LENGTH_WINDOW = 4  # length grouping scans this many batches' worth of queue, bounding cost and unfairness
_RETRY_PUMP_S = 0.01  # after a failed dispatch: soon, yet a persistent fault cannot spin the loop
_FAILURE_LOG_S = 10.0  # a persistent dispatch fault is logged at most this often (its stack once)


class BatcherObserver(Protocol):
    """Metrics hooks. Called on the event loop; must be cheap and must not raise."""

    def on_batch(self, size: int, queue_wait_s: Sequence[float], compute_s: float, ok: bool) -> None:
        """A batch of ``size`` items ran (answered or not); each item's wait in the queue; ``ok``:
        the engine call returned its results (not raised, or timed out)."""
        return None

    def on_answered(self, tally: Tally) -> None:
        """A request queued as ``tally.rows`` items got every answer (``Batcher.answered``)."""
        return None

    def on_reject(self, priority: int, reason: str) -> None:
        return None

    def on_queue_depth(self, priority: int, depth: int) -> None:
        return None

    def on_failure(self) -> None:
        """Dispatching a batch raised (a fault in the batcher, not in the engine)."""
        return None


class NullObserver(BatcherObserver):
    pass


class Tally:
    """One request's time in the batcher, over the items it queued as, for statistics that count
    the request once when it ends, with its own durations (Triton's): the mean over its items of
    the wait in the queue and of the run of the batch each item was in. Only items answered to a
    caller still waiting are added. Counted per batch instead, the rows of a request whose client
    hung up, or whose deadline passed, while they ran counted as inferences and as that request's
    queue and compute, besides the failure the request itself counted."""

    __slots__ = ("answered", "compute_s", "queue_s", "rows")

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.answered = 0
        self.queue_s = self.compute_s = 0.0

    def add(self, wait_s: float, compute_s: float) -> None:
        self.answered += 1
        self.queue_s += wait_s / self.rows
        self.compute_s += compute_s / self.rows


@dataclass(eq=False)  # identity equality: requests are dict keys
class _Request(Generic[T, R]):
    item: T
    priority: int
    seq: int
    arrival: float
    length: int
    future: asyncio.Future[R]
    tally: Tally | None = None  # of its request, for statistics counted once per request


class Batcher(EarlyAdmission, Generic[T, R]):
    """Queues items per priority level and runs them through ``execute`` in dynamic batches."""

    def __init__(
        self,
        name: str,
        policy: BatchPolicy,
        execute: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        instances: int = 1,
        length: Callable[[T], int] | None = None,
        observer: BatcherObserver | None = None,
        arbiter: ComputeArbiter | None = None,
        drain_window_s: float = WINDOW_S,
    ) -> None:
        """With an ``arbiter``, a batch is formed only once the arbiter grants engine time, at the
        priority of the most urgent waiting item: the queue fills meanwhile, so batches are fuller
        under load, and the batch taken is the most urgent one at the moment the engine is free."""
        if not _is_int(instances) or instances < 1:
            raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
        self.name = name
        self.policy = policy
        self.instances = instances  # may be changed live; takes effect at the next dispatch
        self.observer: BatcherObserver = observer or NullObserver()
        self._execute = execute
        self._length = length
        # OrderedDict: FIFO iteration plus O(1) removal for cancellations and expiries.
        self._queues: list[OrderedDict[_Request[T, R], None]] = []
        self._drain_window_s = drain_window_s  # of the observed drain (appliance.drain)
        self._drain = DrainMeter(0, drain_window_s)
        self._relevel(policy.priority_levels)
        self._seq = itertools.count()
        self._starts: dict[int, float] = {}  # running batch id -> dispatch time
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._arbiter = arbiter
        self._asking: Waiter | None = None  # our pending request for a grant
        self._asking_task: asyncio.Task[None] | None = None
        self._reserved: dict[int, int] = {}  # level -> places held by early admissions
        self._pump_pending = False
        self._taking: list[_Request[T, R]] = []  # taken from the queues, not yet launched
        self._failure_logged_at = -math.inf  # when a failed dispatch was last logged
        self._failures_unlogged = 0
        self._hold: asyncio.Handle | None = None
        self._hold_at = 0.0
        # Queue deadlines: one timer for the batcher, at the earliest, over a heap of (due, seq),
        # instead of a loop timer per request (uvloop's call_at and cancel per request were 5.6 %
        # of the event loop's time at 64 clients). Entries of requests no longer queued are
        # dropped lazily; ``_timed`` holds the queued requests that have a deadline.
        self._deadlines: list[tuple[float, int]] = []
        self._timed: dict[int, _Request[T, R]] = {}
        # uvloop's call_at returns a plain Handle, without when(), for a time within its 1 ms
        # resolution: the timers' due times are kept here instead.
        self._deadline_timer: asyncio.Handle | None = None
        self._deadline_at = 0.0
        self._rate: float | None = None  # EWMA items/s of one instance
        self._batch_s: float | None = None  # EWMA seconds per batch
        self._recent: deque[int] = deque(maxlen=64)
        self._rejections = dict.fromkeys(REJECT_REASONS, 0)
        self._completed = 0
        self._dropped = 0

    # ---- public API -------------------------------------------------------------------------

    def predicted_wait(self, level: int) -> float | None:
        """Seconds a new item at ``level`` would wait; None before any batch was observed (refusing
        on a guess is worse than trying)."""
        return None if self._rate is None else self._predicted_wait(level, self._rate, observed=True)

    async def submit(
        self,
        item: T,
        *,
        priority: int | None = None,
        timeout_ms: float | None = None,
        reservation: Reservation | None = None,
        tally: Tally | None = None,
    ) -> R:
        """``item``'s result once its batch has run. ``tally``: its request's, which the item's
        answer adds to; the caller reports it (``answered``) once the request has every answer."""
        policy = self.policy
        held = reservation is not None and reservation.take()
        self._relevel(policy.priority_levels)
        level = policy.default_priority if priority is None else priority
        if not _is_int(level) or not 1 <= level <= policy.priority_levels:
            raise InvalidPriority(
                f"priority must be an integer from 1 to {policy.priority_levels}, got {priority!r}"
            )
        timeout_s = policy.effective_timeout_ms(timeout_ms) / 1000
        if self._closed:
            raise self._refuse(BatcherClosed(f"batcher {self.name!r} is closed", priority=level))
        queue = self._queues[level - 1]
        # An early-admitted item was judged already.
        refused = None if held else self._queue_refusal(level, 1, timeout_s)
        if refused is not None:
            raise refused
        loop = asyncio.get_running_loop()
        now = loop.time()
        req: _Request[T, R] = _Request(
            item,
            level,
            next(self._seq),
            now,
            self._length(item) if self._length else 0,
            loop.create_future(),
            tally,
        )
        if timeout_s:
            self._add_deadline(req, now + timeout_s, loop)
        if not queue:
            self._drain.backlogged(level, now)
        queue[req] = None
        self.observer.on_queue_depth(level, len(queue))
        # Deferred one loop turn so that requests arriving together share a batch, at no added latency.
        if not self._pump_pending:
            self._pump_pending = True
            loop.call_soon(self._pump)
        try:
            return await req.future
        except asyncio.CancelledError:
            # Client went away. Still queued: withdraw it. Already running: the result is dropped later.
            if self._discard(req):
                self._count(req.priority, "cancelled")
            raise

    def answered(self, tally: Tally) -> None:
        """The request ``tally`` is of has all its answers in hand: it counts now, once (a request
        that fails, times out or whose client leaves first is a failure, counted by the caller)."""
        if tally.answered == tally.rows:
            self.observer.on_answered(tally)

    def update_policy(self, **changes: Any) -> None:
        """Validate and apply setting changes in place (the policy object may be shared with config)."""
        replace(self.policy, **changes)  # validates the combination before anything changes
        for name, value in changes.items():
            setattr(self.policy, name, value)
        self._relevel(self.policy.priority_levels)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # configured before the loop runs: the first submit pumps
            return
        self._pump()  # e.g. a larger max_batch_size may make a held batch ready

    async def close(self, drain: bool = True) -> None:
        """Stop accepting; run the queue to empty (drain) or fail it with BatcherClosed; await running."""
        self._closed = True
        if not drain and self._asking_task is not None:
            self._asking_task.cancel()  # nothing left to run: stop waiting for engine time
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        if not drain:
            for queue in self._queues:
                for req in list(queue):
                    self._discard(req)
                    if not req.future.done():
                        self._count(req.priority, "closed")
                        req.future.set_exception(BatcherClosed(f"batcher {self.name!r} closed"))
        self._pump()  # closing ends any wait for a fuller batch
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.wait(pending)
        if self._deadline_timer is not None and not self._timed:
            # Armed for a request answered since (entries are dropped lazily), it held this
            # batcher, and through ``execute`` the unloaded model's runtime, engine, tokenizers
            # and worker threads, until that request's deadline (30 s by default, an hour for a
            # client's X-Timeout-Ms): an unload gave nothing back, and load/unload cycles
            # (eviction swapping two models) grew RSS by each model's runtime per cycle.
            self._deadline_timer.cancel()
            self._deadline_timer = None
            self._deadlines.clear()

    def cut_running(self) -> int:
        """Give up the batches still running (a stop's time is up): their requests are answered
        BatcherClosed (a 503 with Retry-After) at once; an engine thread that never returns is
        left to finish or hang. Without it, a request whose batch hung was never answered: the
        stop cut its connection instead. The number of batches given up."""
        running = [t for t in self._tasks if not t.done()]
        for task in running:
            task.cancel()  # _run answers the batch's requests as it unwinds
        return len(running)

    async def stop(self) -> None:
        await self.close(drain=False)

    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "closed": self._closed,
            "queue_depth": {i + 1: len(q) for i, q in enumerate(self._queues)},
            "running_batches": len(self._starts),
            "instances": self.instances,
            "service_rate": None if self._rate is None else self._rate * self.instances,
            "batch_seconds": self._batch_s,
            "recent_batch_sizes": list(self._recent),
            # Items per second each level was seen to drain while it had items queued (None: not
            # backlogged lately); far below service_rate, the level is starved of engine time.
            "observed_drain": self._observed_drain(),
            "rejections": dict(self._rejections),
            "completed": self._completed,
            "dropped_results": self._dropped,
        }

    def _observed_drain(self) -> dict[int, float | None]:
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # no loop: the meter's clock is the loop's
            return {}
        return self._drain.rates(now)

    def retry_hint(self, level: int) -> float:
        """Seconds until a request at ``level`` would likely be taken: Retry-After for a refusal."""
        return max(self._predicted_wait(level, self._rate or DEFAULT_SERVICE_RATE), 0.001)

    def queued(self, level: int) -> int:
        """Items waiting at ``level`` (cheap: early shedding asks this before any work)."""
        return len(self._queues[level - 1]) if 1 <= level <= len(self._queues) else 0

    # ---- admission --------------------------------------------------------------------------

    def _refuse(self, error: AdmissionError) -> AdmissionError:
        self._count(error.priority or 0, error.reason)
        return error

    def _count(self, priority: int, reason: str) -> None:
        self._rejections[reason] += 1
        self.observer.on_reject(priority, reason)

    def _predicted_wait(self, level: int, rate: float, *, observed: bool = False) -> float:
        """From the compute rate: the items ahead at the rate the engine runs them, after the
        running batch. With ``observed`` (and ``policy.observed_drain``), at least the wait the
        levels' observed takes predict (``DrainMeter.wait``): the compute rate holds only while
        the level gets the engine, which more urgent work may not leave it."""
        queues = self._queues[:level]
        ahead = sum(map(len, queues))
        remaining = 0.0
        now = None
        if len(self._starts) >= self.instances and self._batch_s is not None:
            soonest = min(self._starts.values()) + self._batch_s
            now = asyncio.get_running_loop().time()
            remaining = max(0.0, soonest - now)
        wait = ahead / (rate * self.instances) + remaining
        if observed and ahead and self.policy.observed_drain:
            counts = [len(q) for q in queues]
            counts[-1] += self.held(level)
            now = asyncio.get_running_loop().time() if now is None else now
            seen = self._drain.wait(counts, level, self.policy.max_batch_size, now)
            if seen > wait:
                return seen
        return wait

    def _add_deadline(self, req: _Request[T, R], due: float, loop: asyncio.AbstractEventLoop) -> None:
        heap = self._deadlines
        while heap and heap[0][1] not in self._timed:  # answered or withdrawn since
            heapq.heappop(heap)
        heapq.heappush(heap, (due, req.seq))
        self._timed[req.seq] = req
        timer = self._deadline_timer
        if timer is None or due < self._deadline_at:
            if timer is not None:
                timer.cancel()
            self._deadline_timer, self._deadline_at = loop.call_at(due, self._on_deadlines), due

    def _on_deadlines(self) -> None:
        """Expire every queued request whose deadline has come; re-arm for the next one."""
        self._deadline_timer = None
        loop = asyncio.get_running_loop()
        heap, now = self._deadlines, loop.time()
        while heap and (heap[0][0] <= now or heap[0][1] not in self._timed):
            _, seq = heapq.heappop(heap)
            req = self._timed.get(seq)
            if req is not None:
                self._expire(req)
        if heap:
            self._deadline_timer, self._deadline_at = loop.call_at(heap[0][0], self._on_deadlines), heap[0][0]

    def _expire(self, req: _Request[T, R]) -> None:
        if req.future.done():  # cancelled: submit's handler withdraws and counts it
            return
        if self._discard(req):
            self._count(req.priority, "deadline")
            now = asyncio.get_running_loop().time()
            self._drain.expired(req.priority, now)  # the evidence that the level is starved
            waited = now - req.arrival
            # Come back when a newcomer at this level would be taken, as now predicted (at least 1 s).
            retry = self._predicted_wait(req.priority, self._rate or DEFAULT_SERVICE_RATE, observed=True)
            req.future.set_exception(
                DeadlineExceeded(
                    f"timed out after {waited * 1000:.0f} ms in queue",
                    retry_after_s=min(max(retry, 1.0), max(waited, 1.0)),
                    priority=req.priority,
                )
            )

    def _discard(self, req: _Request[T, R]) -> bool:
        queue = self._queues[req.priority - 1]
        if req not in queue:
            return False
        del queue[req]
        self._timed.pop(req.seq, None)
        if not queue:
            self._drain.emptied(req.priority, asyncio.get_running_loop().time())
        self.observer.on_queue_depth(req.priority, len(queue))
        return True

    def _relevel(self, levels: int) -> None:
        """Resize the per-level queues; requests on a removed level join the new lowest level."""
        old = len(self._queues)
        if old == levels:
            return
        waiting = sorted((r for q in self._queues for r in q), key=lambda r: r.seq)
        self._queues = [OrderedDict() for _ in range(levels)]
        self._drain = DrainMeter(levels, self._drain_window_s)  # the levels' history no longer applies
        for req in waiting:
            req.priority = min(req.priority, levels)
            self._queues[req.priority - 1][req] = None
        if waiting:
            now = asyncio.get_running_loop().time()
            for i, queue in enumerate(self._queues):
                if queue:
                    self._drain.backlogged(i + 1, now)
        if old:  # not the first sizing: the depth gauges follow, a removed level's to 0 for good
            for level in range(1, max(old, levels) + 1):
                self.observer.on_queue_depth(level, len(self._queues[level - 1]) if level <= levels else 0)

    # ---- dispatch ---------------------------------------------------------------------------

    def _pump(self) -> None:
        self._pump_pending = False
        try:
            self._dispatch()
        except Exception as exc:
            self._dispatch_failed(exc)

    def _dispatch_failed(self, exc: Exception) -> None:
        """A dispatch raised. Left to the loop's exception handler, the error was seen by nobody
        and nothing pumped again until the next arrival: the queue waited for its deadlines (a 503
        after 30 s). Instead the batch it was forming fails now (what it had taken, or else the
        head of the queue, so that a fault that persists still gets through the queue), and
        dispatch is tried again shortly for the rest."""
        # A fault that persists fails batch after batch (up to 100 a second while the queue
        # drains): its stack once, then a line with the count at most every _FAILURE_LOG_S.
        now = time.monotonic()
        self._failures_unlogged += 1
        if now - self._failure_logged_at >= _FAILURE_LOG_S:
            if self._failure_logged_at == -math.inf:
                log.error("batcher %s: dispatching a batch failed", self.name, exc_info=exc)
            else:
                log.error(
                    "batcher %s: dispatching a batch failed %d times since the last report, now with %s: %s",
                    self.name,
                    self._failures_unlogged,
                    type(exc).__name__,
                    exc,
                )
            self._failure_logged_at, self._failures_unlogged = now, 0
        error = EngineError(f"batcher error: {type(exc).__name__}: {exc}")
        victims, self._taking = self._taking, []
        if not victims:
            head = itertools.chain.from_iterable(self._queues)
            victims = list(itertools.islice(head, self.policy.max_batch_size))
        for req in victims:
            self._discard(req)
            if not req.future.done():
                req.future.set_exception(error)
        if any(self._queues) and not self._pump_pending:
            self._pump_pending = True
            asyncio.get_running_loop().call_later(_RETRY_PUMP_S, self._pump)
        self.observer.on_failure()

    def _dispatch(self) -> None:
        self._relevel(self.policy.priority_levels)
        loop = asyncio.get_running_loop()
        if self._arbiter is not None:
            self._ask_for_grant(loop)
            return
        while len(self._starts) < self.instances and (queued := sum(map(len, self._queues))):
            if self._holding(loop):
                return
            batch = self._take(self.policy.batch_size(queued)[0], loop.time())
            if batch:
                self._launch(batch, loop)

    def _holding(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a free instance should wait before taking a partial batch: idle, go now (no
        added latency); while another batch of this model runs, a partial batch waits for company
        until its oldest item has waited ``max_queue_delay_ms`` (a timer pumps again then).

        With several instances and nothing to wait for, each free instance took whatever had
        arrived: at 16 closed-loop clients two one-thread instances ran batches of 3-4 items
        (0.61-0.70 of the engine's best, against 0.91-0.99 at 64 clients with full batches); and
        the server always dispatches through the compute arbiter, whose path had no hold at all.
        Priority-1 work, kept in short batches of its own (``priority_1_alone``) where there are
        lower levels, goes at once."""
        queued = sum(map(len, self._queues))
        if not self._starts or not queued or self._closed or self.policy.batch_size(queued)[1]:
            return False
        if self.policy.priority_1_alone and len(self._queues) > 1 and self._queues[0]:
            return False
        oldest = min(next(iter(q)).arrival for q in self._queues if q)
        due = oldest + self.policy.max_queue_delay_ms / 1000
        if loop.time() >= due:
            return False
        if self._hold is None or self._hold_at > due:
            if self._hold is not None:
                self._hold.cancel()
            self._hold, self._hold_at = loop.call_at(due, self._on_hold), due
        return True

    def _best_level(self) -> int:
        return next((i + 1 for i, q in enumerate(self._queues) if q), self.policy.priority_levels)

    def _ask_for_grant(self, loop: asyncio.AbstractEventLoop) -> None:
        """One pending grant request per free instance slot; it speaks for the best waiting item."""
        if not any(self._queues) or len(self._starts) >= self.instances:
            return
        if self._asking is not None:
            assert self._arbiter is not None
            self._arbiter.promote(self._asking, self._best_level())
            return
        if self._asking_task is not None and not self._asking_task.done():
            return
        arbiter = self._arbiter
        assert arbiter is not None
        if self._holding(loop):
            return
        # Uncontended (nobody else waits for engine time): granted now, and the batch starts in
        # this turn, without a task or a loop turn (at saturation the next batch so starts
        # before the loop renders the last one's answers, not after).
        while (held := arbiter.try_acquire(self.name, self._best_level())) is not None:
            if not self._start(loop, arbiter, held):
                return
            if not any(self._queues) or len(self._starts) >= self.instances or self._holding(loop):
                return
        # Queued now, not when the task first runs: a batch that just ended asks before it gives
        # its grant back (see _run), so its queue competes for that very grant.
        self._asking = arbiter.ask(self.name, self._best_level())
        task = loop.create_task(self._granted(loop, self._asking), name=f"grant:{self.name}")
        self._asking_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _granted(self, loop: asyncio.AbstractEventLoop, waiter: Waiter) -> None:
        arbiter = self._arbiter
        assert arbiter is not None
        try:
            held = await arbiter.wait(waiter)
        finally:
            self._asking = None
        try:
            self._start(loop, arbiter, held)
        except Exception as exc:  # the grant went back; the batch fails, the next one is asked for
            self._dispatch_failed(exc)
        self._asking_task = None
        self._pump()  # more work and another free instance: ask again

    def _start(self, loop: asyncio.AbstractEventLoop, arbiter: ComputeArbiter, held: Grant) -> bool:
        """With ``held``: launch the most urgent batch (which gives the grant back when it ends),
        or give it back at once when nothing is queued any more."""
        launched = False
        try:
            # An urgent-lane grant is for priority-1 work only.
            levels = 1 if held.urgent else len(self._queues)
            queued = sum(map(len, self._queues[:levels]))
            if queued:
                size, _ = self.policy.batch_size(queued)
                size = self._urgent_cut(size, arbiter)
                turn = arbiter.turn(self.name) if self.policy.share_turns and not held.urgent else None
                batch = self._take(size, loop.time(), levels, turn or 1)
                if batch:
                    self._launch(batch, loop, release=lambda: arbiter.release(held))
                    launched = True
        finally:
            if not launched:
                arbiter.release(held)
        return launched

    def _urgent_cut(self, size: int, arbiter: ComputeArbiter) -> int:
        """``size``, or fewer items, about ``urgent_batch_ms`` of compute at the measured rate,
        while work more urgent than this batch's head is about: it waits for this batch."""
        ms = self.policy.urgent_batch_ms
        rate = self._rate
        if not ms or rate is None or size <= 1:
            return size
        head = self._best_level()
        if head <= 1 or not arbiter.pressed(head):
            return size
        return max(1, min(size, int(rate * ms / 1000)))

    def _on_hold(self) -> None:
        self._hold = None
        self._pump()

    def _effective(self, req: _Request[T, R], now: float) -> int:
        aging = self.policy.aging_ms
        return req.priority if not aging else max(1, req.priority - int((now - req.arrival) * 1000 // aging))

    def _take(
        self, size: int, now: float, levels: int | None = None, alone_below: int = 1
    ) -> list[_Request[T, R]]:
        """The next batch: up to ``size`` items, most urgent first, from the first ``levels``.

        With ``priority_1_alone``, a batch headed by priority-1 work (as asked, or aged to it)
        takes nothing less urgent: filled with priority-2 and 3 items it would take as long as a
        full batch, and the priority-1 items would wait for all of it. Except (``share_turns``)
        the first batch after another model's call of priority ``alone_below``: it also takes
        items down to that level. Under overload with chat, priority 1 kept arriving during
        every batch, so the engine went from priority-1 batches to chat steps and back, and
        this model's priority-2 work, the chat's peer, never ran (217 of ~28,000 answered in
        30 s); it now has the engine in turn with the chat step before it. A batch headed by
        priority-1 work is taken in arrival order, never grouped by length: grouping let later
        arrivals of a similar length overtake an earlier one for up to four batches, and under
        the overload benchmark 16-22 % of priority-1 requests were so overtaken, by up to 1.4 s
        (most of its p99); the padding a short urgent batch saves is the smaller effect."""
        dead: list[_Request[T, R]] = []

        def live(queue: OrderedDict[_Request[T, R], None]) -> Iterator[tuple[int, int, _Request[T, R]]]:
            for req in queue:
                if req.future.done():  # cancelled this loop turn; submit's handler has not run yet
                    dead.append(req)
                else:
                    yield self._effective(req, now), req.seq, req

        # Aging keeps each level ordered by (effective priority, arrival), so a k-way merge is exact.
        window = size * _LENGTH_WINDOW if self._length else size
        ranked = list(itertools.islice(heapq.merge(*map(live, self._queues[:levels])), window))
        urgent = bool(ranked) and ranked[0][0] == 1
        if self.policy.priority_1_alone and urgent:
            ranked = list(itertools.takewhile(lambda c: c[0] <= alone_below, ranked))
        for req in dead:
            if self._discard(req):
                self._count(req.priority, "cancelled")
        if urgent or not self._length or len(ranked) <= size:
            chosen = [req for _, _, req in ranked[:size]]
        else:
            # The head is fixed; each level is exhausted before the next, taking closest lengths first.
            head = ranked[0][2]
            chosen = [head]
            for _, group in itertools.groupby(ranked[1:], key=lambda c: c[0]):
                room = size - len(chosen)
                members = [req for _, _, req in group]
                if len(members) > room:
                    members = sorted(members, key=lambda r: abs(r.length - head.length))[:room]
                chosen.extend(members)
                if len(chosen) == size:
                    break
        taken: dict[int, int] = {}
        self._taking = chosen  # failed, not lost, should anything raise before they are launched
        for req in chosen:
            taken[req.priority] = taken.get(req.priority, 0) + 1
            self._discard(req)
        for level, count in taken.items():
            self._drain.taken(level, count, now)
        return chosen

    def _launch(
        self,
        batch: list[_Request[T, R]],
        loop: asyncio.AbstractEventLoop,
        release: Callable[[], None] | None = None,
    ) -> None:
        bid = next(self._seq)
        self._starts[bid] = loop.time()
        work: Awaitable[Sequence[R | BaseException]] | BaseException
        try:
            # Called now rather than inside the task so an engine can start work without a loop turn.
            work = self._execute([r.item for r in batch])
        except Exception as exc:
            work = exc
        task = loop.create_task(self._run(bid, batch, work, release), name=f"batch:{self.name}:{bid}")
        self._taking = []
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        bid: int,
        batch: list[_Request[T, R]],
        work: Awaitable[Sequence[R | BaseException]] | BaseException,
        release: Callable[[], None] | None = None,
    ) -> None:
        n = len(batch)
        outcome: Sequence[R | BaseException] = [BatcherClosed(f"batch of {self.name!r} was cancelled")] * n
        ok = False
        try:
            if isinstance(work, BaseException):
                raise work
            results = await work
            if len(results) != n:
                raise RuntimeError(f"execute returned {len(results)} results for a batch of {n}")
            outcome, ok = results, True
        except Exception as exc:  # the whole batch failed; nothing else is affected
            outcome = [exc] * n
        finally:
            try:
                self._complete(bid, batch, outcome, ok)
            finally:
                # Whatever _complete or _pump raise (a metric, an observer), the grant goes back:
                # a grant kept would stall every model's engine calls for good.
                if release is not None:
                    try:
                        if not self._closed:
                            # Ask for the next batch before the grant goes back: otherwise another
                            # model's waiter, there first, would take it even when this queue is
                            # more urgent.
                            self._pump()
                    finally:
                        release()  # the engine is free for the most urgent work of any model
        self._pump()  # not on cancellation: the loop is shutting down

    def _complete(
        self, bid: int, batch: list[_Request[T, R]], outcome: Sequence[R | BaseException], ok: bool
    ) -> None:
        start = self._starts.pop(bid)
        compute_s = asyncio.get_running_loop().time() - start
        for req, result in zip(batch, outcome, strict=True):
            if req.future.done():  # client cancelled while its batch ran
                self._dropped += 1
            elif isinstance(result, BaseException):
                req.future.set_exception(result)
            else:
                req.future.set_result(result)
                if req.tally is not None:
                    req.tally.add(start - req.arrival, compute_s)
        self._completed += len(batch)
        self._recent.append(len(batch))
        if ok:  # a failing engine is fast; letting it raise the service rate would admit too much
            sample = len(batch) / max(compute_s, 1e-6)
            self._rate = sample if self._rate is None else self._rate + _EWMA_ALPHA * (sample - self._rate)
            b = self._batch_s
            self._batch_s = compute_s if b is None else b + _EWMA_ALPHA * (compute_s - b)
        self.observer.on_batch(len(batch), [start - r.arrival for r in batch], compute_s, ok)
