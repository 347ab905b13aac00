"""Breakers and the response cache in front of every model: the fallback chain.

For each request: a fresh cache entry answers at once; otherwise the model's breaker decides
whether the engine is called; when it is open or the call fails, the answer comes from a fresh
cache entry, then a stale one within ``cache.max_stale_s``, then the model's configured default
response, and only then a 503 with ``Retry-After`` set to the time left in the open state.
Every answer says where it came from (``engine``, ``cache``, ``stale-cache``, ``default``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.breaker import BreakerConfig, BreakerOpen, BreakerState, CircuitBreaker
from appliance.cache import ResponseCache, cache_key
from appliance.errors import ApplianceError, EngineFailure, Unavailable
from appliance.telemetry import Metrics

log = logging.getLogger(__name__)


SOURCE_HEADER = "X-Appliance-Source"
_STATE_VALUE = {s: i for i, s in enumerate(BreakerState)}


@dataclass
class Answer:
    body: bytes
    content_type: str
    source: str  # engine | cache | stale-cache | default


Compute = Callable[[], Awaitable[tuple[bytes, str]]]
Default = Callable[[], tuple[bytes, str]]


def breaker_config(values: Mapping[str, Any]) -> BreakerConfig:
    cfg = BreakerConfig(
        window_s=float(values["breaker.window_s"]),
        min_requests=int(values["breaker.min_requests"]),
        failure_rate_threshold=float(values["breaker.failure_rate_threshold"]),
        slow_call_ms=float(values["breaker.slow_call_ms"]),
        slow_call_rate_threshold=float(values["breaker.slow_call_rate_threshold"]),
        open_duration_s=float(values["breaker.open_duration_s"]),
        half_open_probes=int(values["breaker.half_open_probes"]),
    )
    # A probe that never answers is failed after the engine timeout, so half-open cannot stick.
    timeout_s = float(values["engine.timeout_ms"]) / 1000
    cfg.probe_timeout_s = timeout_s + 1 if timeout_s > 0 else 60.0
    cfg.max_open_duration_s = max(cfg.max_open_duration_s, cfg.open_duration_s)
    cfg.validate()
    return cfg


class Resilience:
    """Owns one breaker per model and the server's response cache."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.breakers: dict[str, CircuitBreaker] = {}
        self.cache: ResponseCache | None = None
        # Per-model cache outcomes for the console (the SQLite cache counts server-wide).
        self._figures: dict[str, dict[str, int]] = {}

    def _count(self, model: str, outcome: str) -> None:
        f = self._figures.setdefault(model, {"hits": 0, "stale_hits": 0, "misses": 0})
        f[outcome] += 1

    def cache_figures(self, model: str) -> dict[str, Any]:
        f: dict[str, Any] = dict(self._figures.get(model, {"hits": 0, "stale_hits": 0, "misses": 0}))
        looked = f["hits"] + f["misses"]
        f["hit_rate"] = f["hits"] / looked if looked else None
        return f

    # -- lifecycle -------------------------------------------------------------------------
    async def open_cache(self, path: Path, values: Mapping[str, Any]) -> None:
        m = self.metrics

        def on_event(event: str, n: int) -> None:
            counter = {
                "hit": m.cache_hits,
                "miss": m.cache_misses,
                "stale": m.cache_stale_hits,
                "eviction": m.cache_evictions,
            }.get(event)
            if counter is not None:
                counter.inc(n)

        path.parent.mkdir(parents=True, exist_ok=True)
        cache = ResponseCache(
            path,
            max_bytes=int(values["cache.max_bytes"]),
            ttl_s=float(values["cache.ttl_s"]),
            max_stale_s=float(values["cache.max_stale_s"]),
            synchronous=str(values["cache.synchronous"]),
            on_event=on_event,
        )
        # The integrity check reads every page: never on the event loop.
        await asyncio.get_running_loop().run_in_executor(None, cache.open)
        self.cache = cache

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
            self.cache = None

    def configure_cache(self, values: Mapping[str, Any]) -> None:
        if self.cache is not None:
            self.cache.max_bytes = int(values["cache.max_bytes"])
            self.cache.ttl_s = float(values["cache.ttl_s"])
            self.cache.max_stale_s = float(values["cache.max_stale_s"])

    def refresh_metrics(self) -> None:
        # 0 when the cache never opened or turned itself off (a corrupt file): an alert's input.
        enabled = False
        if self.cache is not None:
            st = self.cache.stats()
            enabled = bool(st["enabled"])
            self.metrics.cache_entries.set(st["entries"])
            self.metrics.cache_bytes.set(st["bytes"])
        self.metrics.cache_enabled.set(1 if enabled else 0)
        for name, b in self.breakers.items():
            self.metrics.breaker_state.labels(name).set(_STATE_VALUE[b.state])

    # -- breakers --------------------------------------------------------------------------
    def breaker(self, model: str, values: Mapping[str, Any]) -> CircuitBreaker:
        b = self.breakers.get(model)
        if b is None:
            b = CircuitBreaker(model, breaker_config(values), on_transition=self._transition)
            self.breakers[model] = b
            self.metrics.breaker_state.labels(model).set(_STATE_VALUE[b.state])
        return b

    def configure(self, model: str, values: Mapping[str, Any]) -> None:
        b = self.breakers.get(model)
        if b is not None:
            cfg = breaker_config(values)
            b.reconfigure(**{f: getattr(cfg, f) for f in vars(cfg)})

    def _transition(self, name: str, old: BreakerState, new: BreakerState, reason: str) -> None:
        self.metrics.breaker_transitions.labels(name, old.value, new.value).inc()
        self.metrics.breaker_state.labels(name).set(_STATE_VALUE[new])

    # -- the fallback chain ----------------------------------------------------------------
    async def answer(
        self,
        model: str,
        identity: str,
        values: Mapping[str, Any],
        compute: Compute,
        *,
        canonical: Mapping[str, Any] | None,
        blobs: Sequence[bytes] = (),
        read_cache: bool = True,
        write_cache: bool = True,
        default: Default | None = None,
    ) -> Answer:
        cache = self.cache if (self.cache is not None and values["cache.enabled"]) else None
        key = cache_key(identity, canonical, blobs) if (cache and canonical is not None) else None
        hit = None
        if cache and key and read_cache:
            hit = await cache.get(key)
            if hit is not None and hit.fresh:
                self._count(model, "hits")
                return Answer(hit.value, hit.content_type, "cache")
            self._count(model, "misses")
        breaker = self.breaker(model, values)
        try:
            permit = breaker.acquire()
        except BreakerOpen as exc:
            return await self._fallback(
                model, cache, key, hit, read_cache, default, exc.retry_after_s, "breaker_open"
            )
        with permit:
            started = time.perf_counter()
            try:
                body, ctype = await compute()
            except EngineFailure as exc:
                permit.failure(exc.kind)
                log.warning("model %s: engine %s: %s", model, exc.kind, exc.message)
                return await self._fallback(
                    model, cache, key, hit, read_cache, default, None, "engine_" + exc.kind
                )
            except (ApplianceError, asyncio.CancelledError):
                # Client errors, admission refusals and disconnects say nothing of engine health.
                permit.ignore()
                raise
            permit.success(time.perf_counter() - started)
        if cache and key and write_cache:
            if cache.synchronous == "FULL":
                # FULL promises that an answered request's entry survives a power cut: wait (without
                # blocking the loop) for the writer's commit before answering.
                await cache.put_and_wait(key, model, body, ctype)
            else:
                cache.put(key, model, body, ctype)
        return Answer(body, ctype, "engine")

    async def _fallback(
        self,
        model: str,
        cache: ResponseCache | None,
        key: str | None,
        hit: Any,
        read_cache: bool,
        default: Default | None,
        retry_after_s: float | None,
        why: str,
    ) -> Answer:
        if hit is None and cache and key and read_cache:
            hit = await cache.get(key)
        if hit is not None:
            source = "cache" if hit.fresh else "stale-cache"
            self._count(model, "hits" if hit.fresh else "stale_hits")
            self.metrics.fallbacks.labels(model, source).inc()
            return Answer(hit.value, hit.content_type, source)
        if default is not None:
            self.metrics.fallbacks.labels(model, "default").inc()
            body, ctype = default()
            return Answer(body, ctype, "default")
        self.metrics.fallbacks.labels(model, "unavailable").inc()
        b = self.breakers.get(model)
        if retry_after_s is None and b is not None:
            retry_after_s = float(b.snapshot().get("open_remaining_s") or 1.0)
        message = (
            f"the model '{model}' is failing and its circuit breaker is open"
            if why == "breaker_open"
            else f"the model '{model}' failed ({why.removeprefix('engine_')}) and no fallback is available"
        )
        raise Unavailable(message, retry_after_s=retry_after_s or 1.0)

    # -- operator actions ------------------------------------------------------------------
    def action(self, model: str, verb: str, values: Mapping[str, Any]) -> dict[str, Any]:
        b = self.breaker(model, values)
        if verb == "open":
            b.force_open("operator")
        elif verb in ("close", "reset"):
            b.reset("operator")
        elif verb == "disable":
            b.disable("operator")
        else:
            raise ValueError(verb)
        return b.snapshot()
