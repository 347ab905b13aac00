"""The model manager: which models exist, which are loaded, and the live settings of each.

A loaded model owns its engine, the worker threads that run it and its batcher. Nothing here knows
about HTTP; the API layer asks the manager for a model and calls the matching service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from appliance import settings
from appliance.batcher import BatchPolicy
from appliance.config import Config
from appliance.engines.base import Engine
from appliance.engines.onnxruntime import OnnxRuntimeEngine
from appliance.errors import ModelNotFound, Unavailable
from appliance.repository import ModelEntry, ModelKind, RepositoryError, scan
from appliance.sdnotify import ProgressWatchdog
from appliance.telemetry import Metrics

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    unbuilt = "unbuilt"  # model.yaml present, artefacts not built yet
    available = "available"  # built, not loaded
    loading = "loading"
    resident = "resident"
    failed = "failed"


@dataclass
class ModelRuntime:
    """What a resident model needs to serve: engine, worker threads, batcher, kind-specific parts."""

    entry: ModelEntry
    engine: Engine
    executor: ThreadPoolExecutor
    # A Batcher, or for generate models the LLM scheduler: both have ``policy``, ``close(drain=)``
    # and ``snapshot()`` with the same keys.
    batcher: Any
    identity: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelSlot:
    entry: ModelEntry
    state: ModelState
    runtime: ModelRuntime | None = None
    error: str | None = None
    loaded_at: float | None = None
    last_used: float = 0.0
    load_task: asyncio.Task[None] | None = None


def batch_policy(values: dict[str, Any]) -> BatchPolicy:
    """The batcher's policy from a model's effective tunables (validated by BatchPolicy too)."""
    levels = int(values["queue.priority_levels"])
    return BatchPolicy(
        max_batch_size=int(values["batching.max_batch_size"]),
        max_queue_delay_ms=float(values["batching.max_queue_delay_ms"]),
        preferred_batch_sizes=list(values["batching.preferred_batch_sizes"]),
        priority_levels=levels,
        default_priority=int(values["queue.default_priority"]),
        max_queue_size=int(values["queue.max_queue_size"]),
        default_timeout_ms=float(values["queue.default_timeout_ms"]),
        allow_timeout_override=bool(values["queue.allow_timeout_override"]),
        aging_ms=float(values["queue.aging_ms"]),
    )


# Kind-specific runtime factories register here (embedding and tensor in appliance.inference,
# generate in appliance.llm). Each builds the batcher and extras for a freshly loaded engine.
RuntimeFactory = Callable[["ModelManager", ModelEntry, Engine, ThreadPoolExecutor], ModelRuntime]
RUNTIME_FACTORIES: dict[ModelKind, RuntimeFactory] = {}
# Kinds whose engine is not an OnnxRuntimeEngine over artefact "model" (generate) register an opener.
EngineOpener = Callable[[ModelEntry, dict[str, Any]], Engine]
ENGINE_OPENERS: dict[ModelKind, EngineOpener] = {}


class ModelManager:
    def __init__(self, cfg: Config, metrics: Metrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.slots: dict[str, ModelSlot] = {}
        self.scan_errors: list[str] = []
        # Engine workers report here; the systemd watchdog pings only while they progress.
        self.progress = ProgressWatchdog()

    # -- repository ------------------------------------------------------------------------
    def rescan(self) -> None:
        try:
            entries = list(scan(self.cfg.model_repository))
        except RepositoryError as exc:
            self.scan_errors = [str(exc)]
            log.error("model repository: %s", exc)
            return
        for e in entries:
            if e.name not in self.slots:
                state = ModelState.available if e.built else ModelState.unbuilt
                self.slots[e.name] = ModelSlot(entry=e, state=state)

    def default_models(self) -> list[str]:
        names = self.cfg.server.default_models
        if names is None:
            return [n for n, s in self.slots.items() if s.state != ModelState.unbuilt]
        return names

    def tunables(self, name: str) -> dict[str, Any]:
        slot = self._slot(name)
        return self.cfg.tunables_for(name, slot.entry.tunables)

    # -- lookup ----------------------------------------------------------------------------
    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return slot

    async def runtime(self, name: str) -> ModelRuntime:
        """The resident runtime of ``name``, loading it on demand."""
        slot = self._slot(name)
        slot.last_used = time.monotonic()
        if slot.runtime is not None:
            return slot.runtime
        if slot.state == ModelState.unbuilt:
            raise Unavailable(
                f"The model '{name}' is not built yet; run `appliance models pull {name}`",
                param="model",
            )
        await self.load(name)
        assert slot.runtime is not None
        return slot.runtime

    # -- lifecycle -------------------------------------------------------------------------
    async def load(self, name: str) -> None:
        slot = self._slot(name)
        if slot.runtime is not None:
            return
        if slot.load_task is None or slot.load_task.done():
            slot.load_task = asyncio.create_task(self._load(slot))
        await asyncio.shield(slot.load_task)
        if slot.runtime is None:
            raise Unavailable(f"The model '{name}' failed to load: {slot.error}", retry_after_s=5)

    async def _load(self, slot: ModelSlot) -> None:
        entry = slot.entry
        slot.state = ModelState.loading
        started = time.monotonic()
        values = self.cfg.tunables_for(entry.name, entry.tunables)
        instances = int(values["engine.instances"])
        executor = ThreadPoolExecutor(instances, thread_name_prefix=f"engine-{entry.name}")
        loop = asyncio.get_running_loop()
        try:
            engine = await loop.run_in_executor(executor, self._open_engine, entry, values)
            factory = RUNTIME_FACTORIES[entry.kind]
            runtime = factory(self, entry, engine, executor)
            warm = runtime.extras.get("warmup")
            if callable(warm):
                await loop.run_in_executor(executor, warm)
        except Exception as exc:
            executor.shutdown(wait=False)
            slot.state = ModelState.failed
            slot.error = str(exc)
            log.error("model %s failed to load: %s", entry.name, exc)
            return
        slot.runtime = runtime
        slot.state = ModelState.resident
        slot.error = None
        slot.loaded_at = time.time()
        elapsed = time.monotonic() - started
        self.metrics.model_loaded.labels(entry.name).set(1)
        self.metrics.model_load_duration.labels(entry.name).observe(elapsed)
        log.info("model %s resident (%s, %.2fs)", entry.name, engine.backend, elapsed)

    @staticmethod
    def _open_engine(entry: ModelEntry, values: dict[str, Any]) -> Engine:
        opener = ENGINE_OPENERS.get(entry.kind)
        if opener is not None:
            return opener(entry, values)
        return OnnxRuntimeEngine(
            entry.artefact("model"),
            intra_op_threads=int(values["engine.intra_op_threads"]),
            inter_op_threads=int(values["engine.inter_op_threads"]),
        )

    async def unload(self, name: str, *, drain: bool = True) -> None:
        slot = self._slot(name)
        runtime = slot.runtime
        if runtime is None:
            return
        slot.runtime = None
        slot.state = ModelState.available
        await runtime.batcher.close(drain=drain)
        runtime.executor.shutdown(wait=True)
        runtime.engine.close()
        self.metrics.model_loaded.labels(name).set(0)
        log.info("model %s unloaded", name)

    async def start(self) -> None:
        self.rescan()
        await asyncio.gather(
            *(self.load(n) for n in self.default_models() if n in self.slots),
            return_exceptions=True,
        )

    async def close(self, *, drain: bool = True) -> None:
        await asyncio.gather(*(self.unload(n, drain=drain) for n in list(self.slots)))

    def ready(self) -> bool:
        return all(
            n in self.slots and self.slots[n].state == ModelState.resident for n in self.default_models()
        )

    # -- live settings ---------------------------------------------------------------------
    def apply(self, name: str) -> None:
        """Push the current effective tunables of ``name`` into its running batcher."""
        slot = self._slot(name)
        if slot.runtime is not None:
            slot.runtime.batcher.policy = batch_policy(self.tunables(name))

    def describe(self, name: str) -> dict[str, Any]:
        slot = self._slot(name)
        d: dict[str, Any] = {
            "name": name,
            "kind": slot.entry.kind.value,
            "state": slot.state.value,
            "description": slot.entry.spec.description,
        }
        if slot.error:
            d["error"] = slot.error
        if slot.runtime is not None:
            d["backend"] = slot.runtime.engine.backend
            d["memory_bytes"] = slot.runtime.engine.memory_bytes()
        return d


def validate_model_settings(values: dict[str, Any]) -> None:
    """Cross-field checks the registry's per-setting bounds cannot express."""
    try:
        batch_policy({**settings.defaults(), **values}).validate()
    except ValueError as exc:
        raise settings.SettingError(str(exc).split(":", 1)[0], str(exc)) from None
