"""Per-model circuit breaker: a Hystrix/Resilience4j hybrid with a time-based rolling window.

Why not a library: none of pybreaker, aiobreaker, purgatory or circuitbreaker bounds half-open
concurrency (a burst after the open period sends every caller to the sick backend), has a failure
*rate* with a minimum volume, counts slow calls, or has operator states. See
``reliability-anchors.md`` §1.

Use::

    permit = breaker.acquire()          # raises BreakerOpen -> serve the fallback
    with permit:                        # unresolved on exit -> ignored, never counted
        out = await run_model(...)
        permit.success(duration_s)      # or permit.failure("timeout"), permit.ignore()
    permit.failed_after("exception")    # a success at its first output that failed later

Only backend health is counted: exceptions, timeouts and OOM are failures; client errors, client
disconnects (``CancelledError``) and admission rejections are ``ignore()``-d. Keep the breaker
*outside* ``asyncio.wait_for()`` so a timeout reaches it as ``asyncio.TimeoutError``, not as a
cancellation.

All methods are thread-safe (engine threads may report outcomes). Time comes only from the
injected monotonic clock, so wall-clock jumps change nothing.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

FAILURE_KINDS = frozenset({"exception", "timeout", "oom"})


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


TransitionListener = Callable[[str, BreakerState, BreakerState, str], None]


@dataclass
class BreakerConfig:
    """Breaker tuning; mutable so an operator can change it live (call ``validate()`` first).

    Defaults follow Hystrix: 10 s window in 10 buckets, 20 calls minimum, trip at >= 50 % failures,
    5 s open, one probe.

    ``slow_call_ms`` defaults to 0 (slow-call tripping off): how long is "too slow" depends on the
    model class (an embedding call vs. a 2 000-token generation), and a global guess would trip a
    healthy LLM serving long completions. Set it per model from its p99 SLO; a call is slow when
    its duration is strictly greater than ``slow_call_ms``.

    Beyond the brief: ``probe_timeout_s`` releases a probe that never reports back (the Hystrix
    stuck-half-open bug, PR #1863) by counting it as failed; ``open_backoff_factor`` multiplies the
    open period after each failed probe, up to ``max_open_duration_s`` (1.0 = fixed, as Hystrix).
    """

    window_s: float = 10.0
    buckets: int = 10
    min_requests: int = 20
    failure_rate_threshold: float = 0.5
    slow_call_ms: float = 0.0
    slow_call_rate_threshold: float = 1.0
    open_duration_s: float = 5.0
    half_open_probes: int = 1
    probe_timeout_s: float = 60.0
    open_backoff_factor: float = 1.0
    max_open_duration_s: float = 60.0

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of bounds."""

        def need(name: str, ok: bool, bound: str) -> None:
            if not ok:
                raise ValueError(f"BreakerConfig.{name} must be {bound}, got {getattr(self, name)!r}")

        need("window_s", self.window_s > 0 and math.isfinite(self.window_s), "> 0")
        need("buckets", _is_int(self.buckets) and 1 <= self.buckets <= 1000, "an int in [1, 1000]")
        need("min_requests", _is_int(self.min_requests) and self.min_requests >= 1, "an int >= 1")
        need("failure_rate_threshold", 0 < self.failure_rate_threshold <= 1, "in (0, 1]")
        need("slow_call_ms", 0 <= self.slow_call_ms < math.inf, ">= 0 (0 = off)")
        need("slow_call_rate_threshold", 0 < self.slow_call_rate_threshold <= 1, "in (0, 1]")
        need("open_duration_s", 0 < self.open_duration_s < math.inf, "> 0")
        need("half_open_probes", _is_int(self.half_open_probes) and self.half_open_probes >= 1, "an int >= 1")
        need("probe_timeout_s", 0 < self.probe_timeout_s < math.inf, "> 0")
        need("open_backoff_factor", 1 <= self.open_backoff_factor < math.inf, ">= 1")
        need("max_open_duration_s", self.max_open_duration_s >= self.open_duration_s, ">= open_duration_s")


class BreakerOpen(Exception):
    """The breaker refused the call; serve the fallback or answer 503 with ``Retry-After``."""

    def __init__(self, retry_after_s: float, state: BreakerState, name: str = "") -> None:
        super().__init__(f"breaker {name!r} is {state}; retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s
        self.state = state
        self.name = name


class _Window:
    """Rolling counts in ``buckets`` time slots; a slot is reused (zeroed) once it is a window old.

    Summing ``buckets`` slots on read is O(buckets) and simpler than subtract-on-evict; with the
    default 10 buckets it costs nothing next to an inference call.
    """

    def __init__(self, window_s: float, buckets: int) -> None:
        self.geometry = (window_s, buckets)
        self._width = window_s / buckets
        self._n = buckets
        self._ids = [-(2**62)] * buckets
        self._counts = [[0, 0, 0] for _ in range(buckets)]  # calls, failures, slow

    def record(self, now: float, failed: bool, slow: bool) -> int:
        """Count one call; returns its bucket (for :meth:`amend`)."""
        bucket = math.floor(now / self._width)
        i = bucket % self._n
        if self._ids[i] != bucket:
            self._ids[i] = bucket
            self._counts[i] = [0, 0, 0]
        c = self._counts[i]
        c[0] += 1
        c[1] += failed
        c[2] += slow
        return bucket

    def amend(self, bucket: int, now: float) -> bool:
        """Turn one success counted in ``bucket`` into a failure; False once that bucket has
        left the window (or was reused), where there is nothing left to amend."""
        i = bucket % self._n
        if self._ids[i] != bucket or bucket < math.floor(now / self._width) - self._n + 1:
            return False
        self._counts[i][1] += 1
        return True

    def totals(self, now: float) -> tuple[int, int, int]:
        oldest = math.floor(now / self._width) - self._n + 1
        calls = failures = slow = 0
        for bucket, (c, f, s) in zip(self._ids, self._counts, strict=True):
            if bucket >= oldest:
                calls, failures, slow = calls + c, failures + f, slow + s
        return calls, failures, slow


class Permit:
    """One admitted call. Resolve it exactly once; later resolutions are no-ops.

    As a context manager it ``ignore()``-s itself on exit if still unresolved, so a forgotten or
    cancelled call is never counted and never pins a half-open probe slot.
    """

    __slots__ = ("_after", "_breaker", "_counted", "_late", "_probe", "_started", "_token", "resolved")

    def __init__(self, breaker: CircuitBreaker, probe: bool, token: int, started: float) -> None:
        self._breaker = breaker
        self._probe = probe
        self._token = token
        self._started = started
        self.resolved = False
        # Where a success was counted: the window and its bucket (see failed_after).
        self._counted: tuple[_Window, int] | None = None
        # A probe's success: the epoch it left the breaker in (half-open still, or the closed
        # state it led to), where a later failure of the same call proves it wrong.
        self._after: int | None = None
        self._late = False

    @property
    def is_probe(self) -> bool:
        return self._probe

    def success(self, duration_s: float | None = None) -> None:
        """The backend answered. ``duration_s`` defaults to the breaker clock since ``acquire()``."""
        self._breaker._resolve(self, "success", duration_s)

    def failure(self, kind: str = "exception") -> None:
        """The backend failed: ``kind`` is one of "exception", "timeout", "oom"."""
        if kind not in FAILURE_KINDS:
            # An unknown kind is a caller bug, but raising on an error path would mask the
            # original error: count it as a plain exception instead.
            log.error("breaker %s: unknown failure kind %r counted as 'exception'", self._breaker.name, kind)
            kind = "exception"
        self._breaker._resolve(self, kind, None)

    def ignore(self) -> None:
        """Not the backend's fault (4xx, client disconnect, admission rejection): count nothing."""
        self._breaker._resolve(self, "ignored", None)

    def failed_after(self, kind: str = "exception") -> None:
        """The call, resolved as a success at its first output (a generation's first token),
        failed later: the same call now counts as failed, not as a second call beside its
        success. Unresolved, it is :meth:`failure`. Once at most."""
        if not self.resolved:
            self.failure(kind)
            return
        self._breaker._amend(self, kind if kind in FAILURE_KINDS else "exception")

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.resolved:
            self.ignore()


class CircuitBreaker:
    """One breaker per model. See the module docstring for the contract."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: TransitionListener | None = None,
    ) -> None:
        self.name = name
        self.config = config if config is not None else BreakerConfig()
        self.config.validate()
        self._clock = clock
        self._on_transition = on_transition
        # RLock: a listener may call snapshot() while we still hold the lock.
        self._lock = threading.RLock()
        self._state = BreakerState.CLOSED
        self._window = _Window(self.config.window_s, self.config.buckets)
        self._open_until = 0.0
        self._opened_at = 0.0
        self._consecutive_opens = 0
        # Each state entry gets a fresh epoch; a probe only counts if it belongs to the current
        # half-open epoch, so late answers from an earlier period cannot close the breaker.
        self._epoch = 0
        self._tokens = itertools.count(1)
        self._probes: dict[int, float] = {}  # token -> started, for probes in flight
        self._probe_successes = 0
        self._transitions = 0
        self._totals: Counter[str] = Counter()

    # -- admission ---------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """Admit one call or raise BreakerOpen. Never blocks; check-and-claim is atomic."""
        with self._lock:
            now = self._clock()
            state = self._advance(now)
            if state in (BreakerState.CLOSED, BreakerState.DISABLED):
                self._totals["admitted"] += 1
                return Permit(self, False, self._epoch, now)
            if state is BreakerState.HALF_OPEN and self._probes_admitted() < self.config.half_open_probes:
                token = next(self._tokens)
                self._probes[token] = now
                self._totals["admitted"] += 1
                self._totals["probes"] += 1
                return Permit(self, True, token, now)
            self._totals["rejected"] += 1
            raise BreakerOpen(self._retry_after(now), state, self.name)

    def report(self, kind: str) -> None:
        """A failure with no permit to tell it by: counted in the window as a failed call,
        outside any probe. (A call's own later failure is :meth:`Permit.failed_after`.)"""
        with self._lock:
            token, now = self._epoch, self._clock()
        Permit(self, False, token, now).failure(kind)

    def _amend(self, permit: Permit, kind: str) -> None:
        with self._lock:
            if permit._late:
                return
            permit._late = True
            counted = permit._counted
            now = self._clock()
            if permit._probe and permit._after == self._epoch:
                # A probe judged by its first output (a generation's first token) closed the
                # breaker, or counted towards closing it, and then failed: the engine is not
                # mended. Counted in the new window only, the breaker stayed closed to every
                # caller until min_requests more failed.
                self._totals[kind] += 1
                self._trip(f"probe failed after its first output: {kind}", now)
                return
            # A generation failing after its first token counted twice, a success and a
            # failure: a model failing every one never passed a failure rate of 0.5.
            if (
                counted is not None
                and counted[0] is self._window
                and permit._token == self._epoch
                and self._state is BreakerState.CLOSED
                and counted[0].amend(counted[1], now)
            ):
                self._totals[kind] += 1
                self._judge(now)
                return
        # Its success is in no window this breaker still judges by (a probe's, one from before a
        # transition or aged out of the window): a failure of its own.
        self.report(kind)

    def _probes_admitted(self) -> int:
        return len(self._probes) + self._probe_successes

    def _retry_after(self, now: float) -> float:
        if self._state is BreakerState.OPEN:
            return max(0.0, self._open_until - now)
        if self._state is BreakerState.HALF_OPEN:
            # The probe's answer usually arrives within a second; polling sooner only gets rejected.
            return min(1.0, self.config.open_duration_s)
        return self.config.open_duration_s  # forced open: no schedule, so hint one open period

    def _advance(self, now: float) -> BreakerState:
        """Apply the transitions that are due by time alone (no timer thread, as Resilience4j)."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._to(BreakerState.HALF_OPEN, "open period elapsed", now)
        if self._state is BreakerState.HALF_OPEN:
            deadline = now - self.config.probe_timeout_s
            if any(started <= deadline for started in self._probes.values()):
                self._trip(f"probe gave no answer within {self.config.probe_timeout_s:g} s", now)
        return self._state

    # -- outcomes ----------------------------------------------------------------------------

    def _resolve(self, permit: Permit, outcome: str, duration_s: float | None) -> None:
        with self._lock:
            if permit.resolved:
                return
            permit.resolved = True
            now = self._clock()
            self._totals[outcome] += 1
            if duration_s is None:
                duration_s = now - permit._started
            cfg = self.config
            slow = outcome == "success" and cfg.slow_call_ms > 0 and duration_s * 1000.0 > cfg.slow_call_ms
            if slow:
                self._totals["slow"] += 1
            if permit._probe:
                if self._state is not BreakerState.HALF_OPEN or self._probes.pop(permit._token, None) is None:
                    return  # a probe from an earlier half-open period: stale, not evidence
                if outcome == "ignored":
                    return  # slot freed: the next caller becomes the probe
                if outcome != "success" or slow:
                    self._trip(f"probe {'was slow' if slow else 'failed: ' + outcome}", now)
                    return
                self._probe_successes += 1
                if self._probe_successes >= cfg.half_open_probes:
                    self._to(BreakerState.CLOSED, f"{self._probe_successes} probe(s) succeeded", now)
                permit._after = self._epoch
                return
            # Only CLOSED keeps statistics: HALF_OPEN is judged by its probes alone, and
            # DISABLED/FORCED_OPEN record nothing (as Resilience4j).
            if outcome == "ignored" or self._state is not BreakerState.CLOSED or permit._token != self._epoch:
                return
            window = self._current_window()
            bucket = window.record(now, outcome != "success", slow)
            if outcome == "success":
                permit._counted = (window, bucket)
            self._judge(now)

    def _judge(self, now: float) -> None:
        """Trip if the window's rates call for it (CLOSED only; under the lock)."""
        cfg = self.config
        calls, failures, slow_calls = self._current_window().totals(now)
        if calls < cfg.min_requests:
            return
        if failures / calls >= cfg.failure_rate_threshold:
            self._trip(f"failure rate {failures}/{calls} >= {cfg.failure_rate_threshold:g}", now)
        elif cfg.slow_call_ms > 0 and slow_calls / calls >= cfg.slow_call_rate_threshold:
            self._trip(
                f"slow-call rate {slow_calls}/{calls} (> {cfg.slow_call_ms:g} ms)"
                f" >= {cfg.slow_call_rate_threshold:g}",
                now,
            )

    def _current_window(self) -> _Window:
        # window_s/buckets may be tuned live; stats under the old geometry cannot be re-bucketed.
        geometry = (self.config.window_s, self.config.buckets)
        if self._window.geometry != geometry:
            self._window = _Window(*geometry)
        return self._window

    # -- transitions -------------------------------------------------------------------------

    def _open_duration(self, opens_before: int) -> float:
        cfg = self.config
        return min(cfg.open_duration_s * cfg.open_backoff_factor**opens_before, cfg.max_open_duration_s)

    def _trip(self, reason: str, now: float) -> None:
        duration = self._open_duration(self._consecutive_opens)
        self._consecutive_opens += 1
        self._opened_at, self._open_until = now, now + duration
        self._to(BreakerState.OPEN, f"{reason}; open for {duration:g} s", now)

    def _to(self, new: BreakerState, reason: str, now: float) -> None:
        old = self._state
        self._state = new
        self._epoch = next(self._tokens)
        self._probes.clear()
        self._probe_successes = 0
        self._transitions += 1
        if new in (BreakerState.CLOSED, BreakerState.DISABLED, BreakerState.FORCED_OPEN):
            self._consecutive_opens = 0
        if new is BreakerState.CLOSED:
            self._window = _Window(self.config.window_s, self.config.buckets)
        level = logging.WARNING if new in (BreakerState.OPEN, BreakerState.FORCED_OPEN) else logging.INFO
        log.log(level, "breaker %s: %s -> %s (%s)", self.name, old, new, reason)
        if self._on_transition is not None:
            try:
                self._on_transition(self.name, old, new, reason)
            except Exception:
                log.exception("breaker %s: transition listener failed", self.name)

    # -- operator ----------------------------------------------------------------------------

    def force_open(self, reason: str = "operator") -> None:
        """Reject every call until ``reset()``."""
        with self._lock:
            self._to(BreakerState.FORCED_OPEN, reason, self._clock())

    def disable(self, reason: str = "operator") -> None:
        """Admit every call and never trip, until ``reset()``."""
        with self._lock:
            self._to(BreakerState.DISABLED, reason, self._clock())

    def reset(self, reason: str = "operator") -> None:
        """Back to CLOSED with an empty window and no open-period backoff."""
        with self._lock:
            self._to(BreakerState.CLOSED, reason, self._clock())

    def reconfigure(self, **changes: Any) -> None:
        """Apply field changes atomically, after validating them together."""
        names = {f.name for f in fields(BreakerConfig)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown BreakerConfig field(s): {', '.join(sorted(unknown))}")
        candidate = BreakerConfig(**{**{n: getattr(self.config, n) for n in names}, **changes})
        candidate.validate()
        with self._lock:
            for key, value in changes.items():
                setattr(self.config, key, value)
            if self._state is BreakerState.OPEN:
                # The open period running now follows the new schedule, as Hystrix reads its
                # sleep window at each check: an operator who lowers it to let a mended engine
                # back sooner waited out the old one (up to max_open_duration_s).
                self._open_until = self._opened_at + self._open_duration(self._consecutive_opens - 1)

    # -- observation -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._advance(self._clock())

    def snapshot(self) -> dict[str, Any]:
        """State and window statistics for /admin and metrics (rates are 0.0 with no calls)."""
        with self._lock:
            now = self._clock()
            self._advance(now)
            calls, failures, slow = self._current_window().totals(now)
            return {
                "name": self.name,
                "state": self._state.value,
                "calls_in_window": calls,
                "failures_in_window": failures,
                "slow_in_window": slow,
                "failure_rate": failures / calls if calls else 0.0,
                "slow_call_rate": slow / calls if calls else 0.0,
                "open_remaining_s": max(0.0, self._open_until - now)
                if self._state is BreakerState.OPEN
                else 0.0,
                "probes_in_flight": len(self._probes),
                "transitions": self._transitions,
                "totals": dict(self._totals),
            }
