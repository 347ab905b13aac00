"""Specifications for worker supervision (appliance.supervisor): a dead worker is logged, counted,
named by /readyz and restarted; one that keeps dying stops the watchdog's pings."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from appliance.sdnotify import ProgressWatchdog
from appliance.supervisor import Supervisor
from appliance.telemetry import Metrics


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_task_that_dies_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    sup = Supervisor(metrics)
    runs: list[int] = []
    alive = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("injected: the worker's first run dies")
        alive.set()
        await asyncio.sleep(3600)

    with caplog.at_level(logging.ERROR, "appliance.supervisor"):
        sup.task("flaky", flaky)
        await asyncio.wait_for(alive.wait(), 5)
    assert len(runs) == 2
    assert sample(metrics, "appliance_worker_failures_total", {"worker": "flaky"}) == 1
    assert sample(metrics, "appliance_worker_up", {"worker": "flaky"}) == 1
    assert sup.down() == []
    assert "worker flaky died" in caplog.text and "injected" in caplog.text
    await sup.close()


async def test_a_dead_thread_is_named_until_restarted() -> None:
    metrics = Metrics()
    sup = Supervisor(metrics)
    state = {"alive": False}
    restarted = threading.Event()

    def restart() -> None:
        state["alive"] = True
        restarted.set()

    sup.watch("writer", lambda: state["alive"], restart)
    for _ in range(100):
        if restarted.is_set():
            break
        await asyncio.sleep(0.05)
    assert restarted.is_set()
    assert sample(metrics, "appliance_worker_failures_total", {"worker": "writer"}) == 1
    await asyncio.sleep(0.7)  # the next poll sees it alive again
    assert sup.down() == []
    assert sample(metrics, "appliance_worker_up", {"worker": "writer"}) == 1
    await sup.close()


async def test_a_worker_that_cannot_be_restarted_stops_the_watchdog() -> None:
    metrics = Metrics()
    progress = ProgressWatchdog()
    sup = Supervisor(metrics, progress)

    def restart() -> None:
        raise OSError("injected: cannot start a thread")

    assert progress.healthy()
    sup.watch("writer", lambda: False, restart)
    for _ in range(100):
        if not progress.healthy():
            break
        await asyncio.sleep(0.05)
    assert [s.component for s in progress.stalls()] == ["worker:writer"]
    assert sup.down() == ["writer"]
    assert sample(metrics, "appliance_worker_up", {"worker": "writer"}) == 0
    await sup.close()
