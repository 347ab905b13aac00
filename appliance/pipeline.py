"""The request pipeline: every data-plane route (OpenAI embeddings, chat and completions whole and
streamed, KServe infer) goes through it, and it applies every policy in one order:

1. **authenticate** (the HTTP middleware, before the body is read);
2. **resolve priority**: the request's level, else the model's default; a key's cap lowers it
   (never refuses), and a cap above the model's levels is lowered to its lowest level;
3. **shed early**: refuse at once (429 + Retry-After) when that level's queue is full, before any
   tokenizing, hashing or cache lookup (on the OpenAI routes, before the route even runs:
   ``Pipeline.refusal``, asked by the HTTP front door with the model, priority and deadline);
4. **deadline**: the request's own (``X-Timeout-Ms``, KServe ``timeout``), else the model's
   ``queue.default_timeout_ms``; every later await is bounded by it;
5. **response-cache read**, keyed by the model's identity (name + artefact digest) without loading
   the model, so a hit never loads or evicts anything;
6. **breaker permit**;
7. **model load** (bounded; a load failure goes down the fallback chain like an engine failure);
8. **admission and engine** (the route's computation: batcher or scheduler, compute arbiter);
9. **cache write** (bounded; under FULL durability the answer waits for the commit, but never
   longer than the deadline, and says so when the entry was not stored);
10. **render** (the route).

When the breaker is open, the model cannot load or the engine fails, the answer comes from a fresh
then a stale cache entry, then the model's default response, then a 503 with Retry-After. A stream
is a first-class outcome of the same chain: the breaker judges it by its time to first token and
by stalls between tokens (``engine.timeout_ms``), never by its length.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from appliance.admission import AdmissionError, ComputeStarved, QueueFull, Reservation, WouldMissDeadline
from appliance.auth import ApiKeyRecord
from appliance.breaker import BreakerOpen, BreakerState, Permit
from appliance.cache import CacheHit, cache_key
from appliance.errors import (
    ApplianceError,
    EngineFailure,
    InvalidRequest,
    LoadFailed,
    ModelNotFound,
    ModelUnloading,
    Unavailable,
)
from appliance.inference import admission_error
from appliance.models import ModelManager, ModelRuntime, ModelSlot
from appliance.resilience import Answer, Resilience
from appliance.telemetry import Metrics
from appliance.timeouts import within

log = logging.getLogger(__name__)

T = TypeVar("T")
UNBOUNDED_S = 600.0  # a request with no deadline at all still ends: nothing waits forever
CACHE_IO_S = 2.0  # a cache read or FULL commit taking longer than this is a miss / not stored


class DeadlinePassed(Unavailable):
    code = "deadline_exceeded"


@dataclass
class Ticket:
    """One admitted request as the pipeline tracks it."""

    model: str
    level: int
    deadline: float  # time.monotonic() by which the request ends
    explicit_deadline: bool  # the client set it: it bounds a generation end to end
    read_cache: bool = True
    write_cache: bool = True
    values: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    stored: bool | None = None  # None: not written; False: a write was dropped
    cacheable: bool = False  # deterministic work with a cache key (set by the cache read)
    # Called by a computation when its first output exists (a generation's first token): the
    # breaker judges generations by their time to first token.
    first_output: Callable[[], None] = lambda: None
    # The breaker's permit of the computation, once admitted: a failure after the first output
    # turns that call's success into a failure (Permit.failed_after), not a second call.
    permit: Permit | None = None
    pipeline: Pipeline | None = None
    # Queue places held since early admission; the HTTP layer releases what is left when the
    # request ends, whatever way it ends.
    reservation: Reservation | None = None
    not_loaded: str = ""  # why the model could not be had: "failed to load (its reason)", ...
    load_retry_s: float = 1.0  # when the failed load is next tried: the 503's Retry-After

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

    def queue_level(self) -> int:
        """The level to queue at. ``level`` was judged on arrival; an operator may have lowered
        the model's priority_levels since (while this request loaded the model, say): it then
        joins the new lowest level, as what already waits on a removed level does, instead of a
        400 for a level that was valid, or that the client never named."""
        if self.pipeline is None:
            return self.level
        try:
            levels = int(self.pipeline.manager.tunables(self.model)["queue.priority_levels"])
        except ModelNotFound:  # its slot went (its folder removed): the queue itself will say
            return self.level
        return min(self.level, levels)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout_ms(self) -> float:
        """What is left of the deadline, for the batcher or scheduler queue."""
        return max(1.0, self.remaining() * 1000)


class Computation(Protocol):
    """A whole answer, as a route hands it to the pipeline."""

    @property
    def canonical(self) -> Mapping[str, Any] | None: ...  # the cache key's content; None: never cached

    @property
    def blobs(self) -> Sequence[bytes]: ...

    async def compute(self, runtime: ModelRuntime, ticket: Ticket) -> tuple[bytes, str]: ...

    def default(self) -> tuple[bytes, str] | None: ...


class EventStream(Protocol):
    """A running generation: Token / Finished events; failures raise ApplianceError."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def __anext__(self) -> Any: ...

    def close(self) -> None: ...

    # Whether an engine call has been running for ``seconds`` (a stall is then the engine's).
    def engine_stalled(self, seconds: float) -> bool: ...


class Generation(Protocol):
    @property
    def canonical(self) -> Mapping[str, Any] | None: ...  # the cache key's content; None: never cached

    @property
    def blobs(self) -> Sequence[bytes]: ...

    def start(self, runtime: ModelRuntime, ticket: Ticket) -> EventStream: ...

    def default(self) -> tuple[bytes, str] | None: ...


async def bounded(aw: Awaitable[T], seconds: float, what: str) -> T:
    """``aw`` within ``seconds``, else a 503 that says what did not finish in time."""
    if seconds <= 0:
        if asyncio.iscoroutine(aw):
            aw.close()
        raise DeadlinePassed(f"the request's deadline passed before {what}", retry_after_s=1.0)
    try:
        return await within(aw, seconds)
    except asyncio.TimeoutError:
        raise DeadlinePassed(
            f"the request's deadline passed while {what} (it had {seconds * 1000:.0f} ms)", retry_after_s=1.0
        ) from None


@dataclass
class _Refused:
    """A full-queue or predicted-wait refusal as decided once for a (model, priority, key cap,
    deadline), replayed for the next identical requests while the same queue would still refuse
    them so (still full; still predicting a wait past the deadline), under the same settings, for
    at most ``REPLAY_S`` (its Retry-After and the wait its message names are that fresh).

    The runtime is held weakly: a replay that outlived its model's unload kept the unloaded
    model's engine, scheduler and prefix cache alive (548 MiB in a probe's soak) while the memory
    manager counted them as freed."""

    runtime: weakref.ref[ModelRuntime]
    entry: Any  # the slot's ModelEntry, and the settings the level was resolved under
    defaults: Any
    overrides: Any
    level: int
    timeout_s: float  # the deadline the prediction was judged against (0: none)
    cause: AdmissionError
    error: ApplianceError
    shed: Any  # the shed counter's labelled child
    until: float


REPLAY_S = 0.1
_REFUSED_MAX = 256


class Pipeline:
    def __init__(self, manager: ModelManager, resilience: Resilience, metrics: Metrics) -> None:
        self.manager = manager
        self.resilience = resilience
        self.metrics = metrics
        self._refused: dict[tuple[Any, ...], _Refused] = {}

    # -- 2-4: priority, early shedding, deadline -------------------------------------------------

    def admit(
        self,
        model: Any,
        *,
        priority: Any = None,
        key: ApiKeyRecord | None = None,
        timeout_ms: float | None = None,
        items: int = 1,
        cache_control: str = "",
    ) -> Ticket:
        """Resolve the request's policies and refuse it now if its queue is full. Cheap: no
        tokenizing, hashing, cache or model load happens before this answers."""
        slot, values, level, seconds, explicit = self._resolve(model, priority, key, timeout_ms)
        runtime = slot.runtime
        reservation = (
            self._shed(model, runtime, level, items, values, seconds) if runtime is not None else None
        )
        directives = {d.strip().lower() for d in cache_control.split(",")} if cache_control else set()
        return Ticket(
            model,
            level,
            time.monotonic() + seconds,
            explicit,
            read_cache="no-cache" not in directives,
            write_cache="no-store" not in directives,
            values=values,
            pipeline=self,
            reservation=reservation,
        )

    def refusal(
        self,
        model: str,
        *,
        priority: Any = None,
        key: ApiKeyRecord | None = None,
        timeout_ms: float | None = None,
    ) -> tuple[ApplianceError, int] | None:
        """Shed before work: the refusal early admission would give a request for ``model`` at this
        priority and deadline even with a single item, and its level; None when its queue would
        take it, or when anything about it is unusual (``admit`` then gives the precise answer).
        Holds nothing: a request this lets through is admitted as usual. Under a flood, most calls
        replay a full-queue refusal decided moments before (``_Refused``)."""
        cap = getattr(key, "max_priority", None)
        memo = (model, priority, cap, timeout_ms)
        now = time.monotonic()
        hit = self._refused.get(memo)
        if hit is not None:
            slot = self.manager.slots.get(model)
            cfg = self.manager.cfg
            replayed = hit.runtime()
            if (
                hit.until > now
                and replayed is not None
                and slot is not None
                and slot.runtime is replayed
                and slot.entry is hit.entry
                and cfg.defaults is hit.defaults
                and cfg.model_overrides is hit.overrides
                and replayed.batcher.refused_again(hit.level, hit.cause, hit.timeout_s)
            ):
                hit.shed.inc()
                return hit.error, hit.level
            del self._refused[memo]
        try:
            slot, _, level, seconds, _ = self._resolve(model, priority, key, timeout_ms)
        except ApplianceError:
            return None
        runtime = slot.runtime
        if runtime is None:
            return None  # not loaded: admit loads it, or answers why not
        timeout_s = seconds if seconds < UNBOUNDED_S else 0.0
        exc = runtime.batcher.refusal(level, 1, timeout_s)
        if exc is None:
            return None
        shed = self.metrics.child(self.metrics.shed, exc.reason)
        shed.inc()
        error = admission_error(exc)
        # Both kinds a flood repeats: a level that is full, or starved (appliance.drain). Each
        # replay skips resolving, deciding and rendering the error body anew.
        if isinstance(exc, QueueFull | WouldMissDeadline):
            if len(self._refused) >= _REFUSED_MAX:
                # Expired replays go first; only a table full of live ones starts over.
                self._refused = {k: v for k, v in self._refused.items() if v.until > now}
                if len(self._refused) >= _REFUSED_MAX:
                    self._refused.clear()
            cfg = self.manager.cfg
            self._refused[memo] = _Refused(
                weakref.ref(runtime),
                slot.entry,
                cfg.defaults,
                cfg.model_overrides,
                level,
                timeout_s,
                exc,
                error,
                shed,
                now + REPLAY_S,
            )
        return error, level

    def _resolve(
        self, model: Any, priority: Any, key: ApiKeyRecord | None, timeout_ms: float | None
    ) -> tuple[ModelSlot, Mapping[str, Any], int, float, bool]:
        """Stages 2 and 4: the model's slot and settings, the level (the request's, else the
        model's default; lowered to the key's cap), the deadline in seconds and whether the
        client set it."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a string", param="model")
        slot = self.manager.request_slot(model)  # 404 for an unknown or unbuilt model
        values = self.manager.tunables(model)
        levels = int(values["queue.priority_levels"])
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= levels:
                raise InvalidRequest(
                    f"priority must be an integer from 1 to {levels}, got {priority!r}", param="priority"
                )
            level = priority
        else:
            level = int(values["queue.default_priority"])
        cap = getattr(key, "max_priority", None)
        if cap is not None:
            level = max(level, min(int(cap), levels))  # lowered to the cap, never refused
        # The deadline: Triton's rule, an override may only shorten the default (0 = none).
        default_ms = float(values["queue.default_timeout_ms"])
        explicit = timeout_ms is not None and bool(values["queue.allow_timeout_override"])
        if explicit and timeout_ms is not None and (default_ms == 0 or timeout_ms < default_ms):
            ms = timeout_ms
        else:
            # No override, or one at or past the default: the default applies, as if none had
            # been sent. Kept "explicit", a longer deadline asked for was stricter than none: the
            # default queue deadline became an end-to-end one, and a 200-s generation was cut at 60.
            ms, explicit = default_ms, False
        seconds = ms / 1000 if ms > 0 else UNBOUNDED_S
        return slot, values, level, seconds, explicit

    def _shed(
        self,
        model: str,
        runtime: ModelRuntime,
        level: int,
        items: int,
        values: Mapping[str, Any],
        seconds: float,
    ) -> Reservation:
        """Early admission: the queue's own refusal (full, would miss the deadline, closed) now,
        or places held for the request's items."""
        limit = int(values["queue.max_queue_size"])
        if limit and items > limit:  # could never be admitted: retrying would not help
            raise InvalidRequest(
                f"the request has {items} inputs; the model queues at most {limit} per priority level "
                "(queue.max_queue_size): split it",
                param="input",
            )
        try:
            return runtime.batcher.reserve(level, items, seconds if seconds < UNBOUNDED_S else 0.0)
        except AdmissionError as exc:
            self.metrics.child(self.metrics.shed, exc.reason).inc()
            raise admission_error(exc) from None

    # -- 5-9: whole answers ----------------------------------------------------------------------

    async def _engine(
        self, ticket: Ticket, work: Computation | Generation
    ) -> Answer | tuple[Permit, ModelRuntime, CacheHit | None]:
        """Stages 5-7, shared by whole answers and streams: a fresh cache hit or a fallback
        answer, else the breaker's permit and the resident runtime to compute with."""
        looked_up = time.perf_counter()
        hit = await self._read(ticket, work)
        if hit is not None and hit.fresh:
            self.metrics.model_stats.cached(ticket.model, time.perf_counter() - looked_up)
            return Answer(hit.value, hit.content_type, "cache")
        breaker = self.resilience.breaker(ticket.model, ticket.values)
        try:
            permit = breaker.acquire()
        except BreakerOpen as exc:
            # An operator's open is no failure and has no schedule: it lasts until they close it.
            # Retry-After stays (a 503 carries one), the breaker's hint of one open period.
            why = (
                "was taken out of service by an operator (its circuit breaker is held open until "
                "an operator closes it)"
                if exc.state is BreakerState.FORCED_OPEN
                else "is failing and its circuit breaker is open"
            )
            return await self._fallback(ticket, work, hit, exc.retry_after_s, why)
        try:
            runtime = await self._runtime(ticket, permit)
        except BaseException:
            permit.ignore()
            raise
        if runtime is None:  # _runtime resolved the permit: a load failure is not the engine's
            return await self._fallback(ticket, work, hit, ticket.load_retry_s, ticket.not_loaded)
        return permit, runtime, hit

    async def answer(self, ticket: Ticket, work: Computation) -> Answer:
        got = await self._engine(ticket, work)
        if isinstance(got, Answer):
            return got
        permit, runtime, hit = got
        with permit:
            started = time.perf_counter()
            ticket.first_output = lambda: permit.success(time.perf_counter() - started)
            ticket.permit = permit
            # An open-ended computation (a whole generation) is bounded by its time to first token
            # and its stalls (see follow()), unless the client set a deadline of its own.
            open_ended = getattr(work, "open_ended", False) and not ticket.explicit_deadline
            limit = UNBOUNDED_S if open_ended else ticket.remaining() + 0.5
            try:
                body, ctype = await bounded(work.compute(runtime, ticket), limit, "computing")
            except EngineFailure as exc:
                permit.failed_after(exc.kind)  # resolved at a first token, the same call failed
                log.warning("model %s: engine %s: %s", ticket.model, exc.kind, exc.message)
                return await self._fallback(ticket, work, hit, None, f"failed ({exc.kind})")
            except (ApplianceError, asyncio.CancelledError):
                # Client errors, admission refusals, deadlines and disconnects say nothing of the
                # engine's health.
                permit.ignore()
                raise
            permit.success(time.perf_counter() - started)
        await self.store(ticket, body, ctype)
        return Answer(body, ctype, "engine")

    # -- 5-8: streams ----------------------------------------------------------------------------

    async def stream(
        self,
        ticket: Ticket,
        work: Generation,
        *,
        keepalive_s: float = 0.0,
        on_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> Answer | LiveStream:
        """A live stream whose first event has arrived, or a whole answer to replay (cache,
        default). ``on_wait`` is called every ``keepalive_s`` while the first token is awaited."""
        got = await self._engine(ticket, work)
        if isinstance(got, Answer):
            return got
        permit, runtime, hit = got
        with permit:
            started = time.perf_counter()
            events = work.start(runtime, ticket)  # admission refusals raise here (429/503/400)
            try:
                first = await self._first(events, ticket, keepalive_s, on_wait)
            except EngineFailure as exc:
                events.close()
                permit.failure(exc.kind)
                return await self._fallback(ticket, work, hit, 1.0, f"failed ({exc.kind})")
            except BaseException:
                events.close()
                permit.ignore()
                raise
            permit.success(time.perf_counter() - started)  # judged by time to first token
        stall = float(ticket.values["engine.timeout_ms"]) / 1000
        return LiveStream(self, ticket, permit, events, first, stall if stall > 0 else UNBOUNDED_S)

    async def _first(
        self,
        events: EventStream,
        ticket: Ticket,
        keepalive_s: float,
        on_wait: Callable[[], Awaitable[None]] | None,
    ) -> Any:
        # The queue's own deadline timer answers first (503); the grace covers a prefill that
        # started just before it.
        nxt = asyncio.ensure_future(events.__anext__())
        try:
            while True:
                left = ticket.remaining() + 1.0
                if left <= 0:
                    raise DeadlinePassed("no first token before the request's deadline", retry_after_s=1.0)
                wait = min(left, keepalive_s) if keepalive_s > 0 and on_wait is not None else left
                done, _ = await asyncio.wait({nxt}, timeout=wait)
                if done:
                    return nxt.result()
                if on_wait is not None and ticket.remaining() + 1.0 > 0:
                    await on_wait()
        finally:
            if not nxt.done():
                nxt.cancel()
            elif not nxt.cancelled():
                # Done in the same turn as a hang-up or a failed keep-alive write: its outcome
                # (the queue's deadline 503, say) goes to nobody, and asyncio would log it at
                # error level with a traceback ("Task exception was never retrieved").
                nxt.exception()

    # -- pieces ----------------------------------------------------------------------------------

    def _cache(self, ticket: Ticket) -> Any:
        cache = self.resilience.cache
        return cache if cache is not None and cache.enabled and ticket.values["cache.enabled"] else None

    async def _read(self, ticket: Ticket, work: Computation | Generation) -> CacheHit | None:
        ticket.cacheable = work.canonical is not None
        cache = self._cache(ticket)
        if cache is None or work.canonical is None or not (ticket.read_cache or ticket.write_cache):
            return None  # no key to compute: this request neither reads nor fills the cache
        # The model's identity needs its files hashed when it has no build record: done in a
        # thread (on the loop it stalled every request for as long), within the cache's bound.
        identity = await self.manager.identity_within(
            ticket.model, min(CACHE_IO_S, max(ticket.remaining(), 0.01))
        )
        if identity is None:  # still hashing: this request goes without the cache
            if ticket.write_cache:
                ticket.stored = False  # what FULL's answer says (X-Appliance-Cache: not-stored)
            return None
        ticket.key = cache_key(identity, work.canonical, work.blobs)
        if not ticket.read_cache:
            return None
        try:
            hit = await within(cache.get(ticket.key), min(CACHE_IO_S, max(ticket.remaining(), 0.01)))
        except asyncio.TimeoutError:
            return None  # a slow cache is a miss, never a wait
        self.resilience.count(ticket.model, "misses" if hit is None or not hit.fresh else "hits")
        return hit

    async def _runtime(self, ticket: Ticket, permit: Permit) -> ModelRuntime | None:
        """The resident runtime, loading it within the deadline; None when it cannot load (the
        reason is kept in ``ticket.not_loaded`` for the 503 when no fallback answers)."""
        slot = self.manager.slots.get(ticket.model)
        if slot is not None and slot.runtime is not None:  # resident: nothing to wait for
            slot.last_used = time.monotonic()
            return slot.runtime
        try:
            return await bounded(self.manager.runtime(ticket.model), ticket.remaining(), "loading the model")
        except Unavailable as exc:
            if isinstance(exc, DeadlinePassed):
                permit.ignore()
                raise
            log.warning("model %s: %s", ticket.model, exc.message)
            # The 503 names the model itself: "failed to load (its reason)".
            if isinstance(exc, ModelUnloading):
                ticket.not_loaded = "is being unloaded"
            else:
                ticket.not_loaded = (
                    f"failed to load ({exc.reason if isinstance(exc, LoadFailed) else exc.message})"
                )
            ticket.load_retry_s = exc.retry_after_s or 1.0
            permit.ignore()  # a load failure is the memory manager's, not the engine's
            return None

    async def store(self, ticket: Ticket, body: bytes, ctype: str) -> None:
        cache = self._cache(ticket)
        if cache is None:
            off = self.resilience.cache
            if (
                off is not None
                and off.synchronous == "FULL"
                and ticket.values["cache.enabled"]
                and ticket.cacheable
                and ticket.write_cache
            ):
                # Switched off by a fault (a full disk), FULL's cache keeps no entry: the answer
                # said nothing, while the one whose write had failed said "not-stored".
                ticket.stored = False
            return
        if ticket.key is None or not ticket.write_cache:
            return
        if cache.synchronous != "FULL":
            try:
                cache.put(ticket.key, ticket.model, body, ctype)
                ticket.stored = True
            except Exception:
                log.exception("response cache write failed; the answer goes out unstored")
                ticket.stored = False
            return
        # FULL promises that an answered request's entry survives a power cut: wait for the commit,
        # bounded; when it cannot be kept the response says so (X-Appliance-Cache: not-stored).
        try:
            ticket.stored = await within(
                asyncio.shield(cache.put_and_wait(ticket.key, ticket.model, body, ctype)),
                min(CACHE_IO_S, max(ticket.remaining(), 0.05)),
            )
        except asyncio.TimeoutError:
            ticket.stored = False
        except Exception:
            log.exception("response cache write failed; the answer goes out unstored")
            ticket.stored = False

    async def _fallback(
        self,
        ticket: Ticket,
        work: Computation | Generation,
        hit: CacheHit | None,
        retry_after_s: float | None,
        why: str,
    ) -> Answer:
        model = ticket.model
        m = self.metrics
        cache = self._cache(ticket)
        if hit is None and cache is not None and ticket.key is not None and ticket.read_cache:
            try:
                hit = await within(cache.get(ticket.key), CACHE_IO_S)
            except Exception:  # a slow or failing cache is no fallback; go on down the chain
                hit = None
        if hit is not None:
            source = "cache" if hit.fresh else "stale-cache"
            self.resilience.count(model, "hits" if hit.fresh else "stale_hits")
            m.child(m.fallbacks, model, source).inc()
            return Answer(hit.value, hit.content_type, source)
        default = work.default()
        if default is not None:
            m.child(m.fallbacks, model, "default").inc()
            return Answer(default[0], default[1], "default")
        m.child(m.fallbacks, model, "unavailable").inc()
        b = self.resilience.breakers.get(model)
        if retry_after_s is None and b is not None:
            retry_after_s = float(b.snapshot().get("open_remaining_s") or 1.0)
        raise Unavailable(
            f"the model '{model}' {why} and no fallback is available", retry_after_s=retry_after_s or 1.0
        )


class LiveStream:
    """The events after the first of an admitted generation, each within the stall bound.

    A stall (no event for ``engine.timeout_ms``) while an engine call runs long ends the stream
    with an EngineFailure the route sends as an error event, and the breaker counts it; so does an
    engine failure after the first token. A stall with no such call (the generation waited for
    compute that more urgent work held, or was preempted) ends it with a 503, and an explicit
    client deadline passing first with DeadlinePassed; the breaker counts neither.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        ticket: Ticket,
        permit: Permit,
        events: EventStream,
        first: Any,
        stall_s: float,
    ) -> None:
        self.pipeline = pipeline
        self.ticket = ticket
        # Resolved a success at the first event; a later failure turns that call into a failure.
        self.permit = permit
        self.events = events
        self.first: Any = first
        self.stall_s = stall_s

    def __aiter__(self) -> LiveStream:
        return self

    async def __anext__(self) -> Any:
        if self.first is not None:
            ev, self.first = self.first, None
            return ev
        bound = self.stall_s
        deadline_first = False
        if self.ticket.explicit_deadline:
            remaining = max(self.ticket.remaining(), 0.0)
            deadline_first = remaining < bound
            bound = min(bound, remaining)
        try:
            return await within(self.events.__anext__(), bound if bound > 0 else 0.001)
        except asyncio.TimeoutError:
            self.events.close()
            if deadline_first:
                # The client's own deadline, not a stall: it says nothing of the engine's health
                # (counted, a client sending short deadlines would open the breaker for everyone).
                raise DeadlinePassed(
                    "the request's deadline passed during the generation", retry_after_s=1.0
                ) from None
            if not self.events.engine_stalled(bound / 2):
                # No engine call ran long: the generation waited for compute that more urgent
                # work held, or was preempted. Overload, said as such (503), not held against
                # the engine: counted, it opened the breaker on a healthy model under load.
                raise admission_error(ComputeStarved.after(bound)) from None
            self.permit.failed_after("timeout")
            raise EngineFailure(
                f"the generation produced no token for {bound * 1000:.0f} ms", kind="timeout"
            ) from None
        except EngineFailure as exc:
            self.permit.failed_after(exc.kind)
            raise

    def close(self) -> None:
        self.events.close()

    async def finish(self, body: bytes, ctype: str = "application/json") -> None:
        """The whole answer the stream made, for the response cache."""
        await self.pipeline.store(self.ticket, body, ctype)


async def follow(ticket: Ticket, events: EventStream) -> LiveStream:
    """A whole generation's events with the stream's bounds: the first by the deadline, each
    later one within the stall bound. Tells the breaker when the first token arrives."""
    pipeline = ticket.pipeline
    assert pipeline is not None
    try:
        first = await pipeline._first(events, ticket, 0.0, None)
    except BaseException:
        events.close()
        raise
    ticket.first_output()
    stall = float(ticket.values["engine.timeout_ms"]) / 1000
    assert ticket.permit is not None  # Pipeline.answer sets it before the computation starts
    return LiveStream(pipeline, ticket, ticket.permit, events, first, stall if stall > 0 else UNBOUNDED_S)


def retry_after_header(seconds: float | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}
