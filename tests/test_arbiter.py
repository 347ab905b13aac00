"""Specifications for the compute arbiter (appliance.arbiter): engine time across models, by
priority, with aging, never losing a grant to a cancelled waiter. Batchers of two models share
one arbiter here, as every resident model does in the server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.arbiter import ComputeArbiter, Grant
from appliance.batcher import Batcher, BatchPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _hold(
    arbiter: ComputeArbiter, model: str, level: int, order: list[str], release: asyncio.Event
) -> None:
    async with arbiter.grant(model, level):
        order.append(f"{model}:{level}")
        await release.wait()


async def test_the_most_urgent_waiter_gets_the_next_grant_whatever_its_model() -> None:
    arbiter = ComputeArbiter(1, aging_ms=0)
    order: list[str] = []
    gate = asyncio.Event()
    running = asyncio.create_task(_hold(arbiter, "chat", 3, order, gate))
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(_hold(arbiter, m, lvl, order, gate))
        for m, lvl in (("chat", 3), ("embed", 2), ("embed", 1), ("chat", 2))
    ]
    await asyncio.sleep(0.01)
    assert order == ["chat:3"]  # one grant at a time: the others wait
    gate.set()
    await asyncio.gather(running, *waiters)
    assert order == ["chat:3", "embed:1", "embed:2", "chat:2", "chat:3"]
    assert arbiter.snapshot()["running"] == 0


async def test_aging_lets_a_long_waiting_low_priority_call_through() -> None:
    clock = Clock()
    arbiter = ComputeArbiter(1, aging_ms=100, clock=clock)
    order: list[str] = []
    gate = asyncio.Event()
    running = asyncio.create_task(_hold(arbiter, "a", 1, order, gate))
    await asyncio.sleep(0)
    old = asyncio.create_task(_hold(arbiter, "old", 3, order, gate))
    await asyncio.sleep(0)
    clock.now = 0.35  # waited 350 ms: three levels better than priority 3
    new = asyncio.create_task(_hold(arbiter, "new", 1, order, gate))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(running, old, new)
    assert order == ["a:1", "old:3", "new:1"]


async def test_without_aging_priority_is_strict() -> None:
    clock = Clock()
    arbiter = ComputeArbiter(1, aging_ms=0, clock=clock)
    order: list[str] = []
    gate = asyncio.Event()
    running = asyncio.create_task(_hold(arbiter, "a", 1, order, gate))
    await asyncio.sleep(0)
    old = asyncio.create_task(_hold(arbiter, "old", 3, order, gate))
    await asyncio.sleep(0)
    clock.now = 100.0
    new = asyncio.create_task(_hold(arbiter, "new", 1, order, gate))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(running, old, new)
    assert order == ["a:1", "new:1", "old:3"]


async def test_a_cancelled_waiter_never_loses_the_grant() -> None:
    arbiter = ComputeArbiter(1, aging_ms=0)
    holder = await arbiter.acquire("a", 1)
    assert not holder.urgent  # granted at once
    victim = asyncio.create_task(arbiter.acquire("b", 1))
    heir = asyncio.create_task(arbiter.acquire("c", 2))
    await asyncio.sleep(0)
    arbiter.release(holder)  # hands the grant to "b" ...
    victim.cancel()  # ... which is cancelled in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await victim
    await asyncio.wait_for(heir, 1)  # the grant passed on
    assert arbiter.snapshot()["running"] == 1
    arbiter.release()
    assert arbiter.snapshot() == {
        "concurrency": 1,
        "aging_ms": 0,
        "running": 0,
        "urgent_lane": 0,
        "urgent_running": 0,
        "waiting": {},
        "granted": 3,
    }


async def test_concurrency_allows_several_grants() -> None:
    arbiter = ComputeArbiter(2, aging_ms=0)
    assert isinstance(await arbiter.acquire("a", 3), Grant)
    assert isinstance(await arbiter.acquire("b", 3), Grant)
    third = asyncio.create_task(arbiter.acquire("c", 1))
    await asyncio.sleep(0.01)
    assert not third.done()
    arbiter.release()
    await asyncio.wait_for(third, 1)


async def test_a_priority_1_batch_of_one_model_overtakes_priority_3_batches_of_another() -> None:
    """Two models' batchers share the arbiter: a flood of priority-3 work on one model, then one
    priority-1 item on the other; the priority-1 item waits only for the batch running when it
    arrives."""
    arbiter = ComputeArbiter(1, aging_ms=0)
    ran: list[tuple[str, list[Any]]] = []
    gate = asyncio.Event()

    def execute_for(name: str) -> Any:
        async def execute(items: list[Any]) -> list[Any]:
            ran.append((name, list(items)))
            await gate.wait()
            return items

        return execute

    policy = {"max_batch_size": 2, "priority_levels": 3, "default_priority": 2}
    chat = Batcher("chat", BatchPolicy(**policy), execute_for("chat"), arbiter=arbiter)
    embed = Batcher("embed", BatchPolicy(**policy), execute_for("embed"), arbiter=arbiter)
    flood = [asyncio.create_task(chat.submit(i, priority=3)) for i in range(10)]
    while not ran:  # the first chat batch is running
        await asyncio.sleep(0)
    urgent = asyncio.create_task(embed.submit("urgent", priority=1))
    while not arbiter.snapshot()["waiting"]:  # the urgent batch waits for engine time
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(urgent, *flood)
    assert [name for name, _ in ran[:2]] == ["chat", "embed"], ran
    assert sum(len(items) for name, items in ran if name == "chat") == 10
    await chat.close()
    await embed.close()


async def test_a_batcher_forms_its_batch_when_the_grant_arrives() -> None:
    """While the engine time belongs to another model, the queue fills; the batch taken at grant
    time holds everything that arrived meanwhile (fuller batches under load)."""
    arbiter = ComputeArbiter(1, aging_ms=0)
    sizes: list[int] = []

    async def execute(items: list[Any]) -> list[Any]:
        sizes.append(len(items))
        return items

    b = Batcher("m", BatchPolicy(max_batch_size=8), execute, arbiter=arbiter)
    other = await arbiter.acquire("other", 1)
    tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert sizes == []
    arbiter.release(other)
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert sizes == [5]
    await b.close()


# -- the urgent lane ------------------------------------------------------------------------------


async def test_the_urgent_lane_lets_priority_1_run_beside_lower_priority_work() -> None:
    """With ``compute.urgent_lane`` 1, a priority-1 call does not wait for the priority-3 call
    running, while a priority-2 call still does; a second priority-1 call waits for the first."""
    arbiter = ComputeArbiter(1, aging_ms=0, urgent_lane=1)
    low = await arbiter.acquire("chat", 3)
    assert not low.urgent
    second = asyncio.create_task(arbiter.acquire("embed", 2))
    await asyncio.sleep(0)
    first = await asyncio.wait_for(arbiter.acquire("embed", 1), 1)  # past the queued priority 2
    assert first.urgent
    again = asyncio.create_task(arbiter.acquire("other", 1))
    await asyncio.sleep(0.01)
    assert not second.done() and not again.done()
    assert arbiter.snapshot()["urgent_running"] == 1
    arbiter.release(first)
    assert (await asyncio.wait_for(again, 1)).urgent
    arbiter.release(low)
    assert not (await asyncio.wait_for(second, 1)).urgent
    snap = arbiter.snapshot()
    assert snap["running"] == 1 and snap["urgent_running"] == 1


async def test_aging_never_opens_the_urgent_lane_to_lower_priorities() -> None:
    clock = Clock()
    arbiter = ComputeArbiter(1, aging_ms=100, urgent_lane=1, clock=clock)
    held = await arbiter.acquire("a", 2)
    old = asyncio.create_task(arbiter.acquire("old", 3))
    await asyncio.sleep(0)
    clock.now = 10.0  # aged far past priority 1 for the normal grant, still priority 3 as asked
    other = asyncio.create_task(arbiter.acquire("other", 2))  # every arrival dispatches
    await asyncio.sleep(0.01)
    assert not old.done() and arbiter.snapshot()["urgent_running"] == 0
    arbiter.release(held)
    assert not (await asyncio.wait_for(old, 1)).urgent  # first by aging
    assert not other.done()
    other.cancel()


async def test_a_waiter_promoted_to_priority_1_takes_the_urgent_lane() -> None:
    arbiter = ComputeArbiter(1, aging_ms=0, urgent_lane=1)
    held = await arbiter.acquire("chat", 2)
    waiter = arbiter.ask("embed", 2)
    asking = asyncio.create_task(arbiter.wait(waiter))
    await asyncio.sleep(0.01)
    assert not asking.done()
    arbiter.promote(waiter, 1)  # a priority-1 item joined the batcher's queue
    assert (await asyncio.wait_for(asking, 1)).urgent
    arbiter.release(held)


async def test_a_batch_on_the_urgent_lane_takes_only_priority_1_items() -> None:
    """A chat step (priority 2) holds the only normal grant; the embedding batcher has priority-2
    and priority-1 items queued. The urgent-lane batch runs at once with the priority-1 items only;
    the priority-2 items wait for the normal grant."""
    arbiter = ComputeArbiter(1, aging_ms=0, urgent_lane=1)
    ran: list[list[Any]] = []

    async def execute(items: list[Any]) -> list[Any]:
        ran.append(list(items))
        return items

    policy = BatchPolicy(max_batch_size=8, priority_levels=3, default_priority=2)
    embed = Batcher("embed", policy, execute, arbiter=arbiter, instances=2)
    chat = await arbiter.acquire("chat", 2)
    later = [asyncio.create_task(embed.submit(f"p2-{i}", priority=2)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert ran == []  # the normal grant is the chat step's
    urgent = [asyncio.create_task(embed.submit(f"p1-{i}", priority=1)) for i in range(2)]
    assert await asyncio.wait_for(asyncio.gather(*urgent), 1) == ["p1-0", "p1-1"]
    assert ran == [["p1-0", "p1-1"]]
    assert not any(t.done() for t in later)
    arbiter.release(chat)
    assert await asyncio.wait_for(asyncio.gather(*later), 1) == ["p2-0", "p2-1", "p2-2"]
    assert ran[1] == ["p2-0", "p2-1", "p2-2"]
    await embed.close()


async def test_a_batcher_asks_for_its_next_batch_before_giving_its_grant_back() -> None:
    """A priority-1 batch ends while another model's priority-2 call has been waiting: the next
    priority-1 batch of the same model, queued meanwhile, goes first. (Were the grant given back
    before the batcher asked again, the waiter already queued would take it, and under load
    priority-1 batches would alternate with lower-priority calls.)"""
    arbiter = ComputeArbiter(1, aging_ms=0)
    ran: list[list[Any]] = []
    gate = asyncio.Event()

    async def execute(items: list[Any]) -> list[Any]:
        ran.append(list(items))
        await gate.wait()
        return items

    policy = BatchPolicy(max_batch_size=1, priority_levels=3, default_priority=2)
    embed = Batcher("embed", policy, execute, arbiter=arbiter)
    first = asyncio.create_task(embed.submit("a", priority=1))
    while not ran:
        await asyncio.sleep(0)
    seen_by_chat: list[list[list[Any]]] = []

    async def chat_step() -> None:
        async with arbiter.grant("chat", 2):
            seen_by_chat.append([list(b) for b in ran])

    chat = asyncio.create_task(chat_step())
    await asyncio.sleep(0.01)
    second = asyncio.create_task(embed.submit("b", priority=1))
    await asyncio.sleep(0.01)
    gate.set()
    assert (await asyncio.wait_for(asyncio.gather(first, second, chat), 2))[:2] == ["a", "b"]
    assert seen_by_chat == [[["a"], ["b"]]]
    await embed.close()


async def test_the_arbiter_says_whose_call_the_engine_came_back_from() -> None:
    arbiter = ComputeArbiter(1, aging_ms=0)
    assert arbiter.turn("embed") is None
    async with arbiter.grant("chat", 2):
        pass
    async with arbiter.grant("embed", 1):
        assert arbiter.turn("embed") == 2  # the engine came back from chat's priority-2 call
    async with arbiter.grant("embed", 1):
        assert arbiter.turn("embed") is None  # back to back: its own call came before
    async with arbiter.grant("chat", 3):
        assert arbiter.turn("chat") == 1


async def _overload_turns(share_turns: bool) -> list[list[str]]:
    """Priority 1 keeps arriving while a chat step (priority 2) runs, as under the overload
    benchmark: the embedding batcher always has priority-1 work queued when its batch ends."""
    arbiter = ComputeArbiter(1, aging_ms=0)
    ran: list[list[str]] = []
    gate = asyncio.Event()

    async def execute(items: list[str]) -> list[str]:
        ran.append(list(items))
        await gate.wait()
        return items

    policy = BatchPolicy(max_batch_size=4, priority_levels=3, default_priority=2, share_turns=share_turns)
    embed = Batcher("embed", policy, execute, arbiter=arbiter)
    chat = await arbiter.acquire("chat", 2)  # a decode step is running
    p2 = [asyncio.create_task(embed.submit(f"p2-{i}", priority=2)) for i in range(6)]
    p1 = [asyncio.create_task(embed.submit(f"p1-{i}", priority=1)) for i in range(2)]
    await asyncio.sleep(0.01)
    gate.clear()
    arbiter.release(chat)  # the engine comes back to the embedding model from the chat step
    while not ran:
        await asyncio.sleep(0)
    more = [asyncio.create_task(embed.submit(f"p1-{i}", priority=1)) for i in range(2, 4)]
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*p1, *more), 2)
    for t in p2:
        t.cancel()
    await embed.close()
    return ran


async def test_a_model_s_work_at_the_chat_s_level_gets_its_turn_beside_priority_1() -> None:
    """With share_turns (the default), the first batch after another model's priority-2 call
    takes this model's priority-2 items behind its priority-1 ones, up to the batch size; the
    batch after it, back to back, is priority 1 alone again. Off, priority 2 never runs while
    priority 1 keeps arriving (before this, under the overload benchmark, 217 of ~28,000
    priority-2 embeddings were answered in 30 s)."""
    assert (await _overload_turns(True))[:2] == [["p1-0", "p1-1", "p2-0", "p2-1"], ["p1-2", "p1-3"]]
    assert (await _overload_turns(False))[:2] == [["p1-0", "p1-1"], ["p1-2", "p1-3"]]


async def test_a_quiet_period_starts_once_running_calls_end_and_grants_nothing_until_it_ends() -> None:
    """A load's memory measurement runs with no engine call beside it (``quiet``): it waits for
    the calls running, new calls wait for it (the urgent lane too), and they then go by urgency."""
    arbiter = ComputeArbiter(1, aging_ms=0, urgent_lane=1)
    order: list[str] = []
    gate = asyncio.Event()
    running = asyncio.create_task(_hold(arbiter, "chat", 2, order, gate))
    await asyncio.sleep(0)

    async def measure() -> None:
        async with arbiter.quiet(5.0) as quiet:
            assert quiet and arbiter.held() == 0
            order.append("measure")
            await asyncio.sleep(0.01)
            assert arbiter.try_acquire("embed", 1) is None
            order.append("measured")

    measuring = asyncio.create_task(measure())
    await asyncio.sleep(0)
    later = [asyncio.create_task(_hold(arbiter, "embed", lvl, order, gate)) for lvl in (2, 1)]
    await asyncio.sleep(0)
    assert order == ["chat:2"], "the urgent lane is quiet too"
    gate.set()
    await asyncio.gather(running, measuring, *later)
    assert order == ["chat:2", "measure", "measured", "embed:1", "embed:2"]


async def test_a_quiet_period_waits_for_a_hung_call_only_so_long() -> None:
    arbiter = ComputeArbiter(1)
    held = arbiter.try_acquire("hung", 2)
    assert held is not None
    async with arbiter.quiet(0.05) as quiet:
        assert not quiet
    arbiter.release(held)
    assert arbiter.try_acquire("next", 2) is not None
