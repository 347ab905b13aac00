"""Specifications for the compute arbiter (appliance.arbiter): engine time across models, by
priority, with aging, never losing a grant to a cancelled waiter. Batchers of two models share
one arbiter here, as every resident model does in the server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.arbiter import ComputeArbiter
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
    assert holder is None  # granted at once
    victim = asyncio.create_task(arbiter.acquire("b", 1))
    heir = asyncio.create_task(arbiter.acquire("c", 2))
    await asyncio.sleep(0)
    arbiter.release()  # hands the grant to "b" ...
    victim.cancel()  # ... which is cancelled in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await victim
    await asyncio.wait_for(heir, 1)  # the grant passed on
    assert arbiter.snapshot()["running"] == 1
    arbiter.release()
    assert arbiter.snapshot() == {"concurrency": 1, "aging_ms": 0, "running": 0, "waiting": {}, "granted": 3}


async def test_concurrency_allows_several_grants() -> None:
    arbiter = ComputeArbiter(2, aging_ms=0)
    assert await arbiter.acquire("a", 3) is None
    assert await arbiter.acquire("b", 3) is None
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
    assert other is None
    tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert sizes == []
    arbiter.release()
    assert await asyncio.gather(*tasks) == [0, 1, 2, 3, 4]
    assert sizes == [5]
    await b.close()
