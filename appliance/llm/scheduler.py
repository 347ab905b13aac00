"""Continuous batching for one generate model.

Sequences join and leave the running batch at step boundaries. A step is two engine calls on the
model's worker thread (never on the event loop), each under a compute grant (``grant``) and each
bounded by ``engine.timeout_ms``: (1) prefill: newcomers start from their longest cached prefix
(``appliance.llm.prefix``), and at most ``generation.prefill_chunk_tokens`` prompt tokens are
computed per step (fewer, about ``generation.urgent_prefill_ms`` of compute, while the arbiter
says more urgent work is about), so a long prompt is read over several steps; a sequence whose context is
complete samples its first token; (2) decode: drop the rows of finished, cancelled and preempted
sequences, append the freshly prefilled rows (``KVState.join``: nobody else is recomputed), one
decode step for every running row. Tokens reach each request's ``asyncio.Queue`` from the worker
through ``loop.call_soon_threadsafe`` as soon as a call ends, so a newcomer's first token does not
wait for the decode that follows. While nothing else is due (no row ends or is cancelled, nobody
waits who could be admitted, no prompt is part-way prefilled, no other engine call waits for the
compute grant), one decode call runs up to ``generation.decode_steps_per_call`` steps back to back
on the worker, still delivering every token as it is made: the hand-offs between the event loop
and the worker cost ~1.5 ms per token at one stream on 2 shared cores. The KV cache and its row
edits are ``appliance.llm.kv``: on the host or on the device, the same code.

The driver loop is supervised: an exception anywhere in a step fails every sequence the step
held with an event, is logged and counted (``appliance_worker_failures_total``), and the loop is
restarted; a call that times out fails the sequences it held. A delivery of tokens that raises
(a callback, outside the driver) fails the sequences it carried, and is logged and counted alike.

Admission has the serving core batcher's semantics and exceptions (``appliance.batcher``):
priority levels 1..N with a bounded queue per level (``QueueFull``), a deadline while waiting
(``DeadlineExceeded``, answered by its own timer), refusal on arrival of a request predicted to
miss it (``WouldMissDeadline``), ``InvalidPriority``, and optional aging. The deadline covers only
the wait for a slot: once a sequence streams tokens it is not cut off.

Capacity is bounded by ``generation.max_running_sequences`` and ``generation.kv_cache_bytes``.
Memory is accounted as reserved, not as used: a sequence reserves prompt + ``max_tokens`` tokens,
and as the batch is left-padded to its longest row, a batch of n rows is charged
n x (largest reservation) x bytes per token (layers x 2 x kv_heads x head_dim x dtype size). A
batch that fits when admitted therefore never outgrows the budget, and no sequence has to be
evicted for memory halfway through.

With ``generation.preemption`` on, a waiting request that finds no room evicts running sequences
of a lower priority (largest level first, latest arrival first, as vLLM does). The evicted
sequence goes back to the front of its level and resumes later by prefilling its prompt and the
tokens it had generated (recompute; its sampler state is kept, so its output does not change).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from appliance.admission import (
    REJECT_REASONS,
    AdmissionError,
    BatcherClosed,
    BatchPolicy,
    ComputeStarved,
    DeadlineExceeded,
    EarlyAdmission,
    InvalidPriority,
    Reservation,
)
from appliance.engines.base import EngineError, EngineOutOfMemory, EngineTimeout
from appliance.llm.kv import KVState
from appliance.llm.prefix import PrefixCache, PrefixStats
from appliance.llm.sampling import OutputProcessor, SamplingParams, make_rng, sample
from appliance.telemetry import Held, Metrics, held_stats
from appliance.timeouts import retrieve, within

log = logging.getLogger(__name__)

_R = TypeVar("_R")


_EWMA_ALPHA = 0.2
# The smallest prefill chunk cut for more urgent work: below it, per-call overhead dominates.
_MIN_URGENT_CHUNK = 16
DEFAULT_SEQUENCE_S = 1.0  # assumed time a sequence holds a slot before any has finished


@dataclass(frozen=True)
class GenerationConfig:
    max_running: int = 8
    kv_cache_bytes: int = 512 << 20
    max_tokens_default: int = 256
    max_tokens_limit: int = 4096
    preemption: bool = False
    max_prefill_tokens: int = 4096
    prefill_chunk_tokens: int = 0  # 0: a prompt is prefilled whole in one step
    urgent_prefill_ms: float = 0.0  # 0: chunks are not cut for more urgent work
    max_prefill_ms: float = 0.0  # 0: chunks are not cut by time while nothing more urgent is about
    prefix_cache: bool = False
    prefix_block_tokens: int = 8
    decode_steps: int = 1  # decode steps per worker hand-off while nothing else is due

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> GenerationConfig:
        return cls(
            max_running=int(values["generation.max_running_sequences"]),
            kv_cache_bytes=int(values["generation.kv_cache_bytes"]),
            max_tokens_default=int(values["generation.max_tokens_default"]),
            max_tokens_limit=int(values["generation.max_tokens_limit"]),
            preemption=bool(values["generation.preemption"]),
            max_prefill_tokens=int(values["generation.max_prefill_tokens"]),
            prefill_chunk_tokens=int(values["generation.prefill_chunk_tokens"]),
            urgent_prefill_ms=float(values["generation.urgent_prefill_ms"]),
            max_prefill_ms=float(values["generation.max_prefill_ms"]),
            prefix_cache=bool(values["generation.prefix_cache"]),
            prefix_block_tokens=int(values["generation.prefix_block_tokens"]),
            decode_steps=int(values["generation.decode_steps_per_call"]),
        )


class Decoder(Protocol):
    """What the scheduler needs of ``appliance.llm.runtime.DecoderSession`` (tests pass fakes)."""

    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: np.dtype

    def prefill(
        self, prompts: Sequence[Sequence[int]], past: KVState | None = None
    ) -> tuple[np.ndarray, KVState]:
        """Whole prompts as one left-padded batch, or with ``past`` one row's next tokens."""
        ...

    def decode(self, next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray: ...


# -- events a request receives ------------------------------------------------------------------


@dataclass
class Token:
    """New text (may be empty while a stop string or a split character is held back); for a
    reasoning model, ``text`` is the answer and ``reasoning`` the thinking."""

    text: str
    completion_tokens: int
    reasoning: str = ""


@dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int | None = None  # None: no reasoning parser for this sequence


@dataclass
class Failed:
    """An AdmissionError (deadline, closed) or an EngineError; the service maps it."""

    error: Exception


Event = Token | Finished | Failed


@dataclass(eq=False)  # identity: sequences are set members
class Seq:
    """One request's generation. Fields marked "worker" are written only by the step that runs it."""

    prompt: list[int]
    params: SamplingParams
    processor: OutputProcessor
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    priority: int = 0
    order: int = 0
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)  # worker
    admitted_at: float | None = None
    first_token_at: float | None = None  # worker
    timer: asyncio.TimerHandle | None = None
    rng: np.random.Generator = field(init=False)
    cancelled: bool = False  # loop: the client went away, or the sequence failed
    evicted: bool = False  # loop: preempted; dropped from the batch at the next step
    done: bool = False  # worker: finished; no more tokens
    closed: bool = False  # loop: a terminal event was delivered
    preemptions: int = 0
    partial: KVState | None = None  # worker: one row of KV for context()[:filled] while prefilling
    filled: int = 0  # worker: context tokens whose KV is held (prefix-cache hit, earlier chunks)
    prefix_checked: bool = False  # worker: the prefix cache was consulted for this admission
    # Its request's statistics, held for the front door (made in the request's context; the
    # generation's end is seen in the scheduler's).
    held: Held | None = field(default_factory=held_stats)

    def __post_init__(self) -> None:
        self.rng = make_rng(self.params.seed)

    @property
    def reserved(self) -> int:
        """Tokens this sequence may hold at most: what its KV reservation is charged for."""
        return len(self.prompt) + self.params.max_tokens

    def context(self) -> list[int]:
        """What a (re)admission prefills: the prompt and, after a preemption, what it generated."""
        return self.prompt + self.generated


@dataclass
class _Plan:
    keep: list[Seq]  # running rows kept, in batch order
    admit: list[Seq]  # newcomers to prefill


class Scheduler(EarlyAdmission):
    """The continuous-batching scheduler of one generate model.

    It sits in ``ModelRuntime.batcher``: ``policy`` (settable), ``close(drain=...)`` and
    ``snapshot()`` mirror ``appliance.batcher.Batcher`` so the manager and admin treat both alike.
    """

    def __init__(
        self,
        name: str,
        session: Decoder,
        executor: Executor,
        policy: BatchPolicy,
        config: GenerationConfig | None = None,
        *,
        metrics: Metrics | None = None,
        tunables: Callable[[], Mapping[str, Any]] | None = None,
        progress: Callable[[float], AbstractContextManager[Any]] | None = None,
        grant: Callable[[int], AbstractAsyncContextManager[Any]] | None = None,
        pressed: Callable[[int], bool] | None = None,
        contended: Callable[[], bool] | None = None,
    ) -> None:
        """``grant(level)``: the compute arbiter's permit for one engine call whose most urgent row
        has priority ``level``; held around the call, awaited on the event loop. None: no
        arbitration. ``pressed(level)``: whether work more urgent than ``level`` is about (the
        arbiter's word), so that a prefill chunk is cut to ``urgent_prefill_ms``.
        ``contended()``: whether any engine call waits for a grant; read from the worker between
        the decode steps of one call, which ends as soon as it says so."""
        self.name = name
        self.session = session
        self.executor = executor
        self.config = config or GenerationConfig()
        self._tunables = tunables
        self._progress = progress
        self._grant = grant
        self._pressed = pressed
        self._contended = contended
        self._prefill_rate: float | None = None  # EWMA prompt tokens per second of prefill calls
        self.metrics = metrics
        self._busy = None if metrics is None else metrics.engine_busy.labels(name)  # worker-timed
        self._call_since: float | None = None  # worker: time.monotonic() the running call began
        self.bytes_per_token = (
            session.layers * 2 * session.kv_heads * session.head_dim * np.dtype(session.kv_dtype).itemsize
        )
        self._queues: list[list[Seq]] = []
        self._policy = policy
        self._relevel(policy.priority_levels)
        self._order = itertools.count()
        self._rows: list[Seq] = []  # batch order of the KV rows
        self._kv: KVState | None = None
        self._inflight: _Plan | None = None  # the step the driver is running
        self._prefilling: list[Seq] = []  # admitted, their prompt not yet wholly prefilled
        self.prefix: PrefixCache | None = None
        self._published = PrefixStats()  # prefix-cache counts already added to the metrics
        self._configure_prefix()
        self._last_crash_steps = -1
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._seq_s: float | None = None  # EWMA seconds a sequence holds a slot
        self._tok_rate: float | None = None  # EWMA generated tokens per second of the batch
        self._recent: deque[int] = deque(maxlen=64)
        self._rejections = dict.fromkeys(REJECT_REASONS, 0)
        self._reserved: dict[int, int] = {}  # level -> places held by early admissions
        self._counts = dict.fromkeys(
            ("completed", "cancelled", "preempted", "failed", "steps", "driver_failures"), 0
        )

    # ---- settings --------------------------------------------------------------------------

    @property
    def policy(self) -> BatchPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: BatchPolicy) -> None:
        # The manager assigns a new policy when settings change live; generation.* change with it.
        self._policy = policy
        self._relevel(policy.priority_levels)
        if self._tunables is not None:
            self.config = GenerationConfig.from_values(self._tunables())
            self._configure_prefix()
        self._wake.set()

    def _configure_prefix(self) -> None:
        cfg = self.config
        if not cfg.prefix_cache:
            if self.prefix is not None:
                self.prefix.clear()
            self.prefix = None
        elif self.prefix is None or self.prefix.block_tokens != cfg.prefix_block_tokens:
            self.prefix = PrefixCache(cfg.prefix_block_tokens)
            # A new cache counts from zero: the metrics take its counts as they come (measured
            # against the old cache's, they went backwards and killed the driver at every step).
            self._published = PrefixStats()

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.bytes_per_token

    # ---- public API -------------------------------------------------------------------------

    def queued(self, level: int) -> int:
        return len(self._queues[level - 1]) if 1 <= level <= len(self._queues) else 0

    def retry_hint(self, level: int) -> float:
        return max(self._predicted_wait(level, assume=True), 0.001)

    def predicted_wait(self, level: int) -> float | None:
        # Without an observed sequence time any prediction is a guess; refusing on a guess is worse.
        return None if self._seq_s is None else self._predicted_wait(level)

    def submit(
        self,
        seq: Seq,
        *,
        priority: int | None = None,
        timeout_ms: float | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        """Queue ``seq`` or raise an AdmissionError; its events arrive on ``seq.events``. A
        ``reservation`` from early admission holds its place: it was judged already."""
        held = reservation is not None and reservation.take()
        policy = self._policy
        self._relevel(policy.priority_levels)
        level = policy.default_priority if priority is None else priority
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= policy.priority_levels:
            raise InvalidPriority(
                f"priority must be an integer from 1 to {policy.priority_levels}, got {priority!r}"
            )
        timeout_s = policy.effective_timeout_ms(timeout_ms) / 1000
        if self._closed:
            raise self._refuse(BatcherClosed(f"model {self.name!r} is closed", priority=level))
        queue = self._queues[level - 1]
        # An early-admitted sequence was judged already.
        refused = None if held else self._queue_refusal(level, 1, timeout_s)
        if refused is not None:
            raise refused
        loop = asyncio.get_running_loop()
        seq.priority = level
        seq.order = next(self._order)
        seq.arrival = time.monotonic()
        if timeout_s:
            seq.timer = loop.call_later(timeout_s, self._expire, seq)
        queue.append(seq)
        self._queue_changed(level)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._supervise(), name=f"scheduler:{self.name}")
        self._wake.set()

    def cancel(self, seq: Seq) -> None:
        """The request went away: withdraw it if waiting, drop its row at the next step if running."""
        if seq.closed:
            return
        seq.closed = True
        if self._discard(seq):
            self._count_rejection(seq.priority, "cancelled")
            return
        seq.cancelled = True
        if not seq.done:
            self._counts["cancelled"] += 1
        self._wake.set()

    async def close(self, drain: bool = True, *, keep_running: bool = False) -> None:
        """Stop accepting; finish everything (drain) or fail waiting sequences with BatcherClosed,
        and running ones too unless ``keep_running`` (a shutdown lets streams finish); await the
        driver."""
        self._closed = True
        if not drain:
            for queue in self._queues:
                for seq in list(queue):
                    self._discard(seq)
                    self._count_rejection(seq.priority, "closed")
                    self._fail(seq, BatcherClosed(f"model {self.name!r} closed"))
            if not keep_running:
                held = self._rows + self._prefilling + (self._inflight.admit if self._inflight else [])
                for seq in held:
                    self._fail(seq, BatcherClosed(f"model {self.name!r} closed while generating"))
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def stop(self) -> None:
        await self.close(drain=False)

    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self) -> dict[str, Any]:
        """The batcher's snapshot keys, so the admin stats read both alike."""
        return {
            "name": self.name,
            "closed": self._closed,
            "queue_depth": {i + 1: len(q) for i, q in enumerate(self._queues)},
            "running_batches": 1 if self._inflight is not None else 0,
            "instances": 1,
            "service_rate": None if self._seq_s is None else self.config.max_running / self._seq_s,
            "batch_seconds": None,
            "recent_batch_sizes": list(self._recent),
            "rejections": dict(self._rejections),
            "completed": self._counts["completed"],
            "dropped_results": self._counts["cancelled"],
        }

    def generation_snapshot(self) -> dict[str, Any]:
        running = [s for s in self._rows if not (s.cancelled or s.done or s.evicted)]
        return {
            "running": len(running),
            "waiting": sum(len(q) for q in self._queues),
            "prefilling": len(self._prefilling) + (len(self._inflight.admit) if self._inflight else 0),
            "max_running": self.config.max_running,
            "kv_cache_bytes": self._kv_used(),
            "kv_reserved_bytes": self._charge(running),
            "kv_budget_bytes": self.config.kv_cache_bytes,
            "tokens_per_s": self._tok_rate,
            "preemption": self.config.preemption,
            "prefill_chunk_tokens": self.config.prefill_chunk_tokens,
            "prefix_cache": self._prefix_snapshot(),
            **self._counts,
        }

    def _prefix_snapshot(self) -> dict[str, Any] | None:
        cache = self.prefix
        if cache is None:
            return None
        st = cache.stats
        return {
            "blocks": len(cache),
            "bytes": cache.nbytes,
            "block_tokens": cache.block_tokens,
            "query_tokens": st.query_tokens,
            "hit_tokens": st.hit_tokens,
            "hit_rate": st.hit_tokens / st.query_tokens if st.query_tokens else None,
            "evictions": st.evictions,
        }

    # ---- admission --------------------------------------------------------------------------

    def _relevel(self, levels: int) -> None:
        """Resize the per-level queues; requests on a removed level join the new lowest level.
        Running and prefilling sequences move down too: one evicted later is requeued at its
        level, and a removed level's queue no longer exists (an IndexError there killed the
        driver and every stream it held)."""
        if len(self._queues) == levels:
            return
        old = len(self._queues)
        waiting = sorted((s for q in self._queues for s in q), key=lambda s: s.order)
        self._queues = [[] for _ in range(levels)]
        for seq in waiting:
            seq.priority = min(seq.priority, levels)
            self._queues[seq.priority - 1].append(seq)
        if not old:
            return  # the first sizing, from __init__: nothing is held yet
        plan = self._inflight
        held = [*self._rows, *self._prefilling, *(plan.keep + plan.admit if plan is not None else [])]
        for seq in held:
            seq.priority = min(seq.priority, levels)
        if self.metrics is not None:
            for level in range(levels + 1, old + 1):  # removed levels hold nothing now
                self.metrics.queue_depth.labels(self.name, str(level)).set(0)
            for level in range(1, levels + 1):
                self._queue_changed(level)

    def _refuse(self, error: AdmissionError) -> AdmissionError:
        self._count_rejection(error.priority or 0, error.reason)
        return error

    def _count_rejection(self, priority: int, reason: str) -> None:
        self._rejections[reason] = self._rejections.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.rejections.labels(self.name, str(priority), reason).inc()

    def _queue_changed(self, level: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name, str(level)).set(len(self._queues[level - 1]))
            self.metrics.waiting_sequences.labels(self.name).set(sum(len(q) for q in self._queues))

    def _active(self) -> list[Seq]:
        return [s for s in self._rows if not (s.cancelled or s.done or s.evicted)]

    def _predicted_wait(self, level: int, assume: bool = False) -> float:
        """Seconds until a new request at ``level`` gets a slot: slots free up at about
        max_running / (mean time a sequence holds one). A slot is free only if the KV budget has
        room for one more row as long as the running batch's longest reservation (the batch is
        one padded tensor): two long generations can fill the budget with rows to spare, and a
        prediction that counted those rows told a newcomer it would wait for nothing."""
        active = self._active()
        if self.config.preemption:  # rows of a lower priority make way for it
            active = [s for s in active if s.priority <= level]
        free = self.config.max_running - len(active)
        if active and free > 0:
            row = max(s.reserved for s in active) * self.bytes_per_token
            free = min(free, self.config.kv_cache_bytes // max(row, 1) - len(active))
        ahead = sum(len(q) for q in self._queues[:level])
        if ahead < free:
            return 0.0
        per_seq = self._seq_s if self._seq_s is not None else (DEFAULT_SEQUENCE_S if assume else 0.0)
        return (ahead - free + 1) * per_seq / self.config.max_running

    def _expire(self, seq: Seq) -> None:
        seq.timer = None
        if self._discard(seq):
            self._count_rejection(seq.priority, "deadline")
            waited = time.monotonic() - seq.arrival
            self._fail(
                seq,
                DeadlineExceeded(f"timed out after {waited * 1000:.0f} ms in queue", priority=seq.priority),
            )

    def _discard(self, seq: Seq) -> bool:
        queue = self._queues[seq.priority - 1] if 0 < seq.priority <= len(self._queues) else []
        if seq not in queue:
            return False
        queue.remove(seq)
        if seq.timer is not None:
            seq.timer.cancel()
            seq.timer = None
        self._queue_changed(seq.priority)
        return True

    def _requeue(self, seq: Seq) -> None:
        """A preempted sequence goes back ahead of every later arrival at its level."""
        seq.priority = min(seq.priority, len(self._queues))
        queue = self._queues[seq.priority - 1]
        pos = next((i for i, s in enumerate(queue) if s.order > seq.order), len(queue))
        queue.insert(pos, seq)
        self._queue_changed(seq.priority)

    def _candidates(self) -> Iterator[Seq]:
        """Waiting sequences in admission order: (effective priority, arrival)."""
        aging = self._policy.aging_ms
        if not aging:
            yield from itertools.chain.from_iterable(list(q) for q in self._queues)
            return
        now = time.monotonic()

        def ranked(queue: list[Seq]) -> Iterator[tuple[int, int, Seq]]:
            for s in list(queue):
                yield max(1, s.priority - int((now - s.arrival) * 1000 // aging)), s.order, s

        # Within a level older means more aged, so each level is already in (effective, order) order.
        for _, _, seq in heapq.merge(*map(ranked, self._queues)):
            yield seq

    def _charge(self, group: Sequence[Seq]) -> int:
        """Reserved KV bytes of a batch: rows x longest reservation (the batch is left-padded)."""
        if not group:
            return 0
        return len(group) * max(s.reserved for s in group) * self.bytes_per_token

    def _fits(self, group: list[Seq]) -> bool:
        if len(group) > self.config.max_running:
            return False
        # A lone sequence always runs: the service refused those that exceed the budget alone.
        return len(group) == 1 or self._charge(group) <= self.config.kv_cache_bytes

    def _plan(self) -> _Plan | None:
        keep = self._active()
        self._prefilling = [s for s in self._prefilling if not s.cancelled]
        held = self._prefilling  # admitted earlier, still prefilling: they hold their reservation
        admit: list[Seq] = []
        evicted: list[Seq] = []  # requeued by this plan: not candidates again until the next
        for cand in list(self._candidates()):
            if any(cand is v for v in evicted):
                continue
            group = keep + held + admit + [cand]
            if admit:
                width = max(len(s.context()) for s in [*admit, cand])
                if (len(admit) + 1) * width > self.config.max_prefill_tokens:
                    break  # the rest waits for the next step
            if self._fits(group):
                admit.append(cand)
                continue
            victims = self._victims(keep, held + admit, cand) if self.config.preemption else None
            if victims is None:
                break  # strict order: nobody overtakes a waiting request that does not fit yet
            for v in victims:
                keep.remove(v)
                self._evict(v)
            evicted.extend(victims)
            admit.append(cand)
        for seq in admit:
            self._discard(seq)
            if seq.admitted_at is None:
                seq.admitted_at = time.monotonic()
                if self.metrics is not None:
                    self.metrics.generation_queue_duration.labels(self.name).observe(
                        seq.admitted_at - seq.arrival
                    )
        if self.prefix is not None:  # the cache lives in what the batch's reservations leave
            self.prefix.shrink(self.config.kv_cache_bytes - self._charge(keep + held + admit))
        if not keep and not admit and not held:
            self._rows, self._kv = [], None
            self._set_gauges()
            return None
        return _Plan(keep, admit)

    def _victims(self, keep: list[Seq], admit: list[Seq], cand: Seq) -> list[Seq] | None:
        """The fewest lower-priority running sequences whose eviction lets ``cand`` in, or None."""
        ranked = sorted(
            (s for s in keep if s.priority > cand.priority), key=lambda s: (s.priority, s.order), reverse=True
        )
        chosen: list[Seq] = []
        for v in ranked:
            chosen.append(v)
            rest = [s for s in keep if s not in chosen]
            if self._fits(rest + admit + [cand]):
                return chosen
        return None

    def _evict(self, seq: Seq) -> None:
        seq.evicted = True
        seq.preemptions += 1
        self._counts["preempted"] += 1
        if self.metrics is not None:
            self.metrics.preemptions.labels(self.name).inc()
        log.info("model %s: preempted a priority-%d sequence", self.name, seq.priority)
        self._requeue(seq)

    # ---- the driver (event loop) -----------------------------------------------------------

    async def _supervise(self) -> None:
        """Run the driver; if it dies, fail what it held (every such sequence gets an event), count
        and log the death once, and start it again. A driver that keeps dying without completing a
        step fails the waiting sequences too, so nobody waits on a loop that cannot make progress."""
        worker = f"scheduler:{self.name}"
        m = self.metrics
        failures = 0
        while True:
            if m is not None:
                m.worker_up.labels(worker).set(1)
            try:
                await self._drive()
                self._stopped_gauges(worker)
                return
            except asyncio.CancelledError:
                self._abort(BatcherClosed(f"model {self.name!r} stopped"), waiting=True)
                raise
            except Exception as exc:
                failures += 1
                self._counts["driver_failures"] += 1
                log.exception("model %s: the scheduler loop died (restart %d)", self.name, failures)
                if m is not None:
                    m.worker_failures.labels(worker).inc()
                    m.worker_up.labels(worker).set(0)
                err = EngineError(f"scheduler error: {type(exc).__name__}: {exc}")
                steps = self._counts["steps"]
                try:
                    self._abort(err, waiting=failures > 1 and steps == self._last_crash_steps)
                except Exception:
                    # The clean-up broke too (it shares the code that failed): the supervisor
                    # must live on regardless, or every sequence it holds waits forever. Fail
                    # them all, as a driver that cannot make progress would.
                    log.exception("model %s: cleaning up after the scheduler loop failed", self.name)
                    self._fail_all(err)
                self._last_crash_steps = steps
                # Back off a little so a persistent bug does not spin the loop at 100 %.
                await asyncio.sleep(min(0.01 * 2 ** min(failures, 7), 1.0))

    def _abort(self, error: Exception, *, waiting: bool) -> None:
        """Fail every sequence the driver holds (running rows, the step in flight, prefilling), and
        with ``waiting`` the queued ones as well; the KV state goes with them."""
        held = self._release_held()
        for seq in held:
            self._fail(seq, error)
        if waiting:
            for queue in self._queues:
                for seq in list(queue):
                    self._discard(seq)
                    self._fail(seq, error)
        self._set_gauges()

    def _release_held(self) -> list[Seq]:
        """The sequences the driver holds (running rows, the step in flight, prefilling), let go
        of: their partial prefills and the KV state are dropped."""
        held = list(self._rows) + list(self._prefilling)
        if self._inflight is not None:
            held += self._inflight.keep + self._inflight.admit
        for seq in held:
            seq.partial = None
        self._rows, self._kv, self._inflight, self._prefilling = [], None, None, []
        return held

    async def _drive(self) -> None:
        while True:
            plan = self._plan()
            if plan is None:
                if self._closed and not any(self._queues):
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            self._inflight = plan
            await self._step(plan)
            self._inflight = None

    async def _step(self, plan: _Plan) -> None:
        """Two engine calls: prefill the newcomers (sampling their first tokens), then join them
        and decode every running row. Each call takes a compute grant and is bounded (see
        ``_engine_call``); a call that times out fails the sequences it held."""
        for seq in plan.admit:
            seq.evicted = False
            seq.partial, seq.filled, seq.prefix_checked = None, 0, False
        started = time.monotonic()
        kv, rows = self._kv, self._rows
        work = [s for s in self._prefilling + plan.admit if not s.cancelled]
        new: tuple[KVState | None, list[Seq]] = (None, [])
        if work:
            allowance = self.config.kv_cache_bytes - self._charge(plan.keep + work)
            level = _level(work)
            try:
                # The chunk is sized once the grant is held, not when it is asked for: a call
                # that waited (it may have aged past priority 1) runs while more urgent work
                # queued meanwhile, and a chunk sized before the wait ran uncut (a 1.1-1.9 s
                # prefill of 8 prompts at the start of the overload benchmark).
                new_kv, joined, pending = await self._engine_call(
                    level, self._prefill, work, allowance, granted=lambda: (self._prefill_budget(level),)
                )
                new, self._prefilling = (new_kv, joined), pending
            except (EngineTimeout, ComputeStarved) as err:
                for seq in work:
                    seq.partial = None
                    self._fail(seq, err)
                self._prefilling = []
        keep = [s for s in plan.keep if not s.cancelled]
        decoded = len(keep) + len(new[1])
        executed = bool(decoded)  # Triton's execution_count: a decode that returned
        if decoded:
            try:
                kv, rows = await self._engine_call(
                    _level(keep + new[1]), self._decode, kv, rows, keep, new[0], new[1]
                )
            except (EngineTimeout, ComputeStarved) as err:
                for seq in keep + new[1]:
                    self._fail(seq, err)
                kv, rows = None, []
                executed = False
        else:
            kv, rows = None, []
        elapsed = time.monotonic() - started
        self._kv, self._rows = kv, rows
        self._counts["steps"] += 1
        if rows:
            self._recent.append(len(rows))
        if self.metrics is not None:
            self.metrics.compute_duration.labels(self.name).observe(elapsed)
            if rows:
                self.metrics.batch_size.labels(self.name).observe(len(rows))
            if executed:  # rows that ended within the call count too
                self.metrics.model_stats.stepped(self.name, decoded, elapsed)
        self._set_gauges()

    def _prefill_budget(self, level: int) -> int | None:
        """Prompt tokens this step may compute: ``prefill_chunk_tokens``, cut to about
        ``urgent_prefill_ms`` of measured prefill time while more urgent work is about (a
        priority-1 embedding batch then waits for a short chunk, not for a 512-token one), and
        to about ``max_prefill_ms`` otherwise: urgent work that arrives while a chunk runs waits
        for all of it, and with nothing urgent about when it started, the 8 prompts of a burst of
        chats were one 0.6-1.9 s call at the start of each overload run (its priority-1 queue of
        32 filled behind it)."""
        cfg = self.config
        budget = cfg.prefill_chunk_tokens or None
        rate = self._prefill_rate
        if rate is None:
            return budget
        ms = cfg.max_prefill_ms
        if cfg.urgent_prefill_ms > 0 and self._pressed is not None and self._pressed(level):
            ms = min(ms, cfg.urgent_prefill_ms) if ms > 0 else cfg.urgent_prefill_ms
        if ms > 0:
            cut = max(_MIN_URGENT_CHUNK, int(rate * ms / 1000))
            budget = cut if budget is None else min(budget, cut)
        return budget

    def engine_call_s(self) -> float:
        """How long the engine call in progress has run (0 when none runs: the driver waits for
        work or for a compute grant). A stream's stall is the engine's fault only while a call
        runs; without one, the sequence waited for compute (overload) or was preempted."""
        since = self._call_since
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    async def _engine_call(
        self,
        level: int,
        fn: Callable[..., _R],
        *args: Any,
        granted: Callable[[], tuple[Any, ...]] | None = None,
    ) -> _R:
        """Run ``fn(loop, *args)`` on the model's worker under a compute grant for ``level``;
        ``granted()``, called on the loop once the grant is held, gives the call's last arguments.

        With ``engine.timeout_ms`` set, three waits are bounded: the grant and the call itself by
        it, the worker starting (it may still be busy with an earlier call that hung) by twice it. The
        clock of the call starts when the worker does, so a call queued behind another is not blamed
        for it. A call given up on is marked abandoned: if it has not started it never runs, and if
        it hung its late result is dropped. Raises EngineTimeout."""
        loop = asyncio.get_running_loop()
        timeout_ms = float(self._tunables()["engine.timeout_ms"]) if self._tunables else 0.0
        limit = timeout_ms / 1000 if timeout_ms > 0 else None
        async with contextlib.AsyncExitStack() as stack:
            if self._grant is not None:
                try:
                    await within(stack.enter_async_context(self._grant(level)), limit)
                except asyncio.TimeoutError:
                    # More urgent work held the engines (strict priority, or a flood): overload,
                    # not a fault of this engine, so the breaker never hears of it.
                    raise ComputeStarved.after(timeout_ms / 1000, level) from None
            if granted is not None:
                args = (*args, *granted())
            job = _Job()
            began: asyncio.Future[None] = loop.create_future()
            fut: asyncio.Future[_R] = loop.run_in_executor(
                self.executor, self._in_worker, loop, began, job, fn, args
            )
            if limit is None:
                return await fut
            # The worker may be finishing a call that hung (it cannot be stopped): wait for it as
            # long as the watchdog would before calling the engine hung, then give up.
            either: list[asyncio.Future[Any]] = [began, fut]
            await asyncio.wait(either, timeout=2 * limit, return_when=asyncio.FIRST_COMPLETED)
            if not began.done():
                job.abandoned = True
                # Nobody awaits it now: its exception ("abandoned before it started", or the hung
                # call's own) was logged as never retrieved, a dozen times a minute at a tiny
                # engine.timeout_ms.
                fut.add_done_callback(retrieve)
                raise EngineTimeout(f"the engine worker stayed busy past {2 * timeout_ms:.0f} ms")
            try:
                return await within(asyncio.shield(fut), limit)
            except asyncio.TimeoutError:
                job.abandoned = True
                fut.add_done_callback(retrieve)
                raise EngineTimeout(f"a generation step ran past {timeout_ms:.0f} ms") from None
        raise AssertionError("unreachable")  # for mypy: the stack never swallows an exception

    def _set_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        m.running_sequences.labels(self.name).set(len(self._active()))
        m.kv_cache_bytes.labels(self.name).set(self._kv_used())
        cache = self.prefix
        if cache is not None:
            st, old = cache.stats, self._published
            m.prefix_cache_query_tokens.labels(self.name).inc(st.query_tokens - old.query_tokens)
            m.prefix_cache_hit_tokens.labels(self.name).inc(st.hit_tokens - old.hit_tokens)
            m.prefix_cache_evictions.labels(self.name).inc(st.evictions - old.evictions)
            m.prefix_cache_blocks.labels(self.name).set(len(cache))
            self._published = PrefixStats(st.query_tokens, st.hit_tokens, st.evictions)

    def _stopped_gauges(self, worker: str) -> None:
        """The driver ended with its model's close: the model's live gauges say it holds nothing
        (they stood at their last values after an unload: prefix blocks 9, the scheduler up),
        and its worker series goes, as a worker that no longer exists is neither up nor down."""
        m = self.metrics
        if m is None:
            return
        for gauge in (m.running_sequences, m.kv_cache_bytes, m.prefix_cache_blocks):
            gauge.labels(self.name).set(0)
        with contextlib.suppress(KeyError):
            m.worker_up.remove(worker)

    def _fail_all(self, error: Exception) -> None:
        """Fail every sequence, held or queued, without touching metrics or the prefix cache."""
        held = self._release_held()
        for queue in self._queues:
            held += list(queue)
            queue.clear()
        for seq in held:
            if seq.timer is not None:
                seq.timer.cancel()
                seq.timer = None
            self._fail(seq, error)

    def _kv_used(self) -> int:
        return 0 if self._kv is None else self._kv.nbytes()

    def _fail(self, seq: Seq, error: Exception) -> None:
        seq.cancelled = True
        if seq.closed:
            return
        seq.closed = True
        self._counts["failed"] += 1
        seq.events.put_nowait(Failed(error))

    def _hand_over(self, batch: list[tuple[Seq, Event]]) -> None:
        """On the loop, from the worker: ``_deliver``, supervised. A callback's exception would go
        to the loop's exception handler, outside the driver's supervision: the sequences whose
        events were lost waited for their deadline (a 503 after a minute), or answered 200 with a
        token missing. Instead they fail now, the fault is logged and counted as the scheduler's,
        and the other sequences go on (the worker drops the failed rows at the next step)."""
        try:
            self._deliver(batch)
        except Exception as exc:
            log.exception("model %s: delivering %d events failed", self.name, len(batch))
            if self.metrics is not None:
                self.metrics.worker_failures.labels(f"scheduler:{self.name}").inc()
            err = EngineError(f"scheduler error: {type(exc).__name__}: {exc}")
            for seq in dict.fromkeys(seq for seq, _ in batch):  # once each, in order
                self._fail(seq, err)  # a sequence that got its terminal event keeps it
            self._wake.set()

    def _deliver(self, batch: list[tuple[Seq, Event]]) -> None:
        """On the loop: hand events to their requests and account finished sequences."""
        now = time.monotonic()
        m = self.metrics
        for seq, ev in batch:
            if seq.closed:
                continue  # cancelled, failed or timed out meanwhile: nobody is listening
            seq.events.put_nowait(ev)
            if isinstance(ev, Finished | Failed):
                seq.closed = True
            if isinstance(ev, Failed):
                self._counts["failed"] += 1
            elif isinstance(ev, Finished):
                self._counts["completed"] += 1
                held = now - (seq.admitted_at or seq.arrival)
                self._seq_s = (
                    held if self._seq_s is None else self._seq_s + _EWMA_ALPHA * (held - self._seq_s)
                )
                if m is not None:
                    admitted = seq.admitted_at or seq.arrival
                    m.model_stats.finished(self.name, admitted - seq.arrival, now - admitted, held=seq.held)
                    m.generation_duration.labels(self.name).observe(now - seq.arrival)
                    if seq.first_token_at is not None and ev.completion_tokens > 1:
                        m.time_per_output_token.labels(self.name).observe(
                            (now - seq.first_token_at) / (ev.completion_tokens - 1)
                        )

    # ---- one step (worker thread) ----------------------------------------------------------

    def _in_worker(
        self,
        loop: asyncio.AbstractEventLoop,
        began: asyncio.Future[None],
        job: _Job,
        fn: Callable[..., _R],
        args: tuple[Any, ...],
    ) -> _R:
        if job.abandoned:  # given up on while it waited behind a hung call: nobody wants it now
            raise EngineTimeout("abandoned before it started")
        loop.call_soon_threadsafe(_resolve, began)
        timeout_ms = float(self._tunables()["engine.timeout_ms"]) if self._tunables else 0.0
        # A call may take up to twice the engine timeout before the watchdog calls the engine hung.
        watch = self._progress(2 * timeout_ms / 1000 if timeout_ms > 0 else 300.0) if self._progress else None
        entered = time.perf_counter()
        self._call_since = time.monotonic()
        try:
            with watch if watch is not None else contextlib.nullcontext():
                return fn(loop, *args)
        finally:
            self._call_since = None
            if self._busy is not None:
                self._busy.inc(time.perf_counter() - entered)

    def _decode(
        self,
        loop: asyncio.AbstractEventLoop,
        kv: KVState | None,
        rows: list[Seq],
        keep: list[Seq],
        new_kv: KVState | None,
        joined: list[Seq],
    ) -> tuple[KVState | None, list[Seq]]:
        """Drop rows that left, append the freshly prefilled ones, decode one token for each."""
        kv, rows = _select(kv, rows, [s for s in keep if not s.cancelled])
        if joined and new_kv is not None:
            kv = new_kv if kv is None else KVState.join([kv, new_kv])
            rows = rows + joined
        # Rows whose client left during the prefill go now, before paying for their decode.
        kv, rows = _select(kv, rows, [s for s in rows if not s.cancelled])
        if not rows or kv is None:
            return None, []
        call_started = time.monotonic()
        limit, budget = self._decode_limits()
        for step in range(limit):
            started = time.monotonic()
            try:
                logits = self.session.decode([s.generated[-1] for s in rows], kv)
            except Exception as exc:
                err = _engine_error(exc)
                log.error("model %s: decode of %d rows failed: %s", self.name, len(rows), err)
                loop.call_soon_threadsafe(self._hand_over, _failures(rows, err))
                return None, []
            events: list[tuple[Seq, Event]] = []
            for row, seq in enumerate(rows):
                events.extend(self._advance(seq, logits[row]))
            loop.call_soon_threadsafe(self._hand_over, events)  # each token streams as it is made
            now = time.monotonic()
            elapsed = now - started
            if elapsed > 0:
                rate, r = len(rows) / elapsed, self._tok_rate
                self._tok_rate = rate if r is None else r + _EWMA_ALPHA * (rate - r)
            # The next step would end at about now + elapsed: count it against the call's budget.
            if step + 1 < limit and not self._may_continue(rows, now - call_started + elapsed, budget):
                break
        return _select(kv, rows, [s for s in rows if not (s.done or s.cancelled)])

    def _decode_limits(self) -> tuple[int, float]:
        """Decode steps one engine call may run, and the seconds it may take: a quarter of
        ``engine.timeout_ms``, so that the steps of one call never look like a hung engine."""
        timeout_ms = float(self._tunables()["engine.timeout_ms"]) if self._tunables else 0.0
        return max(1, self.config.decode_steps), (timeout_ms / 4000 if timeout_ms > 0 else 60.0)

    def _may_continue(self, rows: list[Seq], spent_s: float, budget_s: float) -> bool:
        """Between two decode steps of one engine call (on the worker): whether the next step may
        follow without going back to the driver. Not when a row ended or was cancelled or evicted
        (its row leaves at the step boundary), a waiting sequence might be admitted or a prompt is
        part-way through its prefill (they join at the boundary, within one step), the model is
        closing, any engine call waits for the compute grant (it waits at most one step), or the
        next step would overrun the call's time budget. Reads loop-owned state without a lock:
        each read is one atomic attribute or length read, and a stale answer only costs or saves
        one step."""
        if any(s.done or s.cancelled or s.evicted for s in rows):
            return False
        cfg = self.config
        if any(self._queues) and (len(rows) < cfg.max_running or cfg.preemption):
            return False
        if self._prefilling or self._closed:
            return False
        if self._contended is not None and self._contended():
            return False
        return spent_s < budget_s

    def _prefill(
        self, loop: asyncio.AbstractEventLoop, work: list[Seq], allowance: int, budget: int | None
    ) -> tuple[KVState | None, list[Seq], list[Seq]]:
        """Prefill what this step's token budget allows of ``work`` (sequences still prefilling
        first, then newcomers); sample the first token of each whose context is now complete.

        A sequence's context starts from its longest cached prefix. With
        ``prefill_chunk_tokens`` set, at most that many tokens are computed in this call (the rest
        continues next step, after a decode of the running batch). Newcomers that need their
        whole context computed in one go are prefilled together as one left-padded batch; the
        others one row at a time, continuing from their past. Returns the KV rows and sequences
        that go on decoding, and those still prefilling."""
        cache = self.prefix
        started, computed = time.perf_counter(), 0
        whole: list[Seq] = []
        pieces: list[tuple[Seq, int]] = []
        for seq in work:
            if budget is not None and budget <= 0:
                break
            ctx = seq.context()
            if cache is not None and not seq.prefix_checked:
                seq.prefix_checked = True
                blocks = cache.lookup(ctx)
                if blocks:
                    seq.partial = KVState.concat_columns(blocks)
                    seq.filled = seq.partial.width
            remaining = len(ctx) - seq.filled
            take = remaining if budget is None else min(remaining, budget)
            if budget is not None:
                budget -= take
            computed += take
            if seq.partial is None and take == remaining:
                whole.append(seq)
            else:
                pieces.append((seq, take))
        events: list[tuple[Seq, Event]] = []
        done: list[tuple[list[Seq], KVState]] = []  # groups of completed rows and their KV
        failed: list[Seq] = []
        if whole:
            try:
                logits, kv = self.session.prefill([s.context() for s in whole])
            except Exception as exc:
                self._prefill_failed(loop, whole, exc)
                failed += whole
            else:
                for row, seq in enumerate(whole):
                    if cache is not None and not seq.cancelled:
                        self._remember(seq, kv.select([row]) if len(whole) > 1 else kv)
                    if not seq.cancelled:  # else it left while its prompt was being read
                        events.extend(self._first_token(seq, logits[row]))
                done.append((whole, kv))
        for seq, take in pieces:
            ctx = seq.context()
            try:
                logits, kv = self.session.prefill([ctx[seq.filled : seq.filled + take]], past=seq.partial)
            except Exception as exc:
                seq.partial = None
                self._prefill_failed(loop, [seq], exc)
                failed.append(seq)
                continue
            seq.partial, seq.filled = kv, seq.filled + take
            if cache is not None and seq.filled < len(ctx) and seq.filled <= len(seq.prompt):
                # Each chunk's whole blocks are cached as they come (vLLM's prefix caching keeps
                # a request's computed blocks too): a long prompt whose client hangs up, or whose
                # deadline passes, part-way through resumes from there when it is asked again.
                # Only new blocks are copied, so the prompt's KV is copied once in all.
                cache.insert(ctx[: seq.filled], kv)
            if seq.filled == len(ctx):
                seq.partial, seq.filled = None, 0
                if not seq.cancelled:
                    self._remember(seq, kv)
                    # Its first token goes out now, not after the other rows of this call.
                    loop.call_soon_threadsafe(self._hand_over, self._first_token(seq, logits[0]))
                    done.append(([seq], kv))
        if computed and not failed:
            rate = computed / max(time.perf_counter() - started, 1e-6)
            old = self._prefill_rate
            self._prefill_rate = rate if old is None else old + _EWMA_ALPHA * (rate - old)
        if cache is not None:
            cache.shrink(allowance)
        loop.call_soon_threadsafe(self._hand_over, events)
        # Everything not finished here stays admitted: part-way through its context, or not
        # reached by this step's budget (it keeps its reservation and goes first next step).
        ended = {id(s) for seqs, _ in done for s in seqs} | {id(s) for s in failed}
        pending = [s for s in work if id(s) not in ended and not s.cancelled]
        parts: list[KVState] = []
        joined: list[Seq] = []
        for seqs, kv in done:
            live = [i for i, s in enumerate(seqs) if not (s.done or s.cancelled)]
            if live:
                parts.append(kv.select(live) if len(live) < len(seqs) else kv)
                joined.extend(seqs[i] for i in live)
        if not parts:
            return None, [], pending
        return (parts[0] if len(parts) == 1 else KVState.join(parts)), joined, pending

    def _prefill_failed(self, loop: asyncio.AbstractEventLoop, seqs: list[Seq], exc: Exception) -> None:
        err = _engine_error(exc)
        log.error("model %s: prefill of %d sequences failed: %s", self.name, len(seqs), err)
        loop.call_soon_threadsafe(self._hand_over, _failures(seqs, err))

    def _first_token(self, seq: Seq, logits: np.ndarray) -> list[tuple[Seq, Event]]:
        if self.metrics is not None and not seq.preemptions:
            self.metrics.prompt_tokens.labels(self.name).inc(len(seq.prompt))
        return self._advance(seq, logits)

    def _remember(self, seq: Seq, row: KVState) -> None:
        """Offer a freshly prefilled row's whole prompt blocks to the prefix cache (before its
        first token is sampled: the row holds the KV of ``context()`` as it is then)."""
        if self.prefix is not None and len(seq.prompt) > self.prefix.block_tokens:
            # The row holds context(): the prompt, then what was generated before a preemption.
            if seq.generated:
                row = row.columns(0, row.width - len(seq.generated))
            self.prefix.insert(seq.prompt, row)

    def _advance(self, seq: Seq, logits: np.ndarray) -> list[tuple[Seq, Event]]:
        """Sample the next token of ``seq`` and say what it means for the client."""
        token = sample(logits, seq.params, seq.rng, seq.processor.suppressed())
        seq.generated.append(token)
        out = seq.processor.push(token)
        n = len(seq.generated)
        if self.metrics is not None:
            self.metrics.generation_tokens.labels(self.name).inc()
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.time_to_first_token.labels(self.name).observe(seq.first_token_at - seq.arrival)
        events: list[tuple[Seq, Event]] = []
        if out.text or out.reasoning or out.finish_reason is None:
            events.append((seq, Token(out.text, n, out.reasoning)))
        if out.finish_reason is not None:
            seq.done = True
            reasoning_tokens = seq.processor.reasoning_tokens
            events.append((seq, Finished(out.finish_reason, len(seq.prompt), n, reasoning_tokens)))
        return events


def _select(kv: KVState | None, rows: list[Seq], keep: list[Seq]) -> tuple[KVState | None, list[Seq]]:
    """The batch restricted to ``keep`` (a subsequence of ``rows``), KV trimmed to match."""
    if len(keep) == len(rows):
        return kv, rows
    if not keep or kv is None:
        return None, []
    index = {id(s): i for i, s in enumerate(rows)}
    return kv.select([index[id(s)] for s in keep]), keep


def _level(seqs: Sequence[Seq]) -> int:
    """The most urgent priority level among the rows of one engine call (1 is the most urgent)."""
    return min(s.priority for s in seqs)


class _Job:
    """One engine call handed to the worker; ``abandoned`` once the driver stopped waiting for it."""

    abandoned = False


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _failures(seqs: list[Seq], err: Exception) -> list[tuple[Seq, Event]]:
    return [(s, Failed(err)) for s in seqs]


def _engine_error(exc: Exception) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if "Failed to allocate memory" in text or "bad_alloc" in text or "out of memory" in text:
        return EngineOutOfMemory(text)
    return EngineError(text)
