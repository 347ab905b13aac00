"""Supervision of background workers: no worker dies unnoticed.

Two kinds of worker are watched. Asyncio tasks (keep-alive expiry, the loop-lag probe, the GPU
sampler, schedulers) are started through :meth:`Supervisor.task`: when one ends with an exception
its stack is logged once, ``appliance_worker_failures_total{worker}`` counts it, and it is started
again after a short backoff. Threads (the response cache's writer) register an ``alive`` check and
a ``restart`` action; a monitor task polls them.

While a worker is down, ``/readyz`` answers 503 naming it. A worker that cannot be restarted
(``restart`` raised, or it died ``MAX_RESTARTS`` times in a minute) is reported as a stall to the
progress watchdog, which then stops the systemd pings, so systemd restarts the whole process.
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
    restart: Callable[[], None] | None = None
    up: bool = True
    given_up: bool = False
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

    def watch(self, name: str, alive: Callable[[], bool], restart: Callable[[], None]) -> None:
        """A thread (or anything polled): ``alive()`` False means dead; ``restart()`` revives it."""
        self._workers[name] = _Worker(name, alive, restart)
        self.metrics.child(self.metrics.worker_up, name).set(1)
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._poll(), name="supervisor")

    def unwatch(self, name: str) -> None:
        self._workers.pop(name, None)

    def task(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``factory()`` as a task for the life of the supervisor, restarting it if it dies."""
        worker = self._workers.setdefault(name, _Worker(name))
        self.metrics.child(self.metrics.worker_up, name).set(1)
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(worker, factory), name=name)

    async def close(self) -> None:
        self._closing = True
        tasks = [*self._tasks.values(), *([self._monitor] if self._monitor else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- state -----------------------------------------------------------------------------------

    def down(self) -> list[str]:
        return sorted(w.name for w in self._workers.values() if not w.up)

    def stalls(self) -> list[Stall]:
        return [Stall(f"worker:{w.name}", 0.0, 0.0) for w in self._workers.values() if w.given_up]

    def snapshot(self) -> dict[str, Any]:
        return {
            w.name: {"up": w.up, "given_up": w.given_up, "recent_failures": len(w.failures)}
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
        if exc is not None:
            log.error("worker %s died; restarting it", worker.name, exc_info=exc)
        else:
            log.error("worker %s is not running; restarting it", worker.name)
        recent = [t for t in worker.failures if now - t < 60]
        if len(recent) >= MAX_RESTARTS:
            worker.given_up = True
            log.critical(
                "worker %s died %d times in a minute: giving up, the watchdog will restart the process",
                worker.name,
                len(recent),
            )
        return BACKOFF_S[min(len(recent) - 1, len(BACKOFF_S) - 1)]

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
                try:
                    ok = worker.alive()
                except Exception:
                    ok = False
                if ok:
                    if not worker.up:
                        self._recovered(worker)
                    continue
                if worker.up:
                    self._failed(worker, None)
                if worker.given_up or worker.restart is None:
                    continue
                try:
                    worker.restart()
                except Exception:
                    log.exception("worker %s could not be restarted", worker.name)
                    worker.given_up = True
