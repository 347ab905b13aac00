"""Property: over random interleavings of requests, client hang-ups and engine faults on two
models whose batchers share one compute arbiter (as in the server), no request outlives its
deadline, and every queue, reservation and grant returns to zero afterwards.

The engine here is a coroutine that sleeps and sometimes raises (the property is about the
scheduling around engines, which real ONNX models cannot fail on demand); the batcher, arbiter,
reservations and the pipeline's deadline bound are the real ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.arbiter import ComputeArbiter
from appliance.batcher import AdmissionError, Batcher, BatchPolicy
from appliance.errors import ApplianceError
from appliance.pipeline import bounded

SLACK_S = 0.25  # the event loop's own scheduling on a loaded machine

request = st.fixed_dictionaries(
    {
        "model": st.sampled_from([0, 1]),
        "priority": st.integers(1, 3),
        "deadline_ms": st.integers(10, 150),
        "arrive_ms": st.integers(0, 60),
        "hangup_ms": st.none() | st.integers(0, 100),
    }
)
engine = st.fixed_dictionaries({"batch_ms": st.integers(0, 80), "fail_every": st.integers(0, 4)})


class Engine:
    def __init__(self, batch_ms: int, fail_every: int) -> None:
        self.batch_ms = batch_ms
        self.fail_every = fail_every
        self.batches = 0

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches += 1
        await asyncio.sleep(self.batch_ms / 1000)
        if self.fail_every and self.batches % self.fail_every == 0:
            raise RuntimeError("injected engine fault")
        return items


async def scenario(requests: list[dict[str, Any]], engines: list[dict[str, int]]) -> None:
    arbiter = ComputeArbiter(1, aging_ms=50)
    policy = {"max_batch_size": 4, "priority_levels": 3, "default_priority": 2, "max_queue_size": 6}
    batchers = [
        Batcher(f"m{i}", BatchPolicy(**policy), Engine(**engines[i]), arbiter=arbiter) for i in range(2)
    ]
    overdue: list[tuple[dict[str, Any], float]] = []

    async def client(i: int, r: dict[str, Any]) -> None:
        await asyncio.sleep(r["arrive_ms"] / 1000)
        b = batchers[r["model"]]
        deadline = r["deadline_ms"] / 1000
        started = time.monotonic()
        try:
            reservation = b.reserve(r["priority"], 1, deadline)
            try:
                await bounded(
                    b.submit(i, priority=r["priority"], timeout_ms=r["deadline_ms"], reservation=reservation),
                    deadline,
                    "computing",
                )
            finally:
                reservation.release()
        except (AdmissionError, ApplianceError, RuntimeError):
            pass  # refused, timed out, or the engine failed: an answer all the same
        took = time.monotonic() - started
        if took > deadline + SLACK_S:
            overdue.append((r, took))

    tasks = [asyncio.create_task(client(i, r)) for i, r in enumerate(requests)]
    for task, r in zip(tasks, requests, strict=True):
        if r["hangup_ms"] is not None:
            asyncio.get_running_loop().call_later(r["hangup_ms"] / 1000, task.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not overdue, overdue
    for b in batchers:  # running batches finish on their own: the engine always returns
        await asyncio.wait_for(b.close(), 5)
        assert all(b.queued(level) == 0 for level in (1, 2, 3))
        assert not any(b._reserved.values()), b._reserved
        assert b.snapshot()["running_batches"] == 0
    snap = arbiter.snapshot()
    assert snap["running"] == 0 and snap["waiting"] == {}, snap


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request, min_size=1, max_size=30), st.lists(engine, min_size=2, max_size=2))
def test_no_request_outlives_its_deadline_and_everything_returns_to_zero(
    requests: list[dict[str, Any]], engines: list[dict[str, int]]
) -> None:
    asyncio.run(scenario(requests, engines))
