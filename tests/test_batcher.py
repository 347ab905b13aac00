"""Specification of the priority dynamic batcher, run against a fake engine that records batches."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.arbiter import ComputeArbiter
from appliance.batcher import (
    AdmissionError,
    Batcher,
    BatcherClosed,
    BatchPolicy,
    DeadlineExceeded,
    InvalidPriority,
    NullObserver,
    QueueFull,
    WouldMissDeadline,
)
from appliance.engines.base import EngineError


class Boom(Exception):
    pass


class FakeEngine:
    """Records every batch; each batch takes ``seconds`` and, while ``gate`` is clear, waits for it.

    Items that are exceptions come back as that item's error; anything else comes back as ("ok", item).
    """

    def __init__(self, seconds: float = 0.0, *, gated: bool = False) -> None:
        self.seconds = seconds
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def __call__(self, items: list[Any]) -> Sequence[Any]:
        self.batches.append(list(items))
        await self.gate.wait()
        await asyncio.sleep(self.seconds)
        return [item if isinstance(item, BaseException) else ("ok", item) for item in items]


async def until(predicate: Any, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def submit(batcher: Batcher[Any, Any], item: Any, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(batcher.submit(item, **kw))


async def blocked(policy: BatchPolicy, **kw: Any) -> tuple[Batcher[Any, Any], FakeEngine, asyncio.Task[Any]]:
    """A batcher whose only instance is busy with a "blocker" batch until ``engine.gate`` is set."""
    engine = FakeEngine(gated=True)
    batcher: Batcher[Any, Any] = Batcher("m", policy, engine, **kw)
    blocker = submit(batcher, "blocker")
    await until(lambda: engine.batches)
    return batcher, engine, blocker


# ---- policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"max_batch_size": 4, "preferred_batch_sizes": [2, 8]}, "preferred_batch_sizes"),
        ({"priority_levels": 0}, "priority_levels"),
        ({"priority_levels": 2, "default_priority": 3}, "default_priority"),
        ({"priority_levels": 2, "max_queue_size": [1]}, "max_queue_size"),
        ({"default_timeout_ms": -5}, "default_timeout_ms"),
        ({"aging_ms": float("nan")}, "aging_ms"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"BatchPolicy.{field} must be"):
        BatchPolicy(**kwargs)


def test_timeout_override_may_only_shorten_a_nonzero_default() -> None:
    assert BatchPolicy(default_timeout_ms=100).effective_timeout_ms(50) == 50
    assert BatchPolicy(default_timeout_ms=100).effective_timeout_ms(500) == 100
    assert BatchPolicy(default_timeout_ms=0).effective_timeout_ms(500) == 500
    assert BatchPolicy(default_timeout_ms=100).effective_timeout_ms(None) == 100
    no_override = BatchPolicy(default_timeout_ms=100, allow_timeout_override=False)
    assert no_override.effective_timeout_ms(10) == 100
    with pytest.raises(ValueError, match="timeout_ms must be a positive"):
        BatchPolicy().effective_timeout_ms(0)


# ---- dispatch ---------------------------------------------------------------------------------


async def test_idle_batcher_dispatches_at_once() -> None:
    engine = FakeEngine()
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(max_queue_delay_ms=1000), engine)
    start = time.monotonic()
    task = submit(batcher, 1)
    for _ in range(3):  # submit, the dispatch it schedules, the batch's first step: no timer involved
        await asyncio.sleep(0)
    assert engine.batches == [[1]]
    assert await task == ("ok", 1)
    assert time.monotonic() - start < 0.2  # generous for a loaded CI machine; no timer waited


async def test_an_uncontended_grant_starts_the_engine_in_the_turn_that_forms_the_batch() -> None:
    """With the compute arbiter free, no task waits for the grant, and an engine whose execute is
    a plain function (the server's hands the batch to its worker thread) gets the batch in the
    dispatch turn: at saturation the next batch starts before the loop renders the last one's
    answers. Contended, the batch waits for the grant as before."""
    started: list[list[Any]] = []
    loop = asyncio.get_running_loop()

    def execute(items: list[Any]) -> asyncio.Future[list[Any]]:
        started.append(list(items))
        done: asyncio.Future[list[Any]] = loop.create_future()
        done.set_result([("ok", i) for i in items])
        return done

    arbiter = ComputeArbiter(1, aging_ms=0)
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(), execute, arbiter=arbiter)
    task = submit(batcher, 1)
    for _ in range(2):  # submit, then the dispatch it schedules
        await asyncio.sleep(0)
    assert started == [[1]] and arbiter.snapshot()["running"] == 1
    assert await task == ("ok", 1)
    await until(lambda: arbiter.snapshot()["running"] == 0)

    await arbiter.acquire("other", 1)  # another model's batch holds the engine
    task = submit(batcher, 2)
    await asyncio.sleep(0.01)
    assert started == [[1]] and not task.done()
    arbiter.release()
    assert await task == ("ok", 2)
    assert started == [[1], [2]]
    await until(lambda: arbiter.snapshot()["running"] == 0)


async def test_requests_accumulate_while_busy_then_go_together() -> None:
    batcher, engine, blocker = await blocked(BatchPolicy(max_batch_size=8))
    tasks = [submit(batcher, i) for i in range(5)]
    await asyncio.sleep(0.01)
    assert engine.batches == [["blocker"]]
    engine.gate.set()
    assert await asyncio.gather(*tasks) == [("ok", i) for i in range(5)]
    assert engine.batches == [["blocker"], [0, 1, 2, 3, 4]]
    await blocker


async def test_batches_never_exceed_max_and_prefer_the_largest_preferred_size() -> None:
    policy = BatchPolicy(max_batch_size=4, preferred_batch_sizes=[2])
    batcher, engine, _ = await blocked(policy)
    tasks = [submit(batcher, i) for i in range(7)]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(*tasks)
    # 7 queued -> a full batch of 4; 3 left -> preferred 2; the last one goes alone once idle.
    assert engine.batches[1:] == [[0, 1, 2, 3], [4, 5], [6]]


async def test_strict_priority_first_then_fifo_within_a_level() -> None:
    policy = BatchPolicy(max_batch_size=2, priority_levels=3, default_priority=2)
    batcher, engine, _ = await blocked(policy)
    order = [("a", 3), ("b", 2), ("c", 1), ("d", 3), ("e", 1), ("f", 2)]
    tasks = [submit(batcher, name, priority=p) for name, p in order]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert engine.batches[1:] == [["c", "e"], ["b", "f"], ["a", "d"]]


@pytest.mark.parametrize("alone", [True, False])
async def test_a_batch_holding_priority_1_takes_no_lower_priority_items(alone: bool) -> None:
    """``batching.priority_1_alone`` (on by default): a priority-1 batch filled with priority-2
    and 3 items would take as long as a full one; alone it stays short. Off: filled as usual."""
    policy = BatchPolicy(max_batch_size=4, priority_levels=3, default_priority=2, priority_1_alone=alone)
    batcher, engine, _ = await blocked(policy)
    order = [("a", 2), ("b", 1), ("c", 3), ("d", 1)]
    tasks = [submit(batcher, name, priority=p) for name, p in order]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert engine.batches[1:] == ([["b", "d"], ["a", "c"]] if alone else [["b", "d", "a", "c"]])


async def test_while_more_urgent_work_is_about_a_less_urgent_batch_is_cut_to_urgent_batch_ms() -> None:
    """``batching.urgent_batch_ms``: while more urgent work (of any model) has had the engine
    within the last second, a batch of less urgent work is cut to about that many ms of compute
    at the rate measured so far, so that the urgent work waits for a short batch, not a full one.
    With nothing more urgent about, batches stay full."""
    arbiter = ComputeArbiter(1, aging_ms=0)
    engine = FakeEngine(seconds=0.05)
    policy = BatchPolicy(max_batch_size=4, priority_levels=3, default_priority=2, urgent_batch_ms=30)
    batcher: Batcher[Any, Any] = Batcher("m", policy, engine, arbiter=arbiter)
    await asyncio.gather(*(submit(batcher, i) for i in range(4)))
    assert engine.batches == [[0, 1, 2, 3]]  # and the rate: 4 items in >= 50 ms, <= 80 items/s
    async with arbiter.grant("other-model", 1):  # another model's priority-1 call holds the engine
        tasks = [submit(batcher, i) for i in range(4, 8)]
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    # 30 ms at <= 80 items/s: at most 2 items a batch; every item still runs, once.
    assert all(len(b) <= 2 for b in engine.batches[1:])
    assert sorted(i for b in engine.batches[1:] for i in b) == [4, 5, 6, 7]


@pytest.mark.parametrize("arbiter", [False, True], ids=["alone", "through the compute arbiter"])
async def test_partial_batch_waits_for_queue_delay_only_while_another_instance_is_busy(arbiter: bool) -> None:
    # The server dispatches through the arbiter (two grants: two batches may run at once); its
    # path had no hold, and each free instance took whatever had arrived.
    engine = FakeEngine(gated=True)
    batcher: Batcher[Any, Any] = Batcher(
        "m",
        BatchPolicy(max_batch_size=4, max_queue_delay_ms=40),
        engine,
        instances=2,
        arbiter=ComputeArbiter(2, aging_ms=0) if arbiter else None,
    )
    submit(batcher, "blocker")
    await until(lambda: engine.batches)
    start = time.monotonic()
    first = submit(batcher, 1)
    await asyncio.sleep(0.01)
    second = submit(batcher, 2)
    await until(lambda: len(engine.batches) == 2)
    waited = time.monotonic() - start
    assert 0.035 <= waited < 0.3
    assert engine.batches[1] == [1, 2]
    engine.gate.set()
    await asyncio.gather(first, second)


async def test_priority_1_work_does_not_wait_for_company_while_another_instance_is_busy() -> None:
    # Kept in short batches of its own (priority_1_alone), urgent work is not held for a fuller one.
    engine = FakeEngine(gated=True)
    batcher: Batcher[Any, Any] = Batcher(
        "m",
        BatchPolicy(max_batch_size=4, max_queue_delay_ms=5000, priority_levels=3),
        engine,
        instances=2,
        arbiter=ComputeArbiter(2, aging_ms=0),
    )
    submit(batcher, "blocker")
    await until(lambda: engine.batches)
    start = time.monotonic()
    urgent = submit(batcher, "urgent", priority=1)
    await until(lambda: len(engine.batches) == 2, timeout=6.0)  # past the delay: the check is below
    assert time.monotonic() - start < 1.0  # not held for the 5-s queue delay
    assert engine.batches[1] == ["urgent"]
    engine.gate.set()
    await urgent


async def lengths_batched(policy: BatchPolicy, items: list[tuple[str, int]]) -> list[list[int]]:
    """The lengths of each batch that ``items`` (text, priority), all queued behind a running
    blocker batch, are taken in, with the batcher grouping by length."""
    engine = FakeEngine(gated=True)
    batcher: Batcher[Any, Any] = Batcher("m", policy, engine, length=len)
    submit(batcher, "blocker")
    await until(lambda: engine.batches)
    tasks = [submit(batcher, s, priority=p) for s, p in items]
    await asyncio.sleep(0)
    engine.gate.set()
    await asyncio.gather(*tasks)
    return [[len(s) for s in batch] for batch in engine.batches[1:]]


async def test_length_grouping_fills_with_the_closest_lengths_without_crossing_levels() -> None:
    # Mixed levels below priority 1 in one batch.
    policy = BatchPolicy(max_batch_size=3, priority_levels=3)
    items = [("x" * 10, 2), ("x" * 90, 2), ("x" * 11, 3), ("x" * 88, 2), ("x" * 12, 2), ("x" * 9, 3)]
    lengths = await lengths_batched(policy, items)
    # Head 10 takes its closest same-level peers (12, then 88 over 90); level 3 never jumps level 2.
    assert lengths == [[10, 12, 88], [90, 11, 9]]


@pytest.mark.parametrize("alone", [True, False])
async def test_priority_1_is_taken_in_arrival_order_whatever_its_lengths(alone: bool) -> None:
    """Grouping by length would let a later priority-1 item of a closer length overtake an
    earlier one; an urgent batch is taken first come, first served."""
    policy = BatchPolicy(max_batch_size=3, priority_levels=2, priority_1_alone=alone)
    items = [("x" * 10, 1), ("x" * 90, 1), ("x" * 11, 2), ("x" * 88, 1), ("x" * 12, 1), ("x" * 9, 2)]
    lengths = await lengths_batched(policy, items)
    # Alone: priority 1 by itself, in arrival order, then level 2 (grouped by length: one batch).
    # Not alone: the urgent batch filled in rank order, the rest grouped by length from head 12.
    assert lengths == ([[10, 90, 88], [12], [11, 9]] if alone else [[10, 90, 88], [12, 11, 9]])


async def test_raising_max_batch_size_live_takes_effect_for_the_next_batch() -> None:
    batcher, engine, _ = await blocked(BatchPolicy(max_batch_size=2))
    tasks = [submit(batcher, i) for i in range(6)]
    await asyncio.sleep(0)
    batcher.update_policy(max_batch_size=6)
    engine.gate.set()
    await asyncio.gather(*tasks)
    assert engine.batches[1:] == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="max_batch_size"):
        batcher.update_policy(max_batch_size=0)
    assert batcher.policy.max_batch_size == 6


async def test_a_replaced_policy_with_fewer_levels_moves_waiting_items_to_the_lowest() -> None:
    """And the depth gauges follow: a removed level reads 0 (its series had kept its last depth
    for good, an alert on queue depth firing on a level that no longer exists)."""
    depths: dict[int, int] = {}

    class Observer(NullObserver):
        def on_queue_depth(self, priority: int, depth: int) -> None:
            depths[priority] = depth

    policy = BatchPolicy(priority_levels=3, max_batch_size=8, priority_1_alone=False)
    batcher, engine, _ = await blocked(policy, observer=Observer())
    tasks = [submit(batcher, "p3", priority=3), submit(batcher, "p1", priority=1)]
    await asyncio.sleep(0)
    assert depths == {1: 1, 3: 1}
    # As a config reload does.
    batcher.policy = BatchPolicy(priority_levels=2, max_batch_size=8, priority_1_alone=False)
    later = submit(batcher, "p2", priority=2)
    await asyncio.sleep(0)
    assert batcher.snapshot()["queue_depth"] == {1: 1, 2: 2}
    assert depths == {1: 1, 2: 2, 3: 0}
    engine.gate.set()
    await asyncio.gather(*tasks, later)
    assert engine.batches[1] == ["p1", "p3", "p2"]


async def test_snapshot_and_observer_report_batches() -> None:
    seen: list[tuple[int, int, float]] = []

    class Observer:
        def on_batch(self, size: int, queue_wait_s: Sequence[float], compute_s: float, ok: bool) -> None:
            seen.append((size, len(queue_wait_s), compute_s))

        def on_reject(self, priority: int, reason: str) -> None:
            pass

        def on_queue_depth(self, priority: int, depth: int) -> None:
            pass

    engine = FakeEngine(seconds=0.005)
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(max_batch_size=4), engine, observer=Observer())
    await asyncio.gather(*(batcher.submit(i) for i in range(6)))
    snap = batcher.snapshot()
    assert snap["recent_batch_sizes"] == [4, 2] and snap["completed"] == 6
    assert snap["service_rate"] > 0 and snap["running_batches"] == 0
    assert [(size, waits) for size, waits, _ in seen] == [(4, 4), (2, 2)]
    assert all(compute >= 0.004 for _, _, compute in seen)


async def test_an_observer_that_raises_never_keeps_the_compute_grant() -> None:
    """A batch's end reports to its observer (the metrics). If that raises, the batch's callers
    still get their answers, and the compute grant still goes back: kept, it would stall every
    model's engine calls for good."""

    class Broken:
        def on_batch(self, size: int, queue_wait_s: Sequence[float], compute_s: float, ok: bool) -> None:
            raise Boom("the metrics broke")

        def on_reject(self, priority: int, reason: str) -> None:
            pass

        def on_queue_depth(self, priority: int, depth: int) -> None:
            pass

    arbiter = ComputeArbiter(1, aging_ms=0)
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(), FakeEngine(), arbiter=arbiter, observer=Broken())
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _ctx: None)  # the task's error is expected
    try:
        assert await asyncio.wait_for(batcher.submit(1), 2) == ("ok", 1)
        await asyncio.wait_for(arbiter.acquire("other", 1), 2)  # the grant came back
        arbiter.release()
        assert await asyncio.wait_for(batcher.submit(2), 2) == ("ok", 2)
    finally:
        loop.set_exception_handler(None)
    await batcher.close()


async def test_execute_returning_the_wrong_number_of_results_fails_that_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher("m", BatchPolicy(), short)
    with pytest.raises(RuntimeError, match="returned 0 results for a batch of 1"):
        await batcher.submit(1)


# ---- admission --------------------------------------------------------------------------------


async def test_invalid_priority_is_refused_not_remapped() -> None:
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(priority_levels=3), FakeEngine())
    bad: Any  # deliberately wrong types too: the value usually comes straight from a header
    for bad in (0, 4, True, 1.5):
        with pytest.raises(InvalidPriority, match=f"priority must be an integer from 1 to 3, got {bad!r}"):
            await batcher.submit("x", priority=bad)
    assert issubclass(InvalidPriority, ValueError)


async def test_full_level_is_refused_at_once_with_a_positive_retry_after() -> None:
    policy = BatchPolicy(priority_levels=2, max_queue_size=[0, 2])
    batcher, engine, _ = await blocked(policy)
    tasks = [submit(batcher, i, priority=2) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as refused:
        await batcher.submit("late", priority=2)
    assert refused.value.priority == 2 and refused.value.reason == "queue_full"
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
    urgent = submit(batcher, "urgent", priority=1)  # level 1 is unbounded, so still admitted
    engine.gate.set()
    await asyncio.gather(*tasks, urgent)
    assert batcher.snapshot()["rejections"]["queue_full"] == 1


async def test_expired_request_is_answered_while_a_long_batch_runs() -> None:
    batcher, engine, _ = await blocked(BatchPolicy(default_timeout_ms=50))
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as expired:
        await batcher.submit("waits")
    # 50 ms timeout, answered at once (typically within a few ms; the bound is generous for a
    # loaded CI machine) while the batch is still blocked: it only ends when the gate opens below.
    assert 0.045 <= time.monotonic() - start < 0.25
    assert isinstance(expired.value, AdmissionError) and expired.value.reason == "deadline"
    engine.gate.set()
    await asyncio.sleep(0.01)
    assert ["waits"] not in engine.batches
    assert batcher.snapshot()["queue_depth"] == {1: 0}


async def test_each_queued_request_expires_at_its_own_deadline_whatever_the_arrival_order() -> None:
    """Deadlines that arrive out of order (a later request with a shorter override) each answer
    at their own time; a request taken into a batch first never expires."""
    batcher, engine, _ = await blocked(BatchPolicy(max_batch_size=1, default_timeout_ms=1000))
    start = time.monotonic()
    ended: dict[str, float] = {}

    async def waits(name: str, timeout_ms: float) -> None:
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(name, timeout_ms=timeout_ms)
        ended[name] = time.monotonic() - start

    first = submit(batcher, "first", timeout_ms=300)  # next in line: taken when the gate opens
    tasks = [asyncio.ensure_future(waits(n, ms)) for n, ms in (("slow", 150), ("fast", 50), ("mid", 100))]
    await asyncio.gather(*tasks)
    assert sorted(ended, key=ended.__getitem__) == ["fast", "mid", "slow"]
    assert ended["fast"] >= 0.045 and ended["slow"] < 0.5  # generous for a loaded CI machine
    engine.gate.set()
    assert await first == ("ok", "first")
    assert batcher.snapshot()["queue_depth"] == {1: 0}


async def test_request_that_would_miss_its_deadline_is_refused_on_arrival() -> None:
    engine = FakeEngine(seconds=0.05)
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(max_batch_size=1), engine)
    await batcher.submit("warm-up")  # one observation: about 20 items/s, 50 ms a batch
    tasks = [submit(batcher, i) for i in range(4)]
    await until(lambda: len(engine.batches) == 2)
    with pytest.raises(WouldMissDeadline) as refused:
        await batcher.submit("hurry", timeout_ms=60)
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0.05
    assert await batcher.submit("patient", timeout_ms=1000) == ("ok", "patient")
    await asyncio.gather(*tasks)


async def test_aging_lets_low_priority_through_a_steady_high_priority_load() -> None:
    async def low_priority_latency(aging_ms: float) -> float | None:
        engine = FakeEngine(seconds=0.005)
        policy = BatchPolicy(max_batch_size=1, priority_levels=2, aging_ms=aging_ms)
        batcher: Batcher[Any, Any] = Batcher("m", policy, engine)
        flood: list[asyncio.Task[Any]] = []
        low: asyncio.Task[Any] | None = None
        start = time.monotonic()
        while time.monotonic() - start < 0.5 and not (low and low.done()):
            if batcher.snapshot()["queue_depth"][1] < 8:  # the high level never runs dry
                flood.append(submit(batcher, "hi", priority=1))
            if low is None and time.monotonic() - start > 0.02:
                low, low_start = submit(batcher, "lo", priority=2), time.monotonic()
            await asyncio.sleep(0.001)
        assert low is not None
        latency = time.monotonic() - low_start if low.done() else None
        await asyncio.gather(low, *flood)
        return latency

    assert await low_priority_latency(aging_ms=0) is None  # strict priority starves it
    # Promoted after 10 ms, it then waits only for the (at most 8) high items that arrived before it.
    latency = await low_priority_latency(aging_ms=10)
    assert latency is not None and latency < 0.4


class Starved:
    """Level 1 kept busy (about 4 items queued at any time, each a 4 ms batch of its own), so that
    level 2 gets no engine time at all under strict priority: 2 level-2 items time out (the
    evidence of starvation) and 8 wait. Measured over windows of 50 ms (the server's are 1 s) to
    keep the test short."""

    def __init__(self, observed: bool) -> None:
        policy = BatchPolicy(max_batch_size=1, priority_levels=2, observed_drain=observed)
        self.batcher: Batcher[Any, Any] = Batcher("m", policy, FakeEngine(seconds=0.004), drain_window_s=0.05)
        self.urgent: list[asyncio.Task[Any]] = []
        self.waiting: list[asyncio.Task[Any]] = []
        self.stop = False
        self.feeder: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.batcher.submit("warm-up", priority=1)  # a measured compute rate
        self.feeder = asyncio.ensure_future(self._feed())
        await until(lambda: self.batcher.queued(1) >= 2)
        missed = [submit(self.batcher, f"miss{i}", priority=2, timeout_ms=120) for i in range(2)]
        self.waiting = [submit(self.batcher, f"lo{i}", priority=2, timeout_ms=2000) for i in range(8)]
        await asyncio.sleep(0.15)  # three windows of level-2 backlog with nothing taken
        for t in missed:
            with pytest.raises(DeadlineExceeded):
                await t

    async def _feed(self) -> None:
        while not self.stop:
            if self.batcher.queued(1) < 4:
                self.urgent.append(submit(self.batcher, "hi", priority=1, timeout_ms=500))
            await asyncio.sleep(0.001)

    async def end(self) -> None:
        self.stop = True
        assert self.feeder is not None
        await self.feeder
        # Priority 1, never short of engine time, was never refused and always answered.
        assert {await t for t in self.urgent} == {("ok", "hi")}


async def test_a_level_starved_by_more_urgent_work_is_refused_on_arrival_then_recovers() -> None:
    """``queue.observed_drain``: the compute rate alone (about 250 items/s here) predicts a short
    wait for level 2, but level 2 is observed to drain nothing: a newcomer that would wait longer
    than its deadline is refused on arrival (submit, and early admission alike), with a
    Retry-After no longer than its deadline (or 1 s). Level 1 is not affected. Once the engine
    is free for level 2 again, its queue drains and the same arrivals are admitted."""
    starved = Starved(observed=True)
    await starved.start()
    batcher = starved.batcher
    begin = time.monotonic()
    with pytest.raises(WouldMissDeadline) as refused:
        await batcher.submit("late", priority=2, timeout_ms=200)
    assert time.monotonic() - begin < 0.05  # on arrival, not at its deadline
    assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 1.0
    early = batcher.refusal(2, 1, 0.2)
    assert isinstance(early, WouldMissDeadline) and early.retry_after_s is not None
    # Replayed (Pipeline.refusal's memo) while the prediction still refuses, and counted as such.
    counted = batcher.snapshot()["rejections"]["would_miss_deadline"]
    assert batcher.refused_again(2, early, 0.2)
    assert batcher.snapshot()["rejections"]["would_miss_deadline"] == counted + 1
    assert not batcher.refused_again(2, early, 60.0)  # not against a deadline the wait fits in
    assert batcher.refusal(1, 1, 0.2) is None
    assert await batcher.submit("urgent", priority=1, timeout_ms=200) == ("ok", "urgent")
    drain = batcher.snapshot()["observed_drain"]
    assert drain[1] > 3 * drain[2]  # what the console shows: level 2 starved, level 1 not
    assert batcher.snapshot()["rejections"]["deadline"] == 2  # the two short deadlines only

    await starved.end()
    assert [await t for t in starved.waiting] == [("ok", f"lo{i}") for i in range(8)]
    # Right after the starvation ends, a burst of the size refused before is admitted in full.
    burst = [submit(batcher, f"again{i}", priority=2, timeout_ms=200) for i in range(8)]
    assert await asyncio.gather(*burst) == [("ok", f"again{i}") for i in range(8)]
    assert not batcher.refused_again(2, early, 0.2)  # a replay ends with the starvation


async def test_without_observed_drain_a_starved_level_admits_what_then_times_out() -> None:
    """The same starvation with ``observed_drain`` off: the compute rate predicts a short wait, the
    request is admitted and times out in the queue, answered with a Retry-After of its own."""
    starved = Starved(observed=False)
    await starved.start()
    begin = time.monotonic()
    with pytest.raises(DeadlineExceeded) as expired:
        await starved.batcher.submit("late", priority=2, timeout_ms=200)
    assert time.monotonic() - begin >= 0.19
    assert expired.value.retry_after_s is not None and expired.value.retry_after_s >= 1.0
    await starved.end()
    await asyncio.gather(*starved.waiting)


async def test_a_stall_without_missed_deadlines_refuses_nothing() -> None:
    """A level that merely waits for the engine (its queue is taken whole once the running batch
    ends) drains only as fast as it fills, which looks like starvation; until one of its items
    misses its deadline, a newcomer is judged by the compute rate alone."""
    policy = BatchPolicy(priority_levels=2)
    engine = FakeEngine()
    batcher: Batcher[Any, Any] = Batcher("m", policy, engine, drain_window_s=0.05)
    await batcher.submit("warm-up")
    engine.gate.clear()
    blocker = submit(batcher, "blocker")
    await until(lambda: len(engine.batches) == 2)
    queued = [submit(batcher, i, timeout_ms=2000) for i in range(8)]
    await asyncio.sleep(0.15)  # 8 items, nothing taken for three windows
    late = submit(batcher, "late", timeout_ms=250)
    await asyncio.sleep(0)
    engine.gate.set()
    assert await late == ("ok", "late")
    await asyncio.gather(blocker, *queued)
    assert batcher.snapshot()["rejections"]["would_miss_deadline"] == 0


async def test_cancelled_while_queued_is_withdrawn_and_never_executed() -> None:
    depths: list[tuple[int, int]] = []
    rejects: list[tuple[int, str]] = []

    class Observer:
        def on_batch(self, size: int, queue_wait_s: Sequence[float], compute_s: float, ok: bool) -> None:
            pass

        def on_reject(self, priority: int, reason: str) -> None:
            rejects.append((priority, reason))

        def on_queue_depth(self, priority: int, depth: int) -> None:
            depths.append((priority, depth))

    batcher, engine, _ = await blocked(BatchPolicy(), observer=Observer())
    keep, gone = submit(batcher, "keep"), submit(batcher, "gone")
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    assert batcher.snapshot()["queue_depth"] == {1: 1}
    engine.gate.set()
    assert await keep == ("ok", "keep")
    assert all("gone" not in batch for batch in engine.batches)
    assert rejects == [(1, "cancelled")]
    assert depths[-1] == (1, 0)


async def test_cancelled_while_running_lets_the_batch_finish_and_drops_the_result() -> None:
    batcher, engine, blocker = await blocked(BatchPolicy())
    blocker.cancel()
    engine.gate.set()
    assert await batcher.submit("next") == ("ok", "next")
    assert batcher.snapshot()["dropped_results"] == 1


async def test_an_item_error_fails_only_that_item() -> None:
    batcher, engine, _ = await blocked(BatchPolicy())
    bad = Boom("bad input")
    tasks = [submit(batcher, 1), submit(batcher, bad), submit(batcher, 3)]
    await asyncio.sleep(0)
    engine.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results == [("ok", 1), bad, ("ok", 3)]


async def test_execute_raising_fails_only_its_batch() -> None:
    calls: list[list[str]] = []

    async def flaky(items: list[str]) -> list[str]:
        calls.append(items)
        await asyncio.sleep(0.005)
        if "poison" in items:
            raise Boom("engine fell over")
        return items

    batcher: Batcher[str, str] = Batcher("m", BatchPolicy(max_batch_size=2), flaky)
    first = submit(batcher, "poison")
    await asyncio.sleep(0)
    rest = [submit(batcher, s) for s in ("x", "y", "z")]
    with pytest.raises(Boom, match="engine fell over"):
        await first
    assert await asyncio.gather(*rest) == ["x", "y", "z"]
    assert calls == [["poison"], ["x", "y"], ["z"]]


class Failures:
    """Counts the batcher's own faults (the server's observer counts them as a worker's)."""

    def __init__(self) -> None:
        self.count = 0

    def on_batch(self, size: int, queue_wait_s: Sequence[float], compute_s: float, ok: bool) -> None:
        pass

    def on_reject(self, priority: int, reason: str) -> None:
        pass

    def on_queue_depth(self, priority: int, depth: int) -> None:
        pass

    def on_failure(self) -> None:
        self.count += 1


def fault_once(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """``Batcher.<method>`` raises the first time it is called, then works."""
    real = getattr(Batcher, method)
    armed = True

    def faulty(self: Batcher[Any, Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        if armed:
            armed = False
            raise Boom(f"{method} broke")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Batcher, method, faulty)


@pytest.mark.parametrize("method", ["_take", "_launch"])
async def test_a_fault_forming_a_batch_fails_that_batch_and_the_queue_is_still_served(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Batches are formed in loop callbacks, where an exception reached nobody: the batch it was
    forming (before the take: the head of the queue; after it: the items taken) waited for its
    deadline or for ever, and nothing dispatched again until another request came. Now that
    batch fails at once with an EngineError, the fault is reported, and the rest of the queue is
    served without waiting for a newcomer."""
    failures = Failures()
    batcher, engine, blocker = await blocked(BatchPolicy(max_batch_size=2), observer=failures)
    queued = [submit(batcher, i) for i in range(3)]
    await asyncio.sleep(0)
    fault_once(monkeypatch, method)
    engine.gate.set()  # the blocker's end dispatches the next batch: the fault hits it
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1)
    assert all(isinstance(r, EngineError) and f"{method} broke" in str(r) for r in results[:2])
    assert results[2] == ("ok", 2)
    assert await blocker == ("ok", "blocker") and failures.count == 1
    assert batcher.snapshot()["queue_depth"] == {1: 0}
    assert await asyncio.wait_for(batcher.submit("next"), 1) == ("ok", "next")
    await batcher.close()


async def test_a_fault_that_persists_is_logged_once_with_its_stack_not_per_batch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in every dispatch fails batch after batch (each is counted); its stack is logged
    once and the repeats are summed into a line at most every ``_FAILURE_LOG_S``, not a traceback
    per batch, up to 100 a second."""
    failures = Failures()
    batcher, engine, blocker = await blocked(BatchPolicy(max_batch_size=1), observer=failures)
    queued = [submit(batcher, i) for i in range(30)]
    await asyncio.sleep(0)

    def broken(self: Batcher[Any, Any], *args: Any, **kwargs: Any) -> Any:
        raise Boom("_take broke for good")

    monkeypatch.setattr(Batcher, "_take", broken)
    with caplog.at_level(logging.ERROR, "appliance.batcher"):
        engine.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 5)
    assert all(isinstance(r, EngineError) for r in results) and failures.count == 30
    records = [r for r in caplog.records if "dispatching a batch failed" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None, [r.getMessage() for r in records]
    assert await blocker == ("ok", "blocker")
    await batcher.close()


async def test_a_fault_forming_a_granted_batch_fails_it_and_gives_the_grant_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same in the task that waits for a compute grant: the batch fails at once, the grant
    goes back to the arbiter (kept, it would stall every model's engine calls), and the next
    request is served."""
    failures = Failures()
    arbiter = ComputeArbiter(1, aging_ms=0)
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(), FakeEngine(), arbiter=arbiter, observer=failures)
    await arbiter.acquire("other", 1)  # contended: the batch waits for the grant in a task
    task = submit(batcher, 1)
    await asyncio.sleep(0.01)
    fault_once(monkeypatch, "_take")
    arbiter.release()
    with pytest.raises(EngineError, match="_take broke"):
        await asyncio.wait_for(task, 1)
    assert failures.count == 1
    await asyncio.wait_for(arbiter.acquire("other", 1), 1)  # the grant came back
    arbiter.release()
    assert await asyncio.wait_for(batcher.submit(2), 1) == ("ok", 2)
    await batcher.close()


async def test_close_with_drain_finishes_queued_work_and_refuses_new() -> None:
    batcher, engine, blocker = await blocked(BatchPolicy())
    queued = [submit(batcher, i) for i in range(3)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(BatcherClosed):
        await batcher.submit("late")
    engine.gate.set()
    await closing
    assert await asyncio.gather(blocker, *queued) == [("ok", "blocker")] + [("ok", i) for i in range(3)]


async def test_close_without_drain_fails_queued_work_but_finishes_the_running_batch() -> None:
    batcher, engine, blocker = await blocked(BatchPolicy())
    queued = [submit(batcher, i) for i in range(3)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.stop())
    await asyncio.sleep(0)
    engine.gate.set()
    await closing
    assert await blocker == ("ok", "blocker")
    for task in queued:
        with pytest.raises(BatcherClosed):
            await task
    assert engine.batches == [["blocker"]]
    assert batcher.snapshot()["rejections"]["closed"] == 3


async def test_a_closed_batcher_is_freed_at_once_not_at_its_answered_requests_deadlines() -> None:
    """Closing (a model's unload) lets the batcher go, and with it what its ``execute`` holds (the
    model's runtime and engine): the deadline timer of a request answered long before its
    deadline does not keep it until then."""
    engine = FakeEngine()
    batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(default_timeout_ms=3_600_000), engine)
    assert await batcher.submit(1) == ("ok", 1)
    await batcher.close()
    gone = weakref.ref(engine)
    del batcher, engine
    gc.collect()
    assert gone() is None, "the closed batcher's engine is still referenced"


# ---- properties -------------------------------------------------------------------------------

arrivals = st.lists(
    st.tuples(
        st.integers(1, 3),  # priority
        st.sampled_from([0.0, 0.0, 0.001, 0.002]),  # pause before this arrival (s)
        st.one_of(st.none(), st.sampled_from([0.0, 0.001, 0.003])),  # cancel after (s)
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=arrivals,
    max_batch=st.integers(1, 4),
    instances=st.integers(1, 2),
    delay_ms=st.sampled_from([0.0, 2.0]),
    engine_s=st.sampled_from([0.0, 0.001, 0.003]),
)
def test_every_item_completes_once_and_batches_respect_size_and_priority(
    arrivals: list[tuple[int, float, float | None]],
    max_batch: int,
    instances: int,
    delay_ms: float,
    engine_s: float,
) -> None:
    queued: dict[int, int] = {}  # what the test believes is waiting: item -> priority
    executed: list[int] = []

    def execute(items: list[tuple[int, int]]) -> asyncio.Future[list[Any]]:
        # Plain function: the batcher calls it at batch formation, so ``queued`` is what it chose from.
        assert 1 <= len(items) <= max_batch
        for item, _ in items:
            del queued[item]
        executed.extend(item for item, _ in items)
        worst = max(p for _, p in items)
        for item, p in queued.items():
            assert p >= worst, "a lower level was batched while a higher one waited"
            if p == worst:
                assert all(item > i for i, q in items if q == p), "FIFO within a level broken"
        return asyncio.ensure_future(asyncio.sleep(engine_s, result=[("ok", i) for i in items]))

    async def scenario() -> None:
        policy = BatchPolicy(max_batch_size=max_batch, max_queue_delay_ms=delay_ms, priority_levels=3)
        batcher: Batcher[Any, Any] = Batcher("m", policy, execute, instances=instances)

        async def client(i: int, p: int) -> Any:
            queued[i] = p  # submit enqueues before its first suspension, so this stays exact
            return await batcher.submit((i, p), priority=p)

        async def cancel_later(task: asyncio.Task[Any], i: int, after: float) -> None:
            await asyncio.sleep(after)
            if not task.done():
                task.cancel()
                queued.pop(i, None)

        tasks, cancellers = [], []
        for i, (p, pause, cancel_after) in enumerate(arrivals):
            if pause:
                await asyncio.sleep(pause)
            tasks.append(asyncio.ensure_future(client(i, p)))
            if cancel_after is not None:
                cancellers.append(asyncio.ensure_future(cancel_later(tasks[-1], i, cancel_after)))
        await asyncio.wait_for(asyncio.gather(*cancellers), 2)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
        await batcher.close()

        assert len(executed) == len(set(executed))
        for i, ((p, _, _), result) in enumerate(zip(arrivals, results, strict=True)):
            if isinstance(result, asyncio.CancelledError):
                assert arrivals[i][2] is not None
            else:
                assert result == ("ok", (i, p)) and i in executed
        snap = batcher.snapshot()
        assert snap["queue_depth"] == {1: 0, 2: 0, 3: 0} and snap["running_batches"] == 0

    asyncio.run(scenario())


def test_deadlines_under_uvloop_within_its_timer_resolution() -> None:
    """uvloop runs a timer due within its 1 ms resolution as a plain Handle (no ``when()``): a
    request whose deadline is that close, then one with a later deadline, must both be answered
    (the second once crashed the batcher with AttributeError, a 500 under overload)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> list[Any]:
        engine = FakeEngine(gated=True)
        batcher: Batcher[Any, Any] = Batcher("m", BatchPolicy(max_batch_size=1), engine)
        running = submit(batcher, "blocker")
        await asyncio.sleep(0)
        close = submit(batcher, "close", timeout_ms=0.4)
        later = submit(batcher, "later", timeout_ms=10_000)
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await asyncio.gather(running, close, later, return_exceptions=True)

    loop = uvloop.new_event_loop()
    try:
        blocker, close, later = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert blocker == ("ok", "blocker")
    assert isinstance(close, (DeadlineExceeded, WouldMissDeadline)), close
    assert later == ("ok", "later")
