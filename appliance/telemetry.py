"""Prometheus metrics (prefix ``appliance_``, base units). One registry per server instance so that
several servers in one test process never share counters."""

from __future__ import annotations

import asyncio
import contextlib
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from appliance import logs

# Seconds; from sub-millisecond cache hits to minute-long generations.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._rendering: asyncio.Future[bytes] | None = None  # the scrape being rendered, if any
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # appliance_requests_total and appliance_request_duration_seconds: see RequestMetrics.
        self.request_stats = RequestMetrics(r)
        self.model_stats = ModelStats()  # Triton's statistics extension (GET /v2/models/stats)
        self.queue_duration = Histogram(
            "appliance_queue_duration_seconds",
            "Time an item waited in the batcher's queue.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "appliance_compute_duration_seconds",
            "Engine time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Measured on the engine's worker thread around the engine call itself, so its rate is the
        # engine's utilisation (nvitop's "GPU util" for this process): a rate well under 1 while
        # work waits means time lost between calls, not in them.
        self.engine_busy = Counter(
            "appliance_engine_busy_seconds",
            "Seconds the model's engine spent inside engine calls, measured on its worker thread.",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "appliance_batch_size",
            "Items per engine batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth",
            "Items waiting, by model and priority level.",
            ["model", "priority"],
            registry=r,
        )
        self.rejections = Counter(
            "appliance_rejections",
            "Queue items refused or dropped, by model, priority and reason: each input of an "
            "embedding request counts (a refused 16-sentence request adds 16), a generation one.",
            ["model", "priority", "reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "appliance_inflight_requests",
            "Requests being handled, by API.",
            ["api"],
            registry=r,
        )
        self.model_loaded = Gauge(
            "appliance_model_loaded",
            "1 when the model is resident and serving.",
            ["model"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "appliance_breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled.",
            ["model"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "appliance_breaker_transitions",
            "Breaker state changes.",
            ["model", "from_state", "to_state"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "appliance_engine_restarts",
            "Engines replaced after failing breaker.restart_engine_after probes in a row.",
            ["model"],
            registry=r,
        )
        self.fallbacks = Counter(
            "appliance_fallbacks",
            "Answers not from the engine because it failed or its breaker was open, by kind.",
            ["model", "kind"],
            registry=r,
        )
        self.cache_hits = Counter("appliance_cache_hits", "Fresh response-cache hits.", registry=r)
        self.cache_misses = Counter("appliance_cache_misses", "Response-cache misses.", registry=r)
        self.cache_stale_hits = Counter(
            "appliance_cache_stale_hits", "Stale entries served as a fallback.", registry=r
        )
        self.cache_evictions = Counter(
            "appliance_cache_evictions", "Entries evicted to stay under the size bound.", registry=r
        )
        self.cache_entries = Gauge("appliance_cache_entries", "Entries in the response cache.", registry=r)
        self.cache_bytes = Gauge("appliance_cache_bytes", "Bytes in the response cache.", registry=r)
        self.model_loads = Counter("appliance_model_loads", "Models made resident.", ["model"], registry=r)
        self.model_evictions = Counter(
            "appliance_model_evictions",
            "Idle models unloaded by the memory manager to make room.",
            ["model"],
            registry=r,
        )
        self.memory_budget = Gauge("appliance_memory_budget_bytes", "Bytes the models may use.", registry=r)
        self.memory_used = Gauge(
            "appliance_memory_used_bytes", "Resident bytes held per model.", ["model"], registry=r
        )
        self.memory_arena = Gauge(
            "appliance_memory_arena_bytes",
            "The shared activation budget: the largest need among resident models.",
            registry=r,
        )
        self.oom_splits = Counter(
            "appliance_oom_splits",
            "Batches split and retried after an out-of-memory error.",
            ["model"],
            registry=r,
        )
        self.model_load_duration = Histogram(
            "appliance_model_load_duration_seconds",
            "Time to load a model.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        # Generation (continuous batching of generate models); vLLM-like meanings.
        self.time_to_first_token = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from a generation's arrival to its first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "appliance_time_per_output_token_seconds",
            "Mean time between a sequence's output tokens after the first.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_duration = Histogram(
            "appliance_generation_duration_seconds",
            "End-to-end generation latency, arrival to last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation_queue_duration = Histogram(
            "appliance_generation_queue_duration_seconds",
            "Time a generation waited for a slot before its first prefill.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens",
            "Prompt tokens prefilled (not counting recomputes).",
            ["model"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "appliance_generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.preemptions = Counter(
            "appliance_preemptions",
            "Running sequences evicted for a higher-priority request (they resume by recomputing).",
            ["model"],
            registry=r,
        )
        self.running_sequences = Gauge(
            "appliance_running_sequences", "Sequences in the running batch.", ["model"], registry=r
        )
        self.waiting_sequences = Gauge(
            "appliance_waiting_sequences", "Generations waiting for a slot.", ["model"], registry=r
        )
        self.kv_cache_bytes = Gauge(
            "appliance_kv_cache_bytes", "Bytes held by the running batch's KV cache.", ["model"], registry=r
        )
        self.prefix_cache_query_tokens = Counter(
            "appliance_prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache (hit rate = hit / query tokens).",
            ["model"],
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            "appliance_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from cached blocks instead of being computed.",
            ["model"],
            registry=r,
        )
        self.prefix_cache_blocks = Gauge(
            "appliance_prefix_cache_blocks", "Blocks held by the prefix cache.", ["model"], registry=r
        )
        self.prefix_cache_evictions = Counter(
            "appliance_prefix_cache_evictions",
            "Prefix-cache blocks evicted (least recently used first) to stay in the KV budget.",
            ["model"],
            registry=r,
        )

        # Reliability: supervised workers, the event loop, the watchdog, model loads.
        self.worker_failures = Counter(
            "appliance_worker_failures",
            "Faults of background work (cache writer, GPU sampler, schedulers, batchers, start-up tasks).",
            ["worker"],
            registry=r,
        )
        self.worker_up = Gauge(
            "appliance_worker_up",
            "1 while the supervised worker runs, 0 while it is down.",
            ["worker"],
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "appliance_event_loop_lag_seconds",
            "How late the event loop ran a timer: time the loop was blocked.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.watchdog_healthy = Gauge(
            "appliance_watchdog_healthy",
            "1 while the watchdog keeps pinging (loop and busy engines progress), 0 when it holds back.",
            registry=r,
        )
        self.model_load_failures = Counter(
            "appliance_model_load_failures", "Model loads that failed.", ["model"], registry=r
        )
        self.cache_enabled = Gauge(
            "appliance_cache_enabled", "1 while the response cache serves, 0 when it is off.", registry=r
        )
        self.input_tokens = Histogram(
            "appliance_input_tokens",
            "Tokens per input (an embedding text or a prompt), by model.",
            ["model"],
            buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        # The compute arbiter: grants of engine time across models, by priority.
        self.compute_grants = Counter(
            "appliance_compute_grants",
            "Engine calls granted by the compute arbiter, by model and priority.",
            ["model", "priority"],
            registry=r,
        )
        self.compute_urgent_grants = Counter(
            "appliance_compute_urgent_grants",
            "Engine calls granted on the urgent lane (priority 1 past lower-priority work), by model.",
            ["model"],
            registry=r,
        )
        self.compute_wait = Histogram(
            "appliance_compute_wait_seconds",
            "Time an engine call waited for a compute grant, by priority.",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_waiting = Gauge(
            "appliance_compute_waiting",
            "Engine calls waiting for a grant, by priority.",
            ["priority"],
            registry=r,
        )
        self.compute_running = Gauge("appliance_compute_running", "Engine calls holding a grant.", registry=r)
        self.shed = Counter(
            "appliance_shed",
            "Requests refused before any work (early shedding and rate ceilings), by reason.",
            ["reason"],
            registry=r,
        )
        self.connections_closed = Counter(
            "appliance_connections_closed",
            "Connections the server closed to protect itself, by reason: over_cap (503 at the "
            "connection cap; on TLS, closed at the accept), idle_evicted (the idlest one, or the "
            "oldest TLS handshake, for a newcomer at the cap), "
            "send_timeout (its client received nothing for server.send_timeout_s).",
            ["reason"],
            registry=r,
        )
        r.register(LogDrops())

    async def exposition(self) -> bytes:
        """The registry in Prometheus' text format, rendered on a worker thread: prometheus_client
        renders in pure Python, ~2 s for the ~10 MB of 2,000 resident models, which on the event
        loop stalled every client for as long. Scrapes that arrive meanwhile share that rendering
        (one thread's work, however many scrapers), and a scraper that hangs up leaves it to them."""
        rendering = self._rendering
        if rendering is None:
            rendering = asyncio.get_running_loop().run_in_executor(None, generate_latest, self.registry)
            self._rendering = rendering
            rendering.add_done_callback(self._rendered)
        return await asyncio.shield(rendering)

    def _rendered(self, rendering: asyncio.Future[bytes]) -> None:
        self._rendering = None
        if not rendering.cancelled():
            rendering.exception()  # retrieved: each scraper still waiting gets it as its own

    def forget_model(self, model: str) -> None:
        """Drop every series labelled with ``model``, a model whose folder went (Triton drops an
        unloaded model's series too). Kept, a soak that added and removed folders grew every
        scrape, the registry and Triton's statistics for ever, and a folder copied back under the
        name (a new model) continued the old one's counters."""
        for metric in vars(self).values():
            if isinstance(metric, (Counter, Gauge, Histogram)):
                with contextlib.suppress(ValueError):  # a metric without a model label
                    metric.remove_by_labels({"model": model})
        for key in [k for k in self._children if model in k[1]]:
            del self._children[key]  # a cache: looked up again on next use
        self.request_stats.forget(model)
        self.model_stats.forget(model)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: labels() locks on every call, and the
        request path would pay that several times per request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class LogDrops:
    """``appliance_log_records_dropped_total``: read from appliance.logs at scrape time, since the
    logging is the process's (set up once, before any server) and its count outlives a server."""

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        return CounterMetricFamily(
            "appliance_log_records_dropped",
            "Log records dropped because stdout was not read fast enough (its queue was full).",
            value=logs.dropped(),
        )


class RequestMetrics:
    """``appliance_requests_total`` (by model, API and status) and
    ``appliance_request_duration_seconds`` (by model, API and priority), counted in plain lists on
    the event loop and handed to prometheus_client at scrape time as a custom collector: every
    request, each of thousands of refusals a second under overload included, recorded both, and a
    Counter and a Histogram take a lock and several calls each. Same names, labels, buckets and
    ``_created`` series as the Counter and Histogram they replace. Recorded on the event loop;
    collected on the thread that renders a scrape, each series copied whole in one step."""

    _LE = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counts: dict[tuple[str, str, str], list[float]] = {}  # -> [count, created]
        # -> per-bucket counts (the last for +Inf), then the sum, then created
        self._durations: dict[tuple[str, str, str], list[float]] = {}
        registry.register(self)

    def forget(self, model: str) -> None:
        for table in (self._counts, self._durations):
            for key in [k for k in table if k[0] == model]:
                del table[key]

    def record(self, model: str, api: str, status: str, priority: str, seconds: float) -> None:
        count = self._counts.get((model, api, status))
        if count is None:
            count = self._counts[(model, api, status)] = [0.0, time.time()]
        count[0] += 1
        hist = self._durations.get((model, api, priority))
        if hist is None:
            hist = self._durations[(model, api, priority)] = [0.0] * (len(LATENCY_BUCKETS) + 2) + [
                time.time()
            ]
        hist[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bucket whose bound is >= it
        hist[-2] += seconds

    def describe(self) -> list[Metric]:
        return [
            CounterMetricFamily("appliance_requests", "", labels=("model", "api", "status")),
            HistogramMetricFamily(
                "appliance_request_duration_seconds", "", labels=("model", "api", "priority")
            ),
        ]

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "appliance_requests",
            "Requests answered, by model, API and HTTP status.",
            labels=("model", "api", "status"),
        )
        for labels, (count, created) in list(self._counts.items()):
            requests.add_metric(labels, count, created=created)
        yield requests
        name = "appliance_request_duration_seconds"
        duration = HistogramMetricFamily(
            name,
            "End-to-end request latency, by model, API and priority level (0 = none resolved).",
            labels=("model", "api", "priority"),
        )
        for labels, series in list(self._durations.items()):
            hist = series[:]  # one step: the loop may record into it as this runs on another thread
            cumulative, buckets = 0.0, []
            for le, n in zip(self._LE, hist[:-2], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            duration.add_metric(labels, buckets, hist[-2])
            duration.add_sample(
                f"{name}_created", dict(zip(("model", "api", "priority"), labels, strict=True)), hist[-1]
            )
        yield duration


class _Model:
    __slots__ = (
        "batches",
        "cache_hit",
        "compute",
        "executions",
        "fail",
        "inferences",
        "last_ms",
        "queue",
        "success",
    )

    def __init__(self) -> None:
        self.last_ms = 0
        self.inferences = self.executions = 0
        # [count, seconds] each; batches by size
        self.success, self.fail, self.queue, self.compute = [0, 0.0], [0, 0.0], [0, 0.0], [0, 0.0]
        self.cache_hit: list[float] = [0, 0.0]
        self.batches: dict[int, list[float]] = {}


# What the request being served had counted in Triton's statistics (inferences, queue, compute,
# cache hits), held until the front door knows how the request ended: they count for a request
# that succeeded only (``ModelStats.answered``). Set by the front door for each request; None
# outside one (a test driving a service directly: counted at once).
Held = list[Callable[[], None]]
HELD: ContextVar[Held | None] = ContextVar("appliance_held_stats", default=None)


def held_stats() -> Held | None:
    """The held statistics of the request whose context this is, for work that ends elsewhere
    (a generation's end is seen by its scheduler's task)."""
    return HELD.get()


def _duration(pair: list[float]) -> dict[str, int]:
    return {"count": round(pair[0]), "ns": int(pair[1] * 1e9)}


class ModelStats:
    """Per-model counts and durations since start in the shape of Triton's statistics extension
    (``GET /v2/models[/{m}]/stats``: what ``tritonclient``'s ``get_inference_statistics`` and
    perf_analyzer read). Fed by the front door (each answered request) and the batchers and the
    LLM scheduler (each engine execution, and each request that succeeded, as it ends); plain
    numbers, event-loop thread only. Only known models are recorded (the caller checks), so
    made-up names cannot grow it."""

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}

    def forget(self, model: str) -> None:
        self._models.pop(model, None)

    def _of(self, model: str) -> _Model:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = _Model()
        return found

    def answered(self, model: str, ok: bool, seconds: float, held: Held | None = None) -> None:
        """An inference request answered (from the engine or the response cache), as the front
        door saw it end; what it ``held`` counts if it succeeded. Counted where the engine's or
        the cache's part ended, the work of a request whose client then left, or whose answer
        waited for its cache commit meanwhile, counted as inferences beside its failure."""
        m = self._of(model)
        pair = m.success if ok else m.fail
        pair[0] += 1
        pair[1] += seconds
        if ok:
            m.last_ms = int(time.time() * 1000)
            for count in held or ():
                count()

    @staticmethod
    def _count(held: Held | None, count: Callable[[], None]) -> None:
        if held is None:
            count()
        else:
            held.append(count)

    def cached(self, model: str, lookup_s: float) -> None:
        """A request answered from the response cache: a cache hit for Triton, not an inference.
        Triton's ``queue`` count includes cache hits (they waited for nothing here)."""
        m = self._of(model)

        def count() -> None:
            m.cache_hit[0] += 1
            m.cache_hit[1] += lookup_s
            m.queue[0] += 1

        self._count(held_stats(), count)

    def finished(
        self, model: str, queued_s: float, ran_s: float, rows: int = 1, held: Held | None = None
    ) -> None:
        """A request that succeeded, counted once as it ends: a generation that finished (a stop
        or its length), one inference however many steps it ran; a batched request
        (``Batcher.answered``), its ``rows`` inferences. Its wait in the queue and its compute
        (a generation's time from admission to its end; a batched request's batch run, averaged
        over its rows) count once, whole. Triton counts inferences, queue and compute of
        requests that succeeded: counted at admission, or per batch, hang-ups and failures
        counted too (9 inferences against 2 successes; 16 against none for a client that left
        while its rows ran). ``held``: the request's (``held_stats()`` in its context), for the
        front door to count if the request succeeds."""
        m = self._of(model)

        def count() -> None:
            m.inferences += rows
            m.queue[0] += 1
            m.queue[1] += queued_s
            m.compute[0] += 1
            m.compute[1] += ran_s

        self._count(held, count)

    def stepped(self, model: str, size: int, compute_s: float) -> None:
        """One engine execution (a batch, or a generation step) of ``size`` rows, whoever waits
        for them; the requests' queue and compute count when each ends (``finished``)."""
        m = self._of(model)
        m.executions += 1
        batch = m.batches.get(size)
        if batch is None:
            batch = m.batches[size] = [0, 0.0]
        batch[0] += 1
        batch[1] += compute_s

    def triton(self, model: str, version: str = "1") -> dict[str, Any]:
        m = self._models.get(model) or _Model()
        zero = {"count": 0, "ns": 0}
        return {
            "name": model,
            "version": version,
            "last_inference": m.last_ms,
            "inference_count": m.inferences,
            "execution_count": m.executions,
            "inference_stats": {
                "success": _duration(m.success),
                "fail": _duration(m.fail),
                "queue": _duration(m.queue),
                # One engine call does all of it here: inputs and outputs are not timed apart.
                "compute_input": zero,
                "compute_infer": _duration(m.compute),
                "compute_output": zero,
                "cache_hit": _duration(m.cache_hit),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": int(b[0]), "ns": 0},
                    "compute_infer": _duration(b),
                    "compute_output": {"count": int(b[0]), "ns": 0},
                }
                for size, b in sorted(m.batches.items())
            ],
        }


class RollingStats:
    """Per-model request rate and latency quantiles over a short window, for the admin snapshot.

    Prometheus histograms answer "since start"; an operator watching the console wants "now", and
    polling every second must stay cheap, so this keeps a bounded deque per model.
    """

    def __init__(self, window_s: float = 60.0, rate_window_s: float = 10.0, cap: int = 20_000) -> None:
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self.cap = cap
        self._events: dict[str, deque[tuple[float, float, int]]] = {}

    def forget(self, model: str) -> None:
        self._events.pop(model, None)

    def record(self, model: str, seconds: float, status: int, now: float | None = None) -> None:
        q = self._events.get(model)
        if q is None:  # (not setdefault: that would build a deque on every call)
            q = self._events[model] = deque(maxlen=self.cap)
        q.append((time.monotonic() if now is None else now, seconds, status))

    def snapshot(self, now: float | None = None) -> dict[str, dict[str, float | int]]:
        now = time.monotonic() if now is None else now
        out: dict[str, dict[str, float | int]] = {}
        for model, q in self._events.items():
            while q and q[0][0] < now - self.window_s:
                q.popleft()
            recent = [e for e in q if e[0] >= now - self.rate_window_s]
            ok = sorted(e[1] for e in q if e[2] < 400)
            out[model] = {
                "requests_per_s": len(recent) / self.rate_window_s,
                "errors_per_s": sum(1 for e in recent if e[2] >= 500) / self.rate_window_s,
                "rejected_per_s": sum(1 for e in recent if e[2] in (429, 503)) / self.rate_window_s,
                "p50_ms": _quantile(ok, 0.50) * 1e3,
                "p99_ms": _quantile(ok, 0.99) * 1e3,
                "window_requests": len(q),
            }
        return out


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]
