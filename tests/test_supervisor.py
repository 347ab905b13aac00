"""Specifications for worker supervision (appliance.supervisor): a dead worker is logged, counted
and restarted after a backoff; a critical one is named by /readyz and, if it keeps dying, stops
the watchdog's pings; an optional one (telemetry, the cache) is only reported, and switched off."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import server, supervisor
from appliance.api.common import RESILIENCE, SUPERVISOR
from appliance.sdnotify import ProgressWatchdog
from appliance.supervisor import Supervisor
from appliance.telemetry import Metrics
from tests.conftest import ServerThread, metric

MODEL = "all-minilm-l6-v2"


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


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> tuple[float, ...]:
    """Polls and backoffs scaled down (same shape), so that five deaths take a fraction of a second."""
    backoff = (0.05, 0.1, 0.15, 0.2, 0.25)
    monkeypatch.setattr(supervisor, "POLL_S", 0.01)
    monkeypatch.setattr(supervisor, "BACKOFF_S", backoff)
    return backoff


class DyingThread:
    """A worker thread that dies of ``error`` on every start."""

    def __init__(self) -> None:
        self.error: BaseException | None = RuntimeError("injected: the thread's first death")
        self.thread: threading.Thread | None = None
        self.starts: list[float] = []

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def restart(self) -> None:
        self.starts.append(time.monotonic())
        self.thread = threading.Thread(target=lambda: None)
        self.thread.start()
        self.thread.join()


async def test_thread_restarts_back_off_and_log_the_threads_exception(
    quick: tuple[float, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A thread that dies again at once is restarted after the same growing backoff as a task
    (it used to be restarted on every poll), and the exception that ended it is logged here with
    its stack, not only by ``threading.excepthook`` on stderr."""
    metrics = Metrics()
    sup = Supervisor(metrics)
    worker = DyingThread()
    with caplog.at_level(logging.ERROR, "appliance.supervisor"):
        sup.watch("flaky-thread", worker.alive, worker.restart, error=lambda: worker.error)
        for _ in range(300):
            if sup.snapshot()["flaky-thread"]["given_up"]:
                break
            await asyncio.sleep(0.01)
    await sup.close()
    assert len(worker.starts) == 4  # the fifth death in a minute is given up on
    gaps = [b - a for a, b in zip(worker.starts, worker.starts[1:], strict=False)]
    for gap, backoff in zip(gaps, quick[1:4], strict=True):
        assert gap >= backoff, (gaps, quick)
    assert sample(metrics, "appliance_worker_failures_total", {"worker": "flaky-thread"}) == 5
    first = next(r for r in caplog.records if "died" in r.getMessage())
    assert first.exc_info is not None and first.exc_info[1] is not None
    assert str(first.exc_info[1]) == "injected: the thread's first death"


async def test_a_stalled_thread_that_then_dies_has_its_exception_logged(
    quick: tuple[float, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A thread stuck in a call (the GPU sampler in a hung NVML call) is down and reported once;
    when it then dies, the restart replaced it without a word of why: its exception is logged."""
    state: dict[str, Any] = {"stalled": True, "error": None, "restarts": 0}

    def alive() -> bool:
        return False  # stalled, then dead: down either way until restarted

    def restart() -> bool:
        if state["error"] is None:
            return False  # still running (stuck): nothing to replace
        state["restarts"] += 1
        state["error"] = None
        return True

    sup = Supervisor(Metrics())
    with caplog.at_level(logging.ERROR, "appliance.supervisor"):
        sup.watch("stuck-thread", alive, restart, critical=False, error=lambda: state["error"])
        await asyncio.sleep(0.2)  # down, reported without an exception
        state["error"] = RuntimeError("injected: died after its stall")
        for _ in range(200):
            if state["restarts"]:
                break
            await asyncio.sleep(0.01)
    await sup.close()
    assert state["restarts"] == 1
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [str(e) for e in logged] == ["injected: died after its stall"], caplog.records


async def test_an_optional_worker_never_fails_readiness_and_is_switched_off_when_given_up(
    quick: tuple[float, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """Telemetry and the cache are optional: the node serves without them. Down, such a worker is
    shown (``worker_up`` 0, failures counted, the stats) but not named by /readyz; given up, it is
    switched off with one error and the watchdog keeps pinging. It used to make the node unready
    from its first death, and, given up, stop the watchdog so that systemd restarted the process."""
    metrics = Metrics()
    progress = ProgressWatchdog()
    sup = Supervisor(metrics, progress)
    worker = DyingThread()
    switched_off: list[int] = []
    with caplog.at_level(logging.ERROR, "appliance.supervisor"):
        sup.watch(
            "telemetry",
            worker.alive,
            worker.restart,
            critical=False,
            on_give_up=lambda: switched_off.append(1),
        )
        for _ in range(300):
            assert sup.down() == []
            if sup.snapshot()["telemetry"]["given_up"]:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # polls after giving up change nothing
    await sup.close()
    assert sup.snapshot()["telemetry"] == {
        "up": False,
        "given_up": True,
        "recent_failures": 5,
        "critical": False,
    }
    assert sup.down() == [] and progress.healthy() and progress.stalls() == []
    assert switched_off == [1]
    assert sample(metrics, "appliance_worker_up", {"worker": "telemetry"}) == 0
    assert len([r for r in caplog.records if "giving up" in r.getMessage()]) == 1
    assert [r.levelno for r in caplog.records if "giving up" in r.getMessage()] == [logging.ERROR]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_cache_writer_that_keeps_dying_switches_the_cache_off_and_the_node_stays_ready(
    quick: tuple[float, ...], start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    """The response cache is a fallback: while its writer is down the node stays ready, and once
    the writer is given up the cache is switched off; answers keep coming, uncached, and the
    watchdog keeps pinging. The node used to stay 503 from the first death on, for good."""
    srv = start_server({MODEL: minilm_folder})

    class Injected(BaseException):
        pass

    def dying(batch: Any, sweep: bool) -> Any:
        raise Injected("injected writer death")

    def break_the_writer() -> None:
        cache = srv.app[RESILIENCE].cache
        assert cache is not None and cache.enabled
        cache._apply = dying  # type: ignore[method-assign]

    srv.call(break_the_writer)
    workers: dict[str, Any] = {}
    for i in range(200):
        status, _, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": f"new text {i}"})
        assert status == 200
        status, ready = srv.get("/readyz")
        assert status == 200 and ready["workers_down"] == [], ready
        workers = srv.call(lambda: srv.app[SUPERVISOR].snapshot())
        if workers["cache-writer"]["given_up"]:
            break
        time.sleep(0.02)
    assert workers["cache-writer"] == {"up": False, "given_up": True, "recent_failures": 5, "critical": False}
    cache = srv.app[RESILIENCE].cache
    assert cache is not None and not cache.enabled
    assert metric(srv, 'appliance_worker_up{worker="cache-writer"}') == 0
    assert metric(srv, 'appliance_worker_failures_total{worker="cache-writer"}') == 5
    assert srv.post("/v1/embeddings", {"model": MODEL, "input": "after the cache"})[0] == 200
    assert srv.get("/healthz?deep=1")[0] == 200 and srv.get("/readyz")[0] == 200


def test_a_watchdog_loop_that_raises_is_logged_and_counted(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    start_server: Callable[..., ServerThread],
    minilm_folder: Path,
) -> None:
    """The task that pings systemd's watchdog runs through the supervisor: one that raised used to
    end silently (the pings stopped, and systemd killed the process with nothing in the log)."""
    ended = threading.Event()

    async def watchdog_loop(notifier: Any, progress: Any) -> None:
        ended.set()
        raise OSError("injected: the notify socket went away")

    monkeypatch.setattr(server, "watchdog_loop", watchdog_loop)
    with caplog.at_level(logging.ERROR, "appliance.supervisor"):
        srv = start_server({MODEL: minilm_folder})
        assert ended.wait(10)
        assert metric(srv, 'appliance_worker_failures_total{worker="watchdog"}') == 1
    record = next(r for r in caplog.records if r.getMessage() == "start-up task watchdog failed")
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "notify socket" in str(record.exc_info[1])
