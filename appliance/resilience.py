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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.breaker import BreakerConfig, BreakerState, CircuitBreaker
from appliance.cache import ResponseCache
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
    """Owns one breaker per model and the server's response cache; the request pipeline
    (``appliance.pipeline``) chains them into the fallback order the module docstring gives."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.breakers: dict[str, CircuitBreaker] = {}
        self.cache: ResponseCache | None = None
        # Per-model cache outcomes for the console (the SQLite cache counts server-wide).
        self._figures: dict[str, dict[str, int]] = {}
        # Called (under a breaker's lock, from any thread: it must only schedule) with a model's
        # name when its probes have failed breaker.restart_engine_after times in a row.
        self.on_engine_sick: Callable[[str], None] | None = None
        self._failed_probes: dict[str, int] = {}
        self._restart_after: dict[str, int] = {}

    def count(self, model: str, outcome: str) -> None:
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

        # (ResponseCache.open makes the folder, and serves without a cache if it cannot.)
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
            self._restart_after[model] = int(values["breaker.restart_engine_after"])
        return b

    def forget_model(self, model: str) -> None:
        """A model whose folder went: its breaker and figures go too, so that a folder copied
        back under the name (a new model) does not start with the old one's open breaker."""
        self.breakers.pop(model, None)
        self._figures.pop(model, None)
        self._failed_probes.pop(model, None)
        self._restart_after.pop(model, None)

    def configure(self, model: str, values: Mapping[str, Any]) -> None:
        b = self.breakers.get(model)
        if b is not None:
            cfg = breaker_config(values)
            b.reconfigure(**{f: getattr(cfg, f) for f in vars(cfg)})
            self._restart_after[model] = int(values["breaker.restart_engine_after"])

    def _transition(self, name: str, old: BreakerState, new: BreakerState, reason: str) -> None:
        self.metrics.breaker_transitions.labels(name, old.value, new.value).inc()
        self.metrics.breaker_state.labels(name).set(_STATE_VALUE[new])
        if new is BreakerState.HALF_OPEN:
            return  # a probe is on its way
        if new is not BreakerState.OPEN:
            self._failed_probes.pop(name, None)  # recovered, or an operator took over
            return
        if old is not BreakerState.HALF_OPEN:
            return  # the first trip: probes have not had their say yet
        # A probe failed. The breaker alone waits ever longer for an engine that may never
        # recover: a fault stuck in one instance (a poisoned CUDA context, a corrupted session)
        # fails every probe until the engine is replaced.
        failed = self._failed_probes.get(name, 0) + 1
        limit = self._restart_after.get(name, 0)
        if limit and failed >= limit and self.on_engine_sick is not None:
            log.warning("model %s: %d probes failed in a row; asking for a fresh engine", name, failed)
            self.on_engine_sick(name)
            failed = 0
        self._failed_probes[name] = failed

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
