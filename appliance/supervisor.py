"""Supervision of background workers: no worker dies unnoticed.

Two kinds of worker are watched. Asyncio tasks (keep-alive expiry, the loop-lag probe, the
send-timeout reaper) are started through :meth:`Supervisor.task`: when one ends with an
exception its stack is logged once, ``appliance_worker_failures_total{worker}`` counts it, and it is
started again after a short backoff. Threads (the response cache's writer, the GPU sampler) register
an ``alive`` check, a ``restart`` action and optionally an ``error`` reader (the exception that
ended the thread, logged here with its stack); a monitor task polls them and restarts a dead one
after the same backoff. A task that must not run twice (the model loads at start-up, the READY
announcement, the systemd watchdog's pings) goes through :meth:`Supervisor.once`: its failure is
logged with its stack and counted, never silent.

Workers are critical or optional. While a critical worker is down, ``/readyz`` answers 503 naming
it; one that cannot be restarted (``restart`` raised, or it died ``MAX_RESTARTS`` times in a minute)
is reported as a stall to the progress watchdog, which then stops the systemd pings, so systemd
restarts the whole process. An optional worker (telemetry, the response cache: the node serves
without them) shows only in ``/admin/stats`` and the metrics (``appliance_worker_up`` 0, failures
counted); given up, it is disabled (its ``on_give_up`` runs) with one error log, and the node stays
ready: restarting the process over lost GPU telemetry would cost every client their requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from appliance.sdnotify import ProgressWatchdog, Stall
from appliance.telemetry import Metrics

log = logging.getLogger(__name__)

MAX_RESTARTS = 5  # per minute; past that the process is restarted by systemd instead
BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
POLL_S = 0.5


@dataclass
class _Worker:
    name: str
    alive: Callable[[], bool] | None = None
    restart: Callable[[], bool | None] | None = None
    critical: bool = True
    error: Callable[[], BaseException | None] | None = None
    on_give_up: Callable[[], None] | None = None
    up: bool = True
    given_up: bool = False
    restart_at: float = 0.0  # monotonic time before which a dead thread is not restarted (backoff)
    reported: BaseException | None = None  # the last error logged, so that none is logged twice
    failures: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_RESTARTS))


class Supervisor:
    def __init__(self, metrics: Metrics, progress: ProgressWatchdog | None = None) -> None:
        self.metrics = metrics
        self._workers: dict[str, _Worker] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False
        if progress is not None:
            progress.add_check(self.stalls)

    # -- registration --------------------------------------------------------------------------

    def watch(
        self,
        name: str,
        alive: Callable[[], bool],
        restart: Callable[[], bool | None],
        *,
        critical: bool = True,
        error: Callable[[], BaseException | None] | None = None,
        on_give_up: Callable[[], None] | None = None,
    ) -> None:
        """A thread (or anything polled): ``alive()`` False means dead (or stalled); ``restart()``
        revives it, or returns False when there is nothing it can replace (a stalled thread still
        runs); ``error()`` is the exception that ended it, if it kept one."""
        self._workers[name] = _Worker(name, alive, restart, critical, error, on_give_up)
        self.metrics.child(self.metrics.worker_up, name).set(1)
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._poll(), name="supervisor")

    def unwatch(self, name: str) -> None:
        self._workers.pop(name, None)

    def task(
        self, name: str, factory: Callable[[], Coroutine[Any, Any, None]], *, critical: bool = True
    ) -> None:
        """Run ``factory()`` as a task for the life of the supervisor, restarting it if it dies."""
        worker = self._workers.setdefault(name, _Worker(name, critical=critical))
        self.metrics.child(self.metrics.worker_up, name).set(1)
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(worker, factory), name=name)

    def once(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` once (a start-up step that must not run twice): not restarted, but an
        exception is logged with its stack and counted in ``appliance_worker_failures_total``
        rather than kept, unread, on a task nobody awaits until shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or t.exception() is None:
                return
            self.metrics.child(self.metrics.worker_failures, name).inc()
            log.error("start-up task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._tasks.values(), *([self._monitor] if self._monitor else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- state -----------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """The critical workers that are down (what ``/readyz`` names)."""
        return sorted(w.name for w in self._workers.values() if not w.up and w.critical)

    def stalls(self) -> list[Stall]:
        return [
            Stall(f"worker:{w.name}", 0.0, 0.0) for w in self._workers.values() if w.given_up and w.critical
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            w.name: {
                "up": w.up,
                "given_up": w.given_up,
                "recent_failures": len(w.failures),
                "critical": w.critical,
            }
            for w in self._workers.values()
        }

    # -- internals -------------------------------------------------------------------------------

    def _failed(self, worker: _Worker, exc: BaseException | None) -> float:
        """Record a death; returns the backoff before the restart (or marks it given up)."""
        now = time.monotonic()
        worker.up = False
        worker.failures.append(now)
        self.metrics.child(self.metrics.worker_failures, worker.name).inc()
        self.metrics.child(self.metrics.worker_up, worker.name).set(0)
        recent = [t for t in worker.failures if now - t < 60]
        if len(recent) >= MAX_RESTARTS:
            self._give_up(worker, f"died {len(recent)} times in a minute", exc)
        elif exc is not None:
            worker.reported = exc
            log.error("worker %s died; restarting it", worker.name, exc_info=exc)
        else:
            log.error("worker %s is down (not running, or stalled); restarting it if it can be", worker.name)
        return BACKOFF_S[min(len(recent) - 1, len(BACKOFF_S) - 1)]

    def _give_up(self, worker: _Worker, why: str, exc: BaseException | None) -> None:
        worker.given_up = True
        if worker.critical:
            log.critical(
                "worker %s %s: giving up, the watchdog will restart the process",
                worker.name,
                why,
                exc_info=exc,
            )
            return
        log.error(
            "worker %s %s: giving up; it is optional, so it stays off and the node keeps serving",
            worker.name,
            why,
            exc_info=exc,
        )
        if worker.on_give_up is not None:
            try:
                worker.on_give_up()
            except Exception:
                log.exception("worker %s: switching it off failed", worker.name)

    def _recovered(self, worker: _Worker) -> None:
        worker.up = True
        self.metrics.child(self.metrics.worker_up, worker.name).set(1)

    async def _keep(self, worker: _Worker, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while not self._closing:
            try:
                await factory()
                return  # finished on purpose
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = self._failed(worker, exc)
                if worker.given_up:
                    return
                await asyncio.sleep(backoff)
                self._recovered(worker)

    async def _poll(self) -> None:
        while not self._closing:
            await asyncio.sleep(POLL_S)
            for worker in list(self._workers.values()):
                if worker.alive is None or worker.given_up:
                    continue
                ok = _is_alive(worker)
                if ok:
                    if not worker.up:
                        self._recovered(worker)
                    continue
                if worker.up:
                    exc = _read_error(worker)
                    worker.restart_at = time.monotonic() + self._failed(worker, exc)
                if worker.given_up or worker.restart is None or time.monotonic() < worker.restart_at:
                    continue
                # A thread that stalled (down, counted) and then died: its exception came after
                # the one report of its going down, and would go unlogged with the restart.
                died = _read_error(worker)
                try:
                    restarted = worker.restart()
                except Exception as exc:
                    self._give_up(worker, "could not be restarted", exc)
                    continue
                if restarted is not False and died is not None and died is not worker.reported:
                    worker.reported = died
                    log.error("worker %s died while down; restarted it", worker.name, exc_info=died)
                # Up once restarted, so that a thread that dies again at once is counted again
                # (and backs off longer), as a task is; it used to be restarted on every poll,
                # uncounted. A stalled thread (alive, stuck in a call) cannot be replaced: it stays
                # down, counted once, until it makes progress again.
                if restarted is not False:
                    self._recovered(worker)


def _is_alive(worker: _Worker) -> bool:
    assert worker.alive is not None
    try:
        return worker.alive()
    except Exception:
        return False


def _read_error(worker: _Worker) -> BaseException | None:
    if worker.error is None:
        return None
    try:
        return worker.error()
    except Exception:
        return None
