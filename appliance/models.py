"""The model manager: which models exist, which are loaded, and the live settings of each.

A loaded model owns its engine, the worker threads that run it and its batcher. Nothing here knows
about HTTP; the API layer asks the manager for a model and calls the matching service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from appliance import settings
from appliance.admission import AdmissionError, PolicyError, Reservation
from appliance.arbiter import ComputeArbiter
from appliance.batcher import BatchPolicy
from appliance.config import Config
from appliance.engines.base import Engine, Interface
from appliance.engines.onnxruntime import graph_io
from appliance.engines.select import expected_backend, expected_on_gpu, gpu_engines_available, open_engine
from appliance.errors import LoadFailed, ModelNotBuilt, ModelNotFound, ModelUnloading, Unavailable, quoted
from appliance.heap import freeze_long_lived, freeze_startup_heap, thaw
from appliance.memory import DoesNotFit, MemoryPools, measure, trim_heap
from appliance.repository import (
    MODEL_FILE,
    REPOSITORY,
    ModelEntry,
    ModelKind,
    ParseCache,
    artefact_stamp,
    scan_folders,
)
from appliance.sdnotify import ProgressWatchdog
from appliance.telemetry import Metrics
from appliance.weights import WeightsRecords, weights_key

log = logging.getLogger(__name__)


class _ArbiterMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def on_grant(self, model: str, priority: int, waited_s: float, urgent: bool) -> None:
        m = self.m
        m.child(m.compute_grants, model, str(priority)).inc()
        if urgent:
            m.child(m.compute_urgent_grants, model).inc()
        m.child(m.compute_wait, str(priority)).observe(waited_s)

    def on_waiting(self, priority: int, count: int) -> None:
        self.m.child(self.m.compute_waiting, str(priority)).set(count)

    def on_running(self, count: int) -> None:
        self.m.compute_running.set(count)


class ModelState(str, Enum):
    unbuilt = "unbuilt"  # model.yaml present, artefacts not built yet
    available = "available"  # built, not loaded
    loading = "loading"
    resident = "resident"
    evicted = "evicted"  # unloaded by the memory manager to make room; loads again on demand
    failed = "failed"


class ServingQueue(Protocol):
    """What the manager, the pipeline and the admin plane use of a model's queue: the dynamic
    ``Batcher``, or for generate models the LLM ``Scheduler`` (both ``EarlyAdmission``)."""

    @property
    def policy(self) -> BatchPolicy: ...

    @policy.setter
    def policy(self, value: BatchPolicy) -> None: ...

    async def close(self, drain: bool = True) -> None: ...

    def snapshot(self) -> dict[str, Any]:
        """Keys common to both: queue_depth, running_batches, recent_batch_sizes, rejections,
        service_rate."""
        ...

    def reserve(self, level: int, count: int, timeout_s: float = 0.0) -> Reservation: ...

    def refusal(self, level: int, count: int, timeout_s: float = 0.0) -> AdmissionError | None: ...

    def refused_again(self, level: int, error: AdmissionError, timeout_s: float = 0.0) -> bool: ...


@dataclass
class ModelRuntime:
    """What a resident model needs to serve: engine, worker threads, queue, kind-specific parts."""

    entry: ModelEntry
    engine: Engine
    executor: ThreadPoolExecutor
    batcher: ServingQueue
    identity: str
    # The kind's own runtime (``EmbeddingRuntime``, ``TensorRuntime``, ``LLMRuntime``): each
    # service checks it is the kind it serves, and refuses the request by name otherwise.
    service: object = None
    # A first run on the worker thread, so that the first request does not pay for it.
    warmup: Callable[[], None] | None = None
    # A run at a known batch (``PEAK_PROBE_ROWS``) whose transient memory peak, times
    # ``peak_scale``, sizes the model's activation lease; replaces ``warmup`` where present.
    peak_probe: Callable[[], None] | None = None
    peak_scale: float = 1.0
    # Load-time work after the peak probe, outside its measurement (an embedding model's batch-size
    # timing): its runs are at full batch already, and inside the probe their peak was scaled by
    # ``peak_scale`` again.
    tune: Callable[[], None] | None = None
    # Set by an embedding model's load-time measurement (``inference.measure_once``).
    measured_batch_size: dict[str, Any] | None = None
    # The LLM scheduler's running/waiting figures, for /admin/stats.
    generation_snapshot: Callable[[], dict[str, Any]] | None = None
    # The most tokens one input may hold (a decoder's context, an encoder's max sequence); None
    # where the model takes tensors, not text.
    context_length: int | None = None


@dataclass
class ModelSlot:
    entry: ModelEntry
    state: ModelState
    runtime: ModelRuntime | None = None
    error: str | None = None
    loaded_at: float | None = None
    last_used: float = 0.0
    # The context length its last load read, kept while it is unloaded (``describe`` shows it).
    context_length: int | None = None
    load_task: asyncio.Task[None] | None = None
    # Set while an unload drains the old engine: a load waits for it, so that two engines of one
    # model never run side by side and the memory lease released is the old engine's.
    unloading: asyncio.Future[None] | None = None
    failed_at: float = 0.0  # time.monotonic() of the last failed load
    # Its artefacts' stamp when that load failed (None: one was missing): rebuilt since (a pull),
    # the next request loads it rather than waiting out LOAD_RETRY_S with the old error.
    failed_stamp: str | None = None
    # That failure was the memory budget's (the model could never fit it): a new budget lifts it.
    failed_no_room: bool = False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _folder_mtime(folder: Path) -> int:
    """When a model's folder last changed (OpenAI's ``created``); 0 if it is gone meanwhile."""
    try:
        return int(folder.stat().st_mtime)
    except OSError:
        return 0


def _stamp(entry: ModelEntry) -> str | None:
    try:
        return artefact_stamp(entry.folder, entry.spec.artefacts.values())
    except OSError:
        return None


# After a failed load, requests are answered 503 for this long before one tries again.
LOAD_RETRY_S = 30.0
# How long a load's memory measurement waits for the engine calls running to end (arbiter.quiet):
# longer than any call but a hung one; it then measures anyway.
QUIET_WAIT_S = 5.0
# How long a request for a model that is being unloaded waits for the drain before its 503.
UNLOAD_WAIT_S = 2.0
# How long an unload waits for its engine's close (freeing its memory: milliseconds, a large
# TensorRT engine's a second) before it goes on without it (a hung driver).
CLOSE_WAIT_S = 10.0
# How long a metadata request waits for a model's interface to be read from its file (a few reads
# on a healthy disk) before its 503.
INTERFACE_WAIT_S = 5.0
# How often a request for an unknown or unbuilt model may read the repository again (a flood of
# requests for made-up names must not read every model.yaml each time).
RESCAN_MIN_S = 1.0


def batch_policy(values: dict[str, Any]) -> BatchPolicy:
    """The batcher's policy from a model's effective tunables, validated by BatchPolicy; a
    combination it refuses is a SettingError named by the setting an operator knows, not by the
    class's field ("BatchPolicy.default_priority" in a load failure named nothing one can set)."""
    try:
        return BatchPolicy(
            max_batch_size=int(values["batching.max_batch_size"]),
            max_queue_delay_ms=float(values["batching.max_queue_delay_ms"]),
            preferred_batch_sizes=list(values["batching.preferred_batch_sizes"]),
            priority_levels=int(values["queue.priority_levels"]),
            default_priority=int(values["queue.default_priority"]),
            max_queue_size=int(values["queue.max_queue_size"]),
            default_timeout_ms=float(values["queue.default_timeout_ms"]),
            allow_timeout_override=bool(values["queue.allow_timeout_override"]),
            aging_ms=float(values["queue.aging_ms"]),
            priority_1_alone=bool(values["batching.priority_1_alone"]),
            share_turns=bool(values["batching.share_turns"]),
            urgent_batch_ms=float(values["batching.urgent_batch_ms"]),
            observed_drain=bool(values["queue.observed_drain"]),
        )
    except PolicyError as exc:
        name = next((n for n in settings.REGISTRY if n.endswith("." + exc.field)), exc.field)
        raise settings.SettingError(name, f"{name} {exc.detail}") from None


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
        # Each model folder whose model.yaml is broken, with the error naming the file (a request
        # for it is told what is wrong, not that it does not exist), and the repository's own.
        self.broken: dict[str, str] = {}
        self._scanned_at = -RESCAN_MIN_S
        self._parsed: ParseCache = {}  # each model.yaml as last read (scan_folders)
        # The repository folder is there but could not be listed at the last look (permissions,
        # an I/O error): what it holds is unknown, not gone.
        self._unreadable = False
        self._start_defaults: list[str] | None = None  # see default_models
        # Engine workers report here; the systemd watchdog pings only while they progress.
        self.progress = ProgressWatchdog()
        server_values = cfg.tunables_for("", {})
        # Device memory for models on a GPU engine, host RAM for the rest (one pool without a GPU).
        self.memory = MemoryPools.create(server_values, _device_total())
        # Loads one at a time: footprints are measured from the process's memory, and two loads
        # at once would blur each other's figures.
        self._load_lock = asyncio.Lock()
        # The serving process sets this (appliance.server.serve): its start-up heap is frozen
        # once the default models are loaded (appliance.heap). Not in-process test servers,
        # whose heap is the test runner's.
        self.freeze_heap = False
        # Thawed by an unload (appliance.heap.thaw) and not frozen again since.
        self._thawed = False
        # Engine time across models, by priority (see arbiter.py).
        self.arbiter = ComputeArbiter(
            int(server_values["compute.concurrency"]),
            float(server_values["compute.aging_ms"]),
            int(server_values["compute.urgent_lane"]),
            observer=_ArbiterMetrics(metrics),
        )
        # Engines that share one device arena (TensorRT) never run at once, whatever the
        # arbiter's concurrency.
        self.arena_lock = threading.Lock()
        # Called with a model's name when a rescan drops it (its folder went): what layers above
        # keep by model name (breakers, the console's rolling figures) goes with it.
        self.forgetting: list[Callable[[str], None]] = []
        # The identity of each model's built artefacts, read once (cache keys need it per request).
        self._identities: dict[str, str] = {}
        # Artefact hashes running in a thread (identity_within), by model.
        self._hashing: dict[str, asyncio.Future[None]] = {}
        # Each non-resident model's inputs and outputs, read from its file, by the file's stamp.
        self._interfaces: dict[str, tuple[str, asyncio.Future[Interface]]] = {}
        # Each model folder's mtime, as read once since the last rescan (created()).
        self._created: dict[str, int] = {}
        # Models that have been resident since start: unloaded, they still count as ready.
        self._served: set[str] = set()
        self._restarting: set[str] = set()
        # Each model whose load timed out (or was stopped) with its engine call still running,
        # done once what that call opened is closed (see _discard_when_done).
        self._stuck_loads: dict[str, asyncio.Future[None]] = {}
        # Batch sizes learned from out-of-memory errors: never send a batch that big again.
        self.batch_caps: dict[str, int] = {}
        # Each embedding model's load-time batch-size measurement, with what it was measured for
        # (inference.measure_once): a model unloaded when idle and loaded again under traffic
        # reuses it instead of timing batches while other engines share the cores.
        self.batch_measurements: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        # Each model's weights as measured by an open that no other engine call overlapped, kept
        # in the data folder: an open beside other models' calls uses it (appliance/weights.py).
        self.weights_records = WeightsRecords(cfg.data_dir)
        self._keep_alive: asyncio.Task[None] | None = None
        # Unloads past their detach, each running to its end whoever awaited it (see unload).
        self._unloads: set[asyncio.Task[None]] = set()
        self.supervisor: Any = None  # set by the server: background tasks run under it
        self._arena: Any = None  # the shared TensorRT activation arena (a cuda.DeviceBuffer)

    # -- repository ------------------------------------------------------------------------
    def rescan(self) -> None:
        """Take the repository as it is now: new model folders are added, and a model that is not
        resident takes its folder's current ``model.yaml`` and build state, so a model pulled or
        edited while the server runs serves at its next load (a resident one keeps what it
        loaded with until it is unloaded)."""
        self._scanned_at = time.monotonic()
        self._created.clear()
        known = set(self.broken.values())
        entries, self.broken = scan_folders(self.cfg.model_repository, self._parsed)
        self._unreadable = REPOSITORY in self.broken and _is_dir(self.cfg.model_repository)
        for error in self.scan_errors:
            if error not in known:  # once each, however often it is rescanned
                log.error("model repository: %s", error)
        for e in entries:
            slot = self.slots.get(e.name)
            if slot is None:
                state = ModelState.available if e.built else ModelState.unbuilt
                self.slots[e.name] = ModelSlot(entry=e, state=state)
                continue
            if self._busy(slot):
                continue
            # Rebuilt meanwhile, perhaps: its cache identity is read again (no answer cached for
            # the old artefacts may be served as the new ones').
            self._identities.pop(e.name, None)
            changed = (e.spec, e.tunables) != (slot.entry.spec, slot.entry.tunables)
            if changed:
                slot.entry = e
            if not e.built:
                slot.state = ModelState.unbuilt
            elif slot.state == ModelState.unbuilt or (
                slot.state == ModelState.failed and (changed or _stamp(e) != slot.failed_stamp)
            ):
                # Built since, or its file or artefacts changed after a failed load (pulled
                # again): worth a load now.
                slot.state, slot.error, slot.failed_at = ModelState.available, None, 0.0
        found = {e.name for e in entries}
        if self._unreadable:
            # An empty listing is not an empty repository: models dropped here were 404 "does not
            # exist" (and an admin unload said "removed") for as long as a chmod or a flaky disk
            # lasted. They stay as they were; a load of one fails on its files (503, Retry-After).
            found |= set(self.slots)
        for name in [n for n, s in self.slots.items() if n not in found]:
            slot = self.slots[name]
            if not self._busy(slot):
                # Its folder is gone: a request for it is a 404, not a load that fails for ever.
                # A resident one serves on from memory until it is unloaded.
                del self.slots[name]
                self._forget(name)
        if self._start_defaults is None:  # the first scan: what "every built model" means
            self._start_defaults = [n for n, s in self.slots.items() if s.state != ModelState.unbuilt]

    def _forget(self, name: str) -> None:
        """Drop what is kept by the name of a model whose folder went. Kept, these grew with every
        folder a soak added and removed, and a folder copied back under the name (a new model)
        inherited the old one's "has served" readiness and its learned batch caps. A hash or a
        stuck load still running keeps its entry (``_hashing``, ``_stuck_loads``) until it ends:
        each drops itself then, and a stop waits for the stuck load."""
        self._identities.pop(name, None)
        self._interfaces.pop(name, None)
        self._created.pop(name, None)
        self._served.discard(name)
        self.batch_caps.pop(name, None)
        self.batch_measurements.pop(name, None)
        self.arbiter.forget(name)
        self.metrics.forget_model(name)
        for forget in self.forgetting:
            forget(name)

    @staticmethod
    def _busy(slot: ModelSlot) -> bool:
        """Resident, loading or unloading: its entry stays what it loaded with. An unloading
        model's runtime is already None while it drains, and a rescan then (a SIGHUP, a request
        for a new name) deleted its slot under the drain: its streams failed with ModelNotFound
        from the scheduler's tunables, the unload answered 404, the scheduler loop died."""
        loading = slot.load_task is not None and not slot.load_task.done()
        return slot.runtime is not None or loading or slot.unloading is not None

    @property
    def scan_errors(self) -> list[str]:
        """The repository's errors at its last reading: each broken model file, or the folder's own."""
        return list(self.broken.values())

    def _look_again(self) -> None:
        """Read the repository again, at most once every ``RESCAN_MIN_S`` (a flood of requests
        for made-up names must not read every model.yaml each time)."""
        if time.monotonic() - self._scanned_at >= RESCAN_MIN_S:
            self.rescan()

    def find(self, name: str) -> ModelSlot:
        """The slot of ``name``, reading the repository again for a name not in it when it was
        last read: what the admin plane acts on sees the folders the data plane serves. A 404
        otherwise, naming a broken model.yaml."""
        if name not in self.slots:
            self._look_again()
        return self._slot(name)

    def request_slot(self, name: str) -> ModelSlot:
        """The slot a request for ``name`` goes to: a 404 for none, and for a model not built
        (ModelNotBuilt, which says to pull it). A name not in the repository when it was last
        read, or a model not built then, looks at the repository again (at most once every
        ``RESCAN_MIN_S``): the answer "run `appliance models pull`" must stop once the user has,
        without a reload, and a folder copied in serves as in Ollama."""
        slot = self.slots.get(name)
        # A failed model is looked at again too: pulled since, it loads now, not LOAD_RETRY_S on.
        stale = slot is None or slot.state in (ModelState.unbuilt, ModelState.failed)
        if slot is not None and slot.runtime is None and not stale:
            # Removed since: a 404 now. Unreadable (Path.exists() raises for EACCES, a 500 here):
            # looked at again too, and rescan() tells an unreadable repository from an empty one.
            stale = not _is_file(slot.entry.folder / MODEL_FILE)
        if stale:
            self._look_again()
        slot = self._slot(name)
        if slot.state == ModelState.unbuilt:
            raise ModelNotBuilt(name)
        return slot

    def default_models(self) -> list[str]:
        """``server.default_models``; unset, the models built when the server started (a model
        pulled or copied in later serves on demand: counted here, it made the server not ready
        until its first request loaded it)."""
        names = self.cfg.server.default_models
        if names is None:
            return list(self._start_defaults or ())
        return names

    def created(self, name: str) -> int:
        """When ``name``'s folder last changed, as of the repository's last reading: GET /v1/models
        did a stat per model on the event loop at every listing (2,000 of them, a slow or network
        disk's latency each); a folder is read once per rescan, as its model.yaml is."""
        created = self._created.get(name)
        if created is None:
            created = self._created[name] = _folder_mtime(self._slot(name).entry.folder)
        return created

    def tunables(self, name: str) -> dict[str, Any]:
        slot = self._slot(name)
        return self.cfg.tunables_for(name, slot.entry.tunables)

    # -- lookup ----------------------------------------------------------------------------
    def _slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            broken = self.broken.get(name)
            if broken is not None:  # its folder is there, its model.yaml is not readable
                raise ModelNotFound(f"The model '{quoted(name)}' cannot be read: {broken}", param="model")
            if self._unreadable:  # whether it exists is unknown until the folder can be read
                raise Unavailable(
                    f"The model '{quoted(name)}' cannot be looked up: {self.broken[REPOSITORY]}",
                    param="model",
                    retry_after_s=RESCAN_MIN_S,
                )
            raise ModelNotFound(f"The model '{quoted(name)}' does not exist", param="model")
        return slot

    async def runtime(self, name: str) -> ModelRuntime:
        """The resident runtime of ``name``, loading it on demand."""
        slot = self.request_slot(name)
        slot.last_used = time.monotonic()
        if slot.runtime is not None:
            return slot.runtime
        wait = slot.failed_at + LOAD_RETRY_S - time.monotonic()
        if slot.state == ModelState.failed and wait > 0:
            # A load that failed is not tried again by every request (each would take the load
            # lock for the whole attempt, a large model's for seconds); an operator's load is.
            raise LoadFailed(name, slot.error or "no reason recorded", param="model", retry_after_s=wait)
        await self.load(name)
        assert slot.runtime is not None
        return slot.runtime

    async def interface(self, name: str) -> Interface:
        """The inputs and outputs of ``name`` (a model with an ONNX ``model`` artefact) as its
        engine shows them, for metadata: the resident engine's, else read from the file without
        loading it. A metadata GET that loaded the model took seconds and its memory (evicting
        another), and waited on the load unbounded; the file's header is a few reads, done in a
        thread (a stalled disk must not stall the loop), cached until the file changes, and
        waited for at most INTERFACE_WAIT_S (then a 503 with Retry-After)."""
        slot = self.request_slot(name)
        if slot.runtime is not None:
            return Interface(slot.runtime.engine.inputs, slot.runtime.engine.outputs)
        entry = slot.entry
        if "model" not in entry.spec.artefacts:  # as its load would fail (a KeyError was a 500)
            raise LoadFailed(name, "its model.yaml names no 'model' artefact", retry_after_s=LOAD_RETRY_S)
        try:
            stamp = artefact_stamp(entry.folder, [entry.spec.artefacts["model"]])
        except FileNotFoundError:
            raise ModelNotBuilt(name) from None
        except OSError as exc:
            raise LoadFailed(
                name, f"its model file cannot be read ({exc})", retry_after_s=RESCAN_MIN_S
            ) from None
        cached = self._interfaces.get(name)
        if cached is None or cached[0] != stamp:
            read = asyncio.get_running_loop().run_in_executor(None, graph_io, entry.artefact("model"))

            def forget(done: asyncio.Future[Interface]) -> None:
                # A failed read is not kept (an I/O error may pass); nor left unretrieved.
                failed = done.cancelled() or done.exception() is not None
                if failed and self._interfaces.get(name, (None, None))[1] is done:
                    del self._interfaces[name]

            read.add_done_callback(forget)
            cached = self._interfaces[name] = (stamp, read)
        try:
            # Shielded: a read that outlasts one request's wait is still cached for the next.
            return await asyncio.wait_for(asyncio.shield(cached[1]), INTERFACE_WAIT_S)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"The model '{name}' could not be described in {INTERFACE_WAIT_S:g} s: its model file "
                "is slow to read",
                param="model",
                retry_after_s=INTERFACE_WAIT_S,
            ) from None
        except (OSError, ValueError) as exc:
            raise LoadFailed(
                name, f"its model file cannot be read ({exc})", retry_after_s=LOAD_RETRY_S
            ) from None

    # -- lifecycle -------------------------------------------------------------------------
    async def load(self, name: str) -> None:
        slot = self._slot(name)
        while slot.unloading is not None:
            # A drain lasts as long as the longest running generation (minutes): a new request
            # waited for all of it, then loaded the model the operator had just unloaded. It
            # waits briefly (an embedding model's drain), then is told to come back.
            done, _ = await asyncio.wait({slot.unloading}, timeout=UNLOAD_WAIT_S)
            if not done:
                raise ModelUnloading(name)
            # The unload's rescan may have let the model go (its folder or model.yaml went: a
            # 404 now) or given it a new slot; the old one was loaded into, detached, and failed.
            slot = self._slot(name)
        if slot.runtime is not None:
            return
        if slot.state != ModelState.loading and self._unreadable and not slot.entry.built:
            # Its files cannot be read because the repository cannot: not "not built, pull it".
            raise Unavailable(
                f"The model '{name}' cannot be loaded now: {self.broken[REPOSITORY]}",
                retry_after_s=RESCAN_MIN_S,
            )
        if slot.state == ModelState.unbuilt or (slot.state != ModelState.loading and not slot.entry.built):
            # Not "failed": nothing went wrong, and loading cannot help until it is built. An
            # artefact removed since the last scan is found here, before a load that would fail
            # on it (a 503 "No such file" for what `appliance models pull` mends).
            slot.state = ModelState.unbuilt
            raise ModelNotBuilt(name)
        if slot.load_task is None or slot.load_task.done():
            if name in self._stuck_loads:
                # Its last load timed out and that engine call still runs (an open on a stalled
                # disk, a warm-up in a wedged driver): a second engine opened beside it doubled
                # the model's memory, the stuck one's counted in no lease, and on a hung driver
                # hung too. Refused until that call has ended and what it opened is closed,
                # without the load lock: other models load meanwhile. Never ending, it is the
                # watchdog's case.
                raise LoadFailed(
                    name,
                    "its last load timed out (engine.load_timeout_s) and that engine call is still "
                    "running; it is not opened again beside it until that call ends",
                    retry_after_s=LOAD_RETRY_S,
                )
            slot.load_task = asyncio.create_task(self._load(slot))
        await asyncio.shield(slot.load_task)
        if slot.runtime is None and slot.state is not ModelState.failed and slot.error is None:
            # Loaded, then unloaded before this request got to it (an operator's unload during
            # the load): nothing failed, and "failed to load (no reason recorded)" said it had.
            raise ModelUnloading(name)
        if slot.runtime is None:
            # A failed load is not tried again for LOAD_RETRY_S (``runtime``): that is when to
            # come back (a hint of 5 s had clients retry into 25 s of refusals). No room yet is
            # tried again by the next request, once other models may have gone idle.
            wait = 5.0
            if slot.state is ModelState.failed:
                wait = max(slot.failed_at + LOAD_RETRY_S - time.monotonic(), 1.0)
            raise LoadFailed(name, slot.error or "no reason recorded", retry_after_s=wait)

    def idle(self, name: str) -> bool:
        """Nothing queued or running: safe to evict."""
        slot = self.slots.get(name)
        if slot is None or slot.runtime is None:
            return True
        snap = slot.runtime.batcher.snapshot()
        return not snap["running_batches"] and not any(snap["queue_depth"].values())

    def _footprint(self, entry: ModelEntry, values: dict[str, Any]) -> int:
        """What loading will take before it is measured: the artefacts' bytes, plus a KV cache."""
        total = 0
        for f in entry.spec.artefacts.values():
            p = entry.folder / f
            total += p.stat().st_size if p.exists() else 0
            data = p.with_name(p.name + ".data")
            total += data.stat().st_size if data.exists() else 0
        if entry.kind == ModelKind.generate:
            # The KV cache budget is taken from the memory budget, reserved at load.
            total += int(values.get("generation.kv_cache_bytes", 0) or 0)
        return total

    async def _make_room(self, name: str, weights: int, activation: int, on_gpu: bool = False) -> None:
        def plan() -> list[str]:
            return self.memory.plan(
                name,
                weights,
                activation,
                idle=self.idle,
                last_used=lambda n: self.slots[n].last_used,
                on_gpu=on_gpu,
            )

        victims = plan()
        while victims:
            v = victims.pop(0)
            if not self.idle(v):
                # Given work while an earlier victim unloaded (its drain, its worker threads,
                # the heap trim take a while): planned again without it. Evicted from the first
                # plan, it was unloaded with requests queued and streams starting on it, where
                # only idle models may go.
                victims = plan()
                continue
            log.info("evicting idle model %s to make room for %s", v, name)
            self.metrics.model_evictions.labels(v).inc()
            await self.unload(v, evicted=True)

    async def _load(self, slot: ModelSlot) -> None:
        async with self._load_lock:
            await self._load_locked(slot)

    async def _load_locked(self, slot: ModelSlot) -> None:
        entry = slot.entry
        slot.state = ModelState.loading
        started = time.monotonic()
        values = self.cfg.tunables_for(entry.name, entry.tunables)
        instances = int(values["engine.instances"])
        estimate = self._footprint(entry, values)
        try:
            await self._make_room(
                entry.name, estimate, 0, entry.kind not in ENGINE_OPENERS and expected_on_gpu(entry)
            )
        except DoesNotFit as exc:
            slot.state = ModelState.failed if exc.never else ModelState.available
            slot.error = str(exc)
            if exc.never:
                # As a measured footprint's refusal below: not tried again for LOAD_RETRY_S (its
                # Retry-After had said 1 s to a model that cannot fit until the budget changes).
                self._failed(slot, no_room=True)
            log.error("model %s not loaded: %s", entry.name, exc)
            return
        executor = ThreadPoolExecutor(instances, thread_name_prefix=f"engine-{entry.name}")
        loop = asyncio.get_running_loop()
        holder: list[Engine] = []
        runtime: ModelRuntime | None = None
        # Each step on the worker is waited for until the load's deadline, no longer: a hung
        # engine open held the load lock for ever, and with it every later load (of any model)
        # and each request waiting on one. A step past it is left to end in its thread.
        timeout_s = float(values["engine.load_timeout_s"])
        deadline = started + timeout_s
        stuck: list[asyncio.Future[Any]] = []

        async def step(fn: Callable[..., Any], *args: Any) -> Any:
            run = loop.run_in_executor(executor, fn, *args)
            try:
                done, _ = await asyncio.wait({run}, timeout=max(deadline - time.monotonic(), 0.0))
            except asyncio.CancelledError:
                # Stopped (the manager's close at shutdown) with the call still running on the
                # worker: what it opens is discarded when it ends, as a timed-out step's is.
                stuck.append(run)
                raise
            if not done:
                stuck.append(run)
                raise LoadTimedOut(
                    f"it did not load within {timeout_s:g} s (engine.load_timeout_s); the engine "
                    "call still running is discarded when it ends"
                )
            return run.result()

        # Whether any engine call ran beside the open (the arbiter is the loop's: read here).
        granted_before, held_before = self.arbiter.granted, self.arbiter.held()
        try:
            grown, _ = await step(measure, lambda: holder.append(self._open_engine(entry, values)))
            quiet_open = (
                not held_before and self.arbiter.granted == granted_before and not self.arbiter.held()
            )
            engine = holder[0]
            if not hasattr(engine, "activation_bytes"):  # read from RSS (TensorRT's is its plan's)
                grown = await step(self._trusted_weights, entry, engine, values, grown, quiet_open)
            factory = RUNTIME_FACTORIES[entry.kind]
            # The factory takes the artefacts' digest (the runtime's identity): hashed here, on
            # the worker, when there is no build record, not by the factory on the event loop.
            await step(_digest_quietly, entry)
            runtime = factory(self, entry, engine, executor)
            warm = runtime.peak_probe or runtime.warmup
            activation = 0
            if hasattr(engine, "activation_bytes"):
                # TensorRT knows its scratch need exactly; its weights are the plan, not our RSS.
                activation = int(engine.activation_bytes())
                grown = engine.memory_bytes()
                await step(self._share_arena, engine)
                if runtime.warmup is not None:
                    await step(runtime.warmup)
            elif warm is not None:
                # The run's transient peak above what stays resident. What the allocator keeps after
                # a first run is the process's heap, reused by every model, not this model's.
                # With every engine quiet: the peak is read from the whole process's RSS, and another
                # model's batch running meanwhile was counted as this one's (a MiniLM leased 0 to
                # 838 MiB of activations for a need of 190 while another served: "never fits").
                async with self.arbiter.quiet(QUIET_WAIT_S) as quiet:
                    _, peak = await step(measure, warm)
                if not quiet:
                    log.warning(
                        "model %s: an engine call ran through the memory measurement; its activation "
                        "lease may be off",
                        entry.name,
                    )
                activation = int(peak * runtime.peak_scale)
                if runtime.tune is not None:
                    await step(runtime.tune)
            weights = max(estimate, grown)
            try:
                await self._make_room(entry.name, weights, activation, engine.on_gpu)
            except DoesNotFit:
                await runtime.batcher.close(drain=False)
                raise
        except (Exception, asyncio.CancelledError) as exc:
            # Cancelled too (the manager's close stops a load at shutdown): that skipped all of
            # this, and the engine it had opened was never closed, its worker never shut down.
            if stuck:
                # Timed out or stopped: the engine is not closed under the call still running on
                # it (a TensorRT engine's memory freed under its run); whatever that call opened
                # is closed once it returns.
                self._discard_when_done(entry.name, holder, stuck[0])
            elif holder:  # opened, then the load failed: its memory goes back now, not at exit
                try:
                    await _close_engine(entry.name, holder[0])  # on a thread, bounded, as unload's
                except Exception:
                    log.exception("model %s: closing the engine of a failed load", entry.name)
            if runtime is not None:  # the queue built for it goes now
                with contextlib.suppress(Exception):
                    await runtime.batcher.close(drain=False)
            executor.shutdown(wait=False)
            if isinstance(exc, asyncio.CancelledError):
                # Stopped, not failed: nothing to count or to refuse it for.
                slot.state, slot.error = ModelState.available, None
                log.info("model %s: its load was stopped", entry.name)
                raise
            never = isinstance(exc, DoesNotFit) and exc.never
            slot.state = (
                ModelState.failed if never or not isinstance(exc, DoesNotFit) else ModelState.available
            )
            slot.error = str(exc)
            # Counted when the load is given up; "no room yet" (available again) is not a failure.
            if slot.state is ModelState.failed:
                self._failed(slot, no_room=never)
            log.error("model %s failed to load: %s", entry.name, exc)
            return
        self.memory.admit(
            entry.name,
            weights,
            activation,
            bool(values["memory.pinned"]) or entry.spec.pinned,
            on_gpu=engine.on_gpu,
        )
        self.metrics.model_loads.labels(entry.name).inc()
        self._memory_metrics()
        slot.runtime = runtime
        # The queue was built from the settings read before the warm-up; a PATCH or reload since
        # skipped this model (not resident yet), and it would have served the old ones.
        self._apply(slot)
        self._identities[entry.name] = f"{entry.name}@{runtime.identity}"
        slot.state = ModelState.resident
        # A load counts as a use: keep_alive runs from here, or an operator's load of a model
        # idle for long would be undone by the next keep-alive check, within a second.
        slot.last_used = time.monotonic()
        self._served.add(entry.name)
        slot.error = None
        slot.loaded_at = time.time()
        slot.context_length = runtime.context_length
        elapsed = time.monotonic() - started
        self.metrics.model_loaded.labels(entry.name).set(1)
        self.metrics.model_load_duration.labels(entry.name).observe(elapsed)
        log.info("model %s resident (%s, %.2fs)", entry.name, engine.backend_name, elapsed)
        if self.freeze_heap:
            # What the load built lives until the unload, which thaws it: out of every full
            # collection meanwhile (2,000 models loaded on demand made each one that a /metrics
            # scrape set off walk ~1.3 million objects, 250-530 ms on the loop). Only what is
            # not frozen yet is walked here.
            freeze_long_lived()
            self._thawed = False

    def _discard_when_done(self, name: str, holder: list[Engine], run: asyncio.Future[Any]) -> None:
        """A load given up while its engine call ``run`` still runs: what that call opened is
        closed on a thread once it returns. Until then the model is not loaded again (load), and
        the manager's close waits for it (no engine left open, no worker thread unaccounted)."""
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stuck_loads[name] = ended

        def closed(_: asyncio.Future[None]) -> None:
            self._stuck_loads.pop(name, None)
            if not ended.done():
                ended.set_result(None)

        run.add_done_callback(lambda _: _discard_late(name, holder, run).add_done_callback(closed))

    def _trusted_weights(
        self, entry: ModelEntry, engine: Engine, values: dict[str, Any], grown: int, quiet: bool
    ) -> int:
        """The RSS growth of ``entry``'s open, or, where other engine calls ran beside it, the one
        last measured on a quiet process for the same artefacts, backend and settings (their
        batches' memory, taken or given back meanwhile, is not this model's: a MiniLM read 132 to
        260 MiB so for 102 to 121 quiet). A quiet reading is kept for the next. On the worker."""
        try:
            key = weights_key(entry.digest(), engine.backend_name, values)
        except OSError:  # its artefacts cannot be read now: nothing to tie a reading to
            return grown
        if quiet:
            self.weights_records.put(key, entry.name, grown)
            return grown
        known = self.weights_records.get(key)
        if known is None:
            log.warning(
                "model %s: other engine calls ran while it opened; its weights lease (%d MiB) is read "
                "from the whole process and may be off until a load on a quiet process measures it",
                entry.name,
                grown >> 20,
            )
            return grown
        log.info(
            "model %s: weights %d MiB as measured on a quiet process (this open, beside other "
            "engine calls, read %d MiB)",
            entry.name,
            known >> 20,
            grown >> 20,
        )
        return known

    def _failed(self, slot: ModelSlot, *, no_room: bool) -> None:
        """Record a load given up: refused for LOAD_RETRY_S, and counted."""
        slot.failed_at = time.monotonic()
        slot.failed_stamp = _stamp(slot.entry)
        slot.failed_no_room = no_room
        self.metrics.model_load_failures.labels(slot.entry.name).inc()

    @staticmethod
    def _open_engine(entry: ModelEntry, values: dict[str, Any]) -> Engine:
        opener = ENGINE_OPENERS.get(entry.kind)
        if opener is not None:
            return opener(entry, values)
        return open_engine(entry, values)

    def _share_arena(self, engine: Any) -> None:
        """One device arena for every TensorRT engine, sized to the largest need; the engines take
        turns on it under ``arena_lock``. Grown (never shrunk) when a larger engine arrives."""
        with self.arena_lock:
            need = int(engine.activation_bytes())
            if self._arena is None or self._arena.nbytes < need:
                from appliance.gpu.cuda import DeviceBuffer

                old, self._arena = self._arena, DeviceBuffer(max(need, 256))
                for slot in self.slots.values():
                    other = slot.runtime.engine if slot.runtime else None
                    if other is not None and hasattr(other, "set_activation"):
                        other.set_activation(self._arena)
                if old is not None:
                    old.close()
            engine.set_activation(self._arena)

    async def unload(
        self, name: str, *, drain: bool = True, evicted: bool = False, rescan: bool = True
    ) -> None:
        """``rescan=False``: the caller reads the repository once after all its unloads (a
        rescan is a few stats per model folder: ~100 ms of the loop's at 2,000 models)."""
        slot = self._slot(name)
        runtime = slot.runtime
        if runtime is None:
            return
        slot.runtime = None
        slot.state = ModelState.evicted if evicted else ModelState.available
        done = slot.unloading = asyncio.get_running_loop().create_future()
        # Once detached, the rest runs as a task of the manager's, shielded from this caller: a
        # caller cancelled midway (restart's bound, keep-alive or a load stopped at shutdown) cut
        # it between the detach and the engine's close, and the engine was never closed, its
        # worker threads never shut down and its lease never released, while the model loaded
        # again beside it. The manager's close waits for it (within the stop's deadline).
        finishing = asyncio.get_running_loop().create_task(
            self._finish_unload(name, slot, runtime, done, drain=drain, evicted=evicted, rescan=rescan)
        )
        del runtime  # the task holds the last reference (its engine's memory is freed there)
        self._unloads.add(finishing)
        finishing.add_done_callback(self._unloads.discard)
        try:
            await asyncio.shield(finishing)
        except asyncio.CancelledError:
            # Nobody awaits it now: how it ends is still told.
            finishing.add_done_callback(lambda task: _log_unload_failure(name, task))
            raise

    async def _finish_unload(
        self,
        name: str,
        slot: ModelSlot,
        runtime: ModelRuntime,
        done: asyncio.Future[None],
        *,
        drain: bool,
        evicted: bool,
        rescan: bool,
    ) -> None:
        """An unload's part after the detach (see ``unload``): drain, worker threads, engine,
        lease; then ``done`` (the slot's ``unloading``) is resolved, whatever happened."""
        unloaded = False
        try:
            await runtime.batcher.close(drain=drain)
            await asyncio.get_running_loop().run_in_executor(None, runtime.executor.shutdown, True)
            await _close_engine(name, runtime.engine)
            self.memory.release(name, evicted=evicted)
            del runtime  # the last reference: the engine's memory is free before the trim
            await asyncio.get_running_loop().run_in_executor(None, trim_heap)
            # Read again when next asked: it may be rebuilt before it loads, and a cache hit
            # (which loads nothing) must not serve the old artefacts' answers as its own.
            self._identities.pop(name, None)
            self.metrics.model_loaded.labels(name).set(0)
            self._memory_metrics()
            log.info("model %s %s", name, "evicted" if evicted else "unloaded")
            unloaded = True
        finally:
            slot.unloading = None
            if self.freeze_heap:
                # Its state was frozen at its load: given back to the collector, or what of it
                # is held in cycles would never be reclaimed (a leak per load and unload). The
                # keep-alive tick freezes what is still alive again (_refreeze).
                thaw()
                self._thawed = True
            if unloaded and rescan:
                # Not resident now: it takes its folder's current model.yaml (or goes with its
                # folder), as the rescans it sat out while resident would have had it; an edit
                # made while it served waited for a second SIGHUP after the unload. Before the
                # waiters wake: one that waited out the drain finds the slot as the folder is
                # now (a model whose folder went is a 404, not loaded again into the old slot).
                self._rescan_after_unload(name)
            done.set_result(None)

    def _rescan_after_unload(self, name: str) -> None:
        try:
            self.rescan()
        except Exception:  # an unreadable repository folder: the unload itself went through
            log.exception("model repository: reading it after unloading %s failed", name)

    async def restart(self, name: str, timeout_s: float = 60.0) -> None:
        """Replace ``name``'s engine: unloaded now, loaded fresh by its next request (the breaker's
        next probe). For an engine whose failures outlast the breaker's probes. Bounded: the
        unload drains the queue and waits for the worker thread, which a hung engine never
        frees (the watchdog's case: its pings stop and systemd restarts the process)."""
        slot = self.slots.get(name)
        if name in self._restarting or slot is None or slot.runtime is None:
            return
        if slot.runtime.batcher.snapshot()["running_batches"] or self._engine_busy(name):
            # The breaker admits only probes while open, so a call still running is one that has
            # not come back: unloading would wait on it, and a fresh engine beside a hung one
            # would double the memory. That is the watchdog's case.
            log.warning("model %s: an engine call is still running; not replacing the engine under it", name)
            return
        self._restarting.add(name)
        try:
            await asyncio.wait_for(self.unload(name), timeout_s)
            self.metrics.engine_restarts.labels(name).inc()  # counted when done, not when asked
            log.warning("model %s: engine replaced; its next request loads a fresh one", name)
        except asyncio.TimeoutError:
            # The unload goes on to its end (unload shields it); until then the model's requests
            # are told to come back, and no fresh engine opens beside the old one.
            log.error("model %s: its engine's unload outlasted %g s; it goes on", name, timeout_s)
        except Exception:  # a background step: log it, never lose it
            log.exception("model %s: replacing its engine failed", name)
        finally:
            self._restarting.discard(name)

    def _engine_busy(self, name: str) -> bool:
        """Whether a call is still running on ``name``'s worker thread. The batcher forgets a
        batch that ran past engine.timeout_ms (its requests were answered 503), but the thread
        stays in the engine; the watchdog's count of engine work still holds it."""
        component = f"engine:{name}"
        return any(s.component == component and s.busy for s in self.progress.snapshot())

    def _memory_metrics(self) -> None:
        m = self.metrics
        m.memory_budget.set(self.memory.budget)
        m.memory_arena.set(self.memory.arena)
        for name in self.slots:
            lease = self.memory.lease(name)
            m.memory_used.labels(name).set(lease.weights if lease else 0)

    async def _expire_idle(self) -> None:
        """Ollama's keep_alive: a model idle for memory.keep_alive_s is unloaded (-1 keeps it). Each
        tick then freezes the heap again after unloads (_refreeze)."""
        while True:
            await asyncio.sleep(1.0)
            await self._expire_tick()

    async def _expire_tick(self) -> None:
        now = time.monotonic()
        unloaded = []
        for name, slot in list(self.slots.items()):
            if slot.runtime is None:
                continue
            # One setting, not the model's whole tunables (a dict of every setting per model per
            # second: a few ms of the loop's each second at 2,000 resident models).
            keep = float(self.cfg.setting_for(name, slot.entry.tunables, "memory.keep_alive_s"))
            if keep < 0 or now - slot.last_used < keep:
                continue
            if self.idle(name):
                log.info("model %s idle for %.0fs: unloading (keep_alive)", name, now - slot.last_used)
                # The repository is read once after the tick's unloads, not after each: 2,000
                # models going idle together held the loop ~100 ms per unload, 2,000 times.
                await self.unload(name, rescan=False)
                unloaded.append(name)
        if unloaded:
            self._rescan_after_unload(", ".join(unloaded))
        self._refreeze()

    def _refreeze(self) -> None:
        """After unloads: one walk of the whole heap (reclaiming what they left), then what is
        alive is frozen again, at most once a second however many models were unloaded."""
        if self._thawed:
            self._thawed = False
            freeze_long_lived()

    async def start(self) -> None:
        self.rescan()
        self._memory_metrics()
        if self.supervisor is not None:
            self.supervisor.task("keep-alive", self._expire_idle)
        else:
            self._keep_alive = asyncio.create_task(self._expire_idle())
        for n in self.default_models():
            if n in self.slots:
                # Started models count as just used, so keep_alive runs from start-up.
                self.slots[n].last_used = time.monotonic()
                with contextlib.suppress(Exception):
                    await self.load(n)
        if self.freeze_heap:  # start-up state lives until exit: out of every later full collection
            freeze_startup_heap()

    async def close(self, *, drain: bool = True) -> None:
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            await asyncio.gather(self._keep_alive, return_exceptions=True)
        # A load still going (a stop during start-up): cancelled, not abandoned to the closing
        # loop; a model that has already reached its slot is unloaded below.
        loading = [s.load_task for s in self.slots.values() if s.load_task and not s.load_task.done()]
        for task in loading:
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)
        # No rescan after each (the server is stopping; ~100 ms each at 2,000 models).
        await asyncio.gather(*(self.unload(n, drain=drain, rescan=False) for n in list(self.slots)))
        # An unload already under way (an operator's, keep-alive's, one whose caller was
        # cancelled) took the runtime from its slot, so unload() above skipped it: the stop went
        # on while it drained, and the loop closed under it (its queued requests cut, its engine
        # never closed). So did an engine call of a load stopped or timed out above, and what it
        # opened. Waited for here, within the caller's bound (the stop's deadline); not gathered,
        # which would cancel them if that bound cut this wait.
        pending = [*self._unloads, *self._stuck_loads.values()]
        if pending:
            await asyncio.wait(pending)

    def ready(self) -> bool:
        """Whether every default model serves: resident, or, once it has been, unloaded by
        keep-alive or eviction and loaded again by its next request. Readiness that followed
        residency flipped to 503 five idle minutes after start (memory.keep_alive_s), and an
        orchestrator that routes by it (the Kubernetes Service) then sent no request that could
        load the model again."""
        if self._unreadable:
            # Nothing else may look at the repository once it is readable again (a cached answer
            # loads nothing): /readyz said "cannot be read" until a SIGHUP. At most once a second.
            self._look_again()
        names = self.default_models()
        if not names and REPOSITORY in self.broken:
            # No model to serve because the repository cannot be read (a typo in its path):
            # "ready" with nothing to serve had systemd and load balancers send it traffic.
            return False
        return all(self.serves(n) for n in names)

    def readiness_errors(self) -> list[str]:
        """Why ``ready()`` may never come: the repository's broken model files, and each default
        model that does not exist, is not built, or failed to load (with its reason)."""
        errors = list(self.scan_errors)
        for name in self.default_models():
            slot = self.slots.get(name)
            if slot is None:
                errors.append(f"server.default_models: no model '{name}' in {self.cfg.model_repository}")
            elif slot.state == ModelState.unbuilt:
                errors.append(f"{name}: not built; run `appliance models pull {name}`")
            elif slot.state == ModelState.failed:
                errors.append(f"{name}: failed to load: {slot.error}")
        return errors

    def serves(self, name: str) -> bool:
        """Whether ``name`` answers its next request: resident, or unloaded (keep-alive, eviction,
        an admin unload) after it has served, so that its next request loads it again. A model
        that has never loaded is not vouched for: its first load may still fail."""
        slot = self.slots.get(name)
        if slot is None:
            return False
        again = (ModelState.available, ModelState.evicted, ModelState.loading)
        return slot.state == ModelState.resident or (name in self._served and slot.state in again)

    # -- live settings ---------------------------------------------------------------------
    def identity(self, name: str) -> str:
        """Cache identity of a model: its name and the digest of its built artefacts. Needs no
        load, so a cache hit never loads (or evicts) anything."""
        ident = self._identities.get(name)
        if ident is None:
            entry = self._slot(name).entry
            try:
                ident = self._identities[name] = f"{name}@{entry.digest()}"
            except OSError:  # artefacts missing or unreadable: nothing cached can be this model's
                return f"{name}@unreadable"
        return ident

    async def identity_within(self, name: str, timeout_s: float) -> str | None:
        """``identity``, its files hashed in a thread rather than on the event loop (a model with
        no build record: 90 MB took 0.1 s, a 500 MB decoder most of a second, stalling every
        request), waited for at most ``timeout_s``: None then, and the request goes without the
        response cache (the hash goes on, for the next one)."""
        ident = self._identities.get(name)
        if ident is not None:
            return ident
        entry = self._slot(name).entry
        if not entry.digest_is_cheap():
            hashing = self._hashing.get(name)
            if hashing is None:
                hashing = asyncio.get_running_loop().run_in_executor(None, _digest_quietly, entry)
                self._hashing[name] = hashing
                hashing.add_done_callback(lambda _: self._hashing.pop(name, None))
            done, _ = await asyncio.wait({hashing}, timeout=timeout_s)
            if not done or not self._slot(name).entry.digest_is_cheap():
                return None  # still hashing, or the model changed meanwhile: the next request
        return self.identity(name)

    def configure_memory(self) -> None:
        """A new budget applies to the next load (resident models are not evicted for it)."""
        values = self.cfg.tunables_for("", {})
        before = (self.memory.host.budget, self.memory.device.budget if self.memory.device else None)
        self.memory.configure(values, _device_total())
        after = (self.memory.host.budget, self.memory.device.budget if self.memory.device else None)
        if after != before:
            # A model refused because it could never fit the old budget may fit this one: its
            # next request loads it. Kept failed, it was refused for up to LOAD_RETRY_S more
            # with the old budget's figure ("the memory budget is 95 MiB" under 1383 MiB).
            for slot in self.slots.values():
                if slot.state is ModelState.failed and slot.failed_no_room:
                    slot.state, slot.error, slot.failed_at = ModelState.available, None, 0.0
                    slot.failed_no_room = False
        self._memory_metrics()
        self.arbiter.configure(
            int(values["compute.concurrency"]),
            float(values["compute.aging_ms"]),
            int(values["compute.urgent_lane"]),
        )

    def settings_problems(self, cfg: Config) -> list[str]:
        """How each model's settings under ``cfg`` (a configuration not adopted yet) fail to
        combine, one line per model as check-config and the admin API say it; [] if they do."""
        problems = []
        for name, slot in self.slots.items():
            try:
                validate_model_settings(cfg.tunables_for(name, slot.entry.tunables))
            except settings.SettingError as exc:
                problems.append(f"model {name}: {exc.detail}")
        return problems

    def apply(self, name: str) -> None:
        """Push the current effective tunables of ``name`` into its running batcher."""
        self._apply(self._slot(name))

    def _apply(self, slot: ModelSlot) -> None:
        name = slot.entry.name
        if slot.runtime is not None:
            policy = batch_policy(self.cfg.tunables_for(name, slot.entry.tunables))
            caps = [
                self.batch_caps.get(name),
                (slot.runtime.measured_batch_size or {}).get("chosen"),
            ]
            cap = min((c for c in caps if c is not None), default=None)  # OOM cap, measured best
            if cap is not None and policy.max_batch_size > cap:
                policy.max_batch_size = cap
                policy.preferred_batch_sizes = [b for b in policy.preferred_batch_sizes if b <= cap]
            slot.runtime.batcher.policy = policy

    def backend(self, name: str) -> str:
        """The backend that runs ``name``: its resident engine's, else the one a load would try
        first (answered without loading it)."""
        slot = self._slot(name)
        return slot.runtime.engine.backend if slot.runtime is not None else expected_backend(slot.entry)

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
            engine = slot.runtime.engine
            d["backend"] = engine.backend_name  # tensorrt, onnxruntime-cuda or onnxruntime-cpu
            d["backend_reason"] = engine.backend_reason  # why a faster one was skipped, or null
            measured = slot.runtime.measured_batch_size
            if measured is not None:
                d["measured_batch_size"] = measured  # chosen at load: inference.best_batch
        lease = self.memory.lease(name)
        if lease is not None:
            d["memory_bytes"] = lease.weights
            d["activation_bytes"] = lease.activation
            d["memory_pool"] = (
                "device" if self.memory.device and name in self.memory.device.leases else "host"
            )
        d["pinned"] = bool(self.tunables(name)["memory.pinned"]) or slot.entry.spec.pinned
        if slot.context_length is not None:
            d["max_model_len"] = slot.context_length  # vLLM's name; known once the model has loaded
        return d


class LoadTimedOut(Exception):
    """A load that outlasted ``engine.load_timeout_s`` (its message is the slot's error)."""


def _discard_late(name: str, holder: list[Engine], run: asyncio.Future[Any]) -> asyncio.Future[None]:
    """A timed-out load's step, ended at last: what it opened is closed, its outcome dropped.
    Returns the close, running on a thread."""
    if not run.cancelled():
        run.exception()  # retrieved: the load was given up whatever it came to

    def close() -> None:
        for engine in holder:
            try:
                engine.close()
            except Exception:
                log.exception("model %s: closing the engine of a load that timed out", name)
        log.warning("model %s: the engine call of a load that timed out ended; its engine is closed", name)

    # On a thread: this runs as a callback on the event loop, and a close that blocked there (the
    # driver that hung the load, hanging again) froze every request with it. Nothing waits for it.
    return asyncio.get_running_loop().run_in_executor(None, close)


async def _close_engine(name: str, engine: Engine) -> None:
    """Close ``engine`` (an unloaded model's, a failed load's) on a thread, waited for at most
    ``CLOSE_WAIT_S``. Called on the event loop, a close that blocked (a hung driver freeing device
    memory) froze every request, /healthz and the watchdog's pings with it; past the bound it is
    logged and left to end in its thread, and the caller goes on (the process's memory may still
    hold it: the watchdog's and an operator's case). An error in the close is the caller's."""
    closing = asyncio.get_running_loop().run_in_executor(None, engine.close)
    done, _ = await asyncio.wait({closing}, timeout=CLOSE_WAIT_S)
    if not done:
        closing.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, whenever
        log.error(
            "model %s: its engine did not close within %g s; going on without it (its memory may "
            "still be held)",
            name,
            CLOSE_WAIT_S,
        )
        return
    closing.result()


def _log_unload_failure(name: str, task: asyncio.Task[None]) -> None:
    """An unload whose caller stopped waiting (cancelled) still reports how it ended."""
    if not task.cancelled() and task.exception() is not None:
        log.error("unloading model %s failed", name, exc_info=task.exception())


def _digest_quietly(entry: ModelEntry) -> None:
    """Hash ``entry``'s artefacts (``ModelEntry.digest`` keeps the result); an unreadable file is
    ``identity``'s to report."""
    with contextlib.suppress(OSError):
        entry.digest()


def _device_total() -> int | None:
    """Total memory of GPU 0 when any model can run on a GPU engine (TensorRT or ONNX Runtime CUDA);
    None means there is no device pool, only host RAM."""
    if not gpu_engines_available():
        return None
    from appliance.gpu import cuda

    try:
        return cuda.mem_info(0)[1]
    except cuda.CudaError:
        return None


def validate_model_settings(values: dict[str, Any]) -> None:
    """Cross-field checks the registry's per-setting bounds cannot express."""
    batch_policy({**settings.defaults(), **values})
