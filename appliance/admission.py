"""Admission, shared by the dynamic batcher (``appliance.batcher``) and the continuous-batching
scheduler (``appliance.llm.scheduler``): one vocabulary of refusals, one policy (priority levels,
per-level queue bounds, deadlines with Triton's override rule, aging), and early admission
(``EarlyAdmission.reserve``) that the request pipeline asks before any work is done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

REJECT_REASONS = ("queue_full", "deadline", "would_miss_deadline", "cancelled", "closed")


class AdmissionError(Exception):
    """Base of every refusal; ``reason`` is a stable label, ``retry_after_s`` a hint for Retry-After."""

    reason = "admission"

    def __init__(self, message: str, *, retry_after_s: float | None = None, priority: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.priority = priority


class InvalidPriority(AdmissionError, ValueError):
    reason = "invalid_priority"


class QueueFull(AdmissionError):
    reason = "queue_full"


class DeadlineExceeded(AdmissionError):
    reason = "deadline"


class WouldMissDeadline(AdmissionError):
    reason = "would_miss_deadline"


class BatcherClosed(AdmissionError):
    reason = "closed"


class ComputeStarved(AdmissionError):
    """No compute grant came within ``engine.timeout_ms``: more urgent work held the engines.
    An overload, never counted against the engine's health."""

    reason = "compute_starved"

    @classmethod
    def after(cls, waited_s: float, priority: int | None = None) -> ComputeStarved:
        """The refusal of a generation that got no compute time for ``waited_s`` (waiting for a
        grant, or between two tokens), with a Retry-After of 1 to 5 s."""
        return cls(
            f"the generation got no compute time for {waited_s * 1000:.0f} ms: more urgent work "
            "holds the engines; retry",
            retry_after_s=min(5.0, max(1.0, waited_s)),
            priority=priority,
        )


def retry_after(wait_s: float, timeout_s: float) -> float:
    """Retry-After for a request refused because its predicted wait exceeds its deadline: when
    the queue ahead of it will have drained enough, but no later than one deadline (or 1 s): by
    then every item queued now has been taken or has expired, and a prediction from a starved
    level's backlog (``appliance.drain``) may be long."""
    return min(wait_s - timeout_s, max(timeout_s, 1.0))


class PolicyError(ValueError):
    """A BatchPolicy field out of its range; ``field`` names it (for the setting behind it)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"BatchPolicy.{field} {detail}")
        self.field, self.detail = field, detail


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ms(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


@dataclass
class BatchPolicy:
    """Batching and admission settings. Mutable so they can change live; see ``Batcher.update_policy``."""

    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    priority_levels: int = 1
    default_priority: int = 1
    max_queue_size: int | list[int] = 0  # per level; 0 = unbounded; one int applies to every level
    default_timeout_ms: float = 0.0  # 0 = no deadline
    allow_timeout_override: bool = True
    aging_ms: float = 0.0  # 0 = strict priority
    # A batch that holds priority-1 work takes nothing of lower priority, so that it stays short.
    priority_1_alone: bool = True
    # ... except the first batch after another model's call, which also takes items as urgent
    # as that call: this model's work at that level then gets the engine in turn with the other's.
    share_turns: bool = True
    # While more urgent work is about (the compute arbiter's word), a less urgent batch is cut to
    # about this many ms of measured compute, so the urgent work waits at most about that. 0: off.
    urgent_batch_ms: float = 0.0
    # Predict a wait from each level's observed drain too (``appliance.drain``), not only from
    # the compute rate, so that a level starved of engine time is refused on arrival.
    observed_drain: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise PolicyError(name, f"must be {expected}, got {getattr(self, name)!r}")

        check(_is_int(self.max_batch_size) and self.max_batch_size >= 1, "max_batch_size", "an integer >= 1")
        check(_is_ms(self.max_queue_delay_ms), "max_queue_delay_ms", "a number >= 0")
        check(
            isinstance(self.preferred_batch_sizes, list)
            and all(_is_int(p) and 1 <= p <= self.max_batch_size for p in self.preferred_batch_sizes),
            "preferred_batch_sizes",
            f"a list of integers from 1 to max_batch_size ({self.max_batch_size})",
        )
        n = self.priority_levels
        check(_is_int(n) and n >= 1, "priority_levels", "an integer >= 1")
        check(
            _is_int(self.default_priority) and 1 <= self.default_priority <= n,
            "default_priority",
            f"an integer from 1 to priority_levels ({n})",
        )
        m = self.max_queue_size
        check(
            (_is_int(m) and m >= 0)
            or (isinstance(m, list) and len(m) == n and all(_is_int(x) and x >= 0 for x in m)),
            "max_queue_size",
            f"an integer >= 0 or a list of {n} such integers (0 = unbounded)",
        )
        check(_is_ms(self.default_timeout_ms), "default_timeout_ms", "a number >= 0 (0 = no deadline)")
        check(isinstance(self.allow_timeout_override, bool), "allow_timeout_override", "a bool")
        check(_is_ms(self.aging_ms), "aging_ms", "a number >= 0 (0 = strict priority)")
        check(_is_ms(self.urgent_batch_ms), "urgent_batch_ms", "a number >= 0 (0 = off)")
        check(isinstance(self.observed_drain, bool), "observed_drain", "a bool")

    def queue_limit(self, priority: int) -> int:
        m = self.max_queue_size
        return m if isinstance(m, int) else m[priority - 1]

    def effective_timeout_ms(self, requested: float | None) -> float:
        """Triton's rule: an override may only shorten the default, unless the default is 0 (none)."""
        if requested is not None and not (_is_ms(requested) and requested > 0):
            raise ValueError(f"timeout_ms must be a positive number of milliseconds, got {requested!r}")
        default = self.default_timeout_ms
        if requested is None or not self.allow_timeout_override:
            return default
        return requested if default == 0 else min(requested, default)

    def batch_size(self, queued: int) -> tuple[int, bool]:
        """Size to dispatch for ``queued`` waiting items, and whether that size is worth not waiting for."""
        if queued >= self.max_batch_size:
            return self.max_batch_size, True
        fits = [p for p in self.preferred_batch_sizes if p <= queued]
        return (max(fits), True) if fits else (queued, False)


class Admits(Protocol):
    """What early admission needs of a queue (a Batcher or a Scheduler)."""

    name: str

    @property
    def policy(self) -> BatchPolicy: ...

    @property
    def closed(self) -> bool: ...

    def queued(self, level: int) -> int: ...

    def retry_hint(self, level: int) -> float: ...

    def predicted_wait(self, level: int) -> float | None: ...

    def _refuse(self, error: AdmissionError) -> AdmissionError: ...


class Reservation:
    """Queue places held for a request between its early admission and its submits, so that a
    request admitted early is never refused later for a queue that filled meanwhile (and one
    refused early costs nothing). Unused places go back with ``release()``."""

    __slots__ = ("_batcher", "left", "level")

    def __init__(self, batcher: EarlyAdmission, level: int, count: int) -> None:
        self._batcher = batcher
        self.level = level
        self.left = count

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self._batcher._unreserve(self.level, 1)
        return True

    def release(self) -> None:
        if self.left > 0:
            self._batcher._unreserve(self.level, self.left)
            self.left = 0


class EarlyAdmission:
    """Queue places held between a request's early admission and its submits (mixed into the
    Batcher and the Scheduler, which provide ``Admits``)."""

    _reserved: dict[int, int]

    def refusal(self: Any, level: int, count: int, timeout_s: float = 0.0) -> AdmissionError | None:
        """The refusal ``submit`` would give now (QueueFull, WouldMissDeadline, BatcherClosed),
        counted as a rejection and returned, not raised (a raise costs the flooded loop); else
        None, holding nothing."""
        if self.closed:
            return self._refuse(BatcherClosed(f"{self.name!r} is closed", priority=level))
        return self._queue_refusal(level, count, timeout_s)

    def _queue_refusal(self: Any, level: int, count: int, timeout_s: float) -> AdmissionError | None:
        """``refusal`` for an open queue; its ``submit`` raises the same for an item nothing holds
        a place for (one decision, whether taken early or on arrival)."""
        if self._full(level, count):
            limit = self.policy.queue_limit(level)
            msg = f"queue for priority {level} of {self.name!r} is full ({limit} waiting)"
            return self._refuse(QueueFull(msg, retry_after_s=self.retry_hint(level), priority=level))
        wait = self._late(level, timeout_s)
        if wait is not None:
            msg = f"predicted wait {wait * 1000:.0f} ms exceeds the {timeout_s * 1000:.0f} ms timeout"
            retry = retry_after(wait, timeout_s)
            return self._refuse(WouldMissDeadline(msg, retry_after_s=retry, priority=level))
        return None

    def _full(self: Any, level: int, count: int) -> bool:
        """Whether ``count`` more items would overflow ``level``'s queue (places held included)."""
        limit = self.policy.queue_limit(level)
        return bool(limit) and self.queued(level) + self._reserved.get(level, 0) + count > limit

    def _late(self: Any, level: int, timeout_s: float) -> float | None:
        """The wait predicted for a newcomer at ``level`` when it exceeds ``timeout_s`` (0: no
        deadline), else None; None too before any observation (refusing on a guess is worse)."""
        wait = self.predicted_wait(level) if timeout_s else None
        return wait if wait is not None and wait > timeout_s else None

    def reserve(self: Any, level: int, count: int, timeout_s: float = 0.0) -> Reservation:
        """Raise the refusal ``submit`` would give (see ``refusal``), or hold ``count`` places at
        ``level``."""
        refused = self.refusal(level, count, timeout_s)
        if refused is not None:
            raise refused
        self._reserved[level] = self._reserved.get(level, 0) + count
        return Reservation(self, level, count)

    def refused_again(self: Any, level: int, error: AdmissionError, timeout_s: float = 0.0) -> bool:
        """Whether ``error``, a refusal decided moments before and replayed (``Pipeline.refusal``),
        still holds: ``level``'s queue is still full (refusing even one more item), or, for a
        predicted wait past the deadline, the wait predicted now still exceeds ``timeout_s``; if so
        it is counted as this queue counts any of its own. One call per replay, not two."""
        if self.closed:
            return False
        if isinstance(error, WouldMissDeadline):
            again = self._late(level, timeout_s) is not None
        else:
            again = self._full(level, 1)
        if again:
            self._refuse(error)
        return again

    def held(self, level: int) -> int:
        """Places held at ``level`` by early admissions that have not submitted yet."""
        return self._reserved.get(level, 0)

    def _unreserve(self, level: int, count: int) -> None:
        self._reserved[level] = max(0, self._reserved.get(level, 0) - count)
