"""systemd readiness and watchdog notifications, without a dependency.

The protocol (sd_notify(3)) is one datagram of newline-separated ``KEY=VALUE`` lines sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names an abstract socket. When the
variable is unset (a shell, a test, a container without systemd) every call is a silent no-op.

``ProgressWatchdog`` decides whether the process deserves a ``WATCHDOG=1``: the ping is proof of
progress, not of mere existence, so a thread that pings on a timer would hide exactly the hangs
(a wedged CUDA call, a blocked event loop) the watchdog exists to catch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = [
    "ComponentState",
    "Notifier",
    "ProgressWatchdog",
    "Stall",
    "notify",
    "watchdog_interval_s",
    "watchdog_loop",
]


def _socket_address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte and is not NUL-terminated.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd also accepts vsock: addresses (VMs); a Python server on one GPU box never gets one.
    return None


def _send(address: str | bytes, payload: bytes) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
        return True
    except OSError as exc:
        # Losing a notification must never take the server down; systemd notices missing
        # READY/WATCHDOG messages on its own.
        log.debug("sd_notify to %r failed: %s", address, exc)
        return False


def notify(*states: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=loading"``) as one message.

    Returns True when the datagram was sent, False when there is no ``$NOTIFY_SOCKET`` or
    sending failed. Never raises for a socket error.
    """
    if not states:
        return False
    for state in states:
        if "=" not in state or "\n" in state:
            raise ValueError(f"not a single KEY=VALUE notification: {state!r}")
    source = os.environ if env is None else env
    address = _socket_address(source.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    return _send(address, "\n".join(states).encode())


def watchdog_interval_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd enforces for this process, in seconds, or None if off.

    Mirrors sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the timeout (ping at least every
    half of it), and a ``$WATCHDOG_PID`` naming another process means the watchdog is that
    process's business (e.g. a child that inherited the environment).
    """
    source = os.environ if env is None else env
    raw = source.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = source.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            owner = int(raw_pid)
        except ValueError:
            return None
        if owner != (os.getpid() if pid is None else pid):
            return None
    return usec / 1_000_000


class Notifier:
    """sd_notify for one process, with the environment captured at construction.

    Capturing the environment once lets the server scrub ``NOTIFY_SOCKET`` from ``os.environ``
    afterwards so that subprocesses (compilers, ``nvidia-smi``) cannot speak for the service.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        source = os.environ if env is None else env
        self._env: dict[str, str] = {
            key: source[key] for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID") if key in source
        }

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured (running under Type=notify)."""
        return _socket_address(self._env.get("NOTIFY_SOCKET", "")) is not None

    def notify(self, *states: str) -> bool:
        return notify(*states, env=self._env)

    def ready(self, status: str | None = None) -> bool:
        """Startup is complete; systemd arms the watchdog from here on."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Free-form line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (drain); systemd stops expecting watchdog pings."""
        if status is None:
            return self.notify("STOPPING=1")
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time, e.g. while a large engine loads (systemd >= 236)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1_000_000))}")

    def watchdog_interval_s(self) -> float | None:
        """Watchdog timeout in seconds (ping at least every half of it), None when disabled."""
        return watchdog_interval_s(self._env)

    def watchdog_ping(self) -> bool:
        """``WATCHDOG=1``; skipped when the watchdog belongs to another process."""
        if self.watchdog_interval_s() is None:
            return False
        return self.notify("WATCHDOG=1")

    def watchdog_trigger(self) -> bool:
        """Ask systemd to act as if the watchdog expired now (a wedged GPU context).

        ``WATCHDOG=trigger`` needs a systemd that knows it (check sd_notify(3) on the target);
        an older one ignores the message and the missing pings still end the process.
        """
        return self.notify("WATCHDOG=trigger")


def _one_line(text: str) -> str:
    # A newline inside STATUS= would start a new KEY=VALUE assignment.
    return " ".join(text.split())


@dataclass(frozen=True)
class Stall:
    """A busy component that has shown no progress for longer than it is allowed."""

    component: str
    silent_s: float
    allowance_s: float


@dataclass(frozen=True)
class ComponentState:
    component: str
    busy: int
    silent_s: float
    allowance_s: float
    stalled: bool


@dataclass
class _Component:
    allowance_s: float
    last_progress: float
    busy: int = 0
    always_busy: bool = False
    work_allowance_s: float | None = None


class ProgressWatchdog:
    """Tracks whether every component that has work is making progress.

    - ``beat(c)``: evidence of progress (a decode step finished, the loop ticked).
    - ``begin(c)`` / ``end(c)``: work started / finished. Nested or concurrent work counts up.
    - A component is stalled when it is busy and silent (no beat, begin or end) for longer than
      its allowance. An idle component is never stalled: an engine with an empty queue has
      nothing to prove, so a quiet night does not restart the service.
    - ``register(c, always_busy=True)`` is for something that must always beat, such as an
      event-loop probe.

    Thread-safe: engine worker threads beat while the event loop asks ``healthy()``.
    """

    def __init__(
        self, *, default_allowance_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if default_allowance_s <= 0:
            raise ValueError("default_allowance_s must be positive")
        self._default = default_allowance_s
        self._clock = clock
        self._lock = threading.Lock()
        self._components: dict[str, _Component] = {}
        # Extra sources of stalls (the supervisor's workers that could not be restarted).
        self._checks: list[Callable[[], list[Stall]]] = []

    def add_check(self, check: Callable[[], list[Stall]]) -> None:
        self._checks.append(check)

    def register(
        self, component: str, allowance_s: float | None = None, *, always_busy: bool = False
    ) -> None:
        """Declare a component (optional: ``beat``/``begin`` register on first use)."""
        allowance = self._default if allowance_s is None else allowance_s
        if allowance <= 0:
            raise ValueError("allowance_s must be positive")
        with self._lock:
            now = self._clock()
            state = self._components.get(component)
            if state is None:
                self._components[component] = _Component(allowance, now, always_busy=always_busy)
            else:
                state.allowance_s = allowance
                state.always_busy = always_busy
                state.last_progress = now

    def unregister(self, component: str) -> None:
        """Forget a component (an engine that was unloaded)."""
        with self._lock:
            self._components.pop(component, None)

    def _get(self, component: str, now: float) -> _Component:
        state = self._components.get(component)
        if state is None:
            state = _Component(self._default, now)
            self._components[component] = state
        return state

    def beat(self, component: str) -> None:
        with self._lock:
            now = self._clock()
            self._get(component, now).last_progress = now

    def begin(self, component: str, allowance_s: float | None = None) -> None:
        """Work started. ``allowance_s`` overrides the allowance until the matching ``end``
        (a first TensorRT engine build may legitimately take minutes)."""
        if allowance_s is not None and allowance_s <= 0:
            raise ValueError("allowance_s must be positive")
        with self._lock:
            now = self._clock()
            state = self._get(component, now)
            state.busy += 1
            state.last_progress = now
            if allowance_s is not None:
                state.work_allowance_s = allowance_s

    def end(self, component: str) -> None:
        with self._lock:
            now = self._clock()
            state = self._get(component, now)
            state.busy = max(0, state.busy - 1)
            state.last_progress = now
            if state.busy == 0:
                state.work_allowance_s = None

    @contextlib.contextmanager
    def working(self, component: str, allowance_s: float | None = None) -> Iterator[None]:
        """``with wd.working("engine:minilm"): engine.run(...)`` brackets one batch."""
        self.begin(component, allowance_s)
        try:
            yield
        finally:
            self.end(component)

    def _states(self) -> list[ComponentState]:
        now = self._clock()
        out = []
        for name, state in self._components.items():
            allowance = state.work_allowance_s or state.allowance_s
            silent = max(0.0, now - state.last_progress)
            busy = state.busy or (1 if state.always_busy else 0)
            out.append(ComponentState(name, busy, silent, allowance, busy > 0 and silent > allowance))
        return out

    def snapshot(self) -> list[ComponentState]:
        """Every component's state, for /metrics and the console."""
        with self._lock:
            return self._states()

    def stalls(self) -> list[Stall]:
        with self._lock:
            found = [Stall(s.component, s.silent_s, s.allowance_s) for s in self._states() if s.stalled]
        for check in self._checks:
            found.extend(check())
        return found

    def healthy(self) -> bool:
        return not self.stalls()


async def watchdog_loop(
    notifier: Notifier,
    progress: ProgressWatchdog,
    *,
    interval_s: float | None = None,
    loop_component: str = "event-loop",
) -> None:
    """Ping systemd every ``interval_s`` (default: half the watchdog timeout) while healthy.

    Runs on the event loop on purpose: a blocked loop cannot run this coroutine, so the pings
    stop by themselves. Each tick also beats ``loop_component`` so that a thread reading
    ``progress`` sees the loop as alive. Returns at once when the watchdog is off and no
    interval is given; cancel the task at shutdown.
    """
    if interval_s is None:
        timeout = notifier.watchdog_interval_s()
        if timeout is None:
            return
        interval_s = timeout / 2
    progress.register(loop_component, allowance_s=max(interval_s * 2, 1.0), always_busy=True)
    reported: frozenset[str] = frozenset()
    while True:
        progress.beat(loop_component)
        stalls = progress.stalls()
        names = frozenset(s.component for s in stalls)
        if not stalls:
            notifier.watchdog_ping()
            if reported:
                log.warning("watchdog: all components progressing again")
                notifier.status("ok")
        elif names != reported:
            detail = ", ".join(
                f"{s.component} silent {s.silent_s:.0f}s > {s.allowance_s:.0f}s" for s in stalls
            )
            log.error("watchdog: withholding pings, stalled: %s", detail)
            notifier.status(f"stalled: {detail}")
        reported = names
        await asyncio.sleep(interval_s)
