"""GPU telemetry from NVML (``nvidia-ml-py``, imported as ``pynvml``), sampled on a timer.

NVML is read in a background thread every few seconds rather than per request or per scrape: the
calls cost milliseconds and the numbers are device-wide anyway. Without the library, the driver or
permission, the sampler reports ``{"available": False, "reason": ...}``, logs that once at INFO and
never raises. A metric a GPU does not support (Jetson, some SKUs) reads as ``None``.

An NVML call can hang (a wedged driver, a GPU falling off the bus): only the sampling thread ever
waits on one. Readers (``snapshot``, on the event loop for every scrape) take a lock held just to
swap the last sample, and a thread whose last sample is older than ``STALL_INTERVALS`` intervals
counts as not alive, so the supervisor reports it (``appliance_worker_up{worker="gpu-sampler"}`` 0).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

STALL_INTERVALS = 3  # a sample this many intervals overdue means the thread is stuck in NVML
STALL_MIN_S = 1.0  # but never less: a busy host delays a short timer by more than 3 x 10 ms

try:
    import pynvml as _nvml

    _IMPORT_ERROR: str | None = None
except ImportError as _exc:
    _nvml = None
    _IMPORT_ERROR = f"nvidia-ml-py is not installed ({_exc})"


class GpuSampler:
    """Samples every GPU every ``interval_s`` seconds in a daemon thread (``start``/``stop``)."""

    def __init__(self, interval_s: float = 5.0, *, pid: int | None = None) -> None:
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()  # guards _last and _beat only: never held across an NVML call
        self._nvml_lock = threading.Lock()  # one NVML session: init, readings, shutdown
        self._beat = time.monotonic()  # when the sampling thread last finished a sample
        self.error: BaseException | None = None  # what ended the sampling thread, for the supervisor
        self._handles: list[Any] | None = None
        self._reason: str | None = None
        self._static: list[dict[str, Any]] = []
        self._driver: str | None = None
        self._last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def _init(self) -> bool:
        """Initialise NVML once; a failure is remembered (and logged once) instead of retried."""
        if self._handles is not None:
            return True
        if self._reason is not None:
            return False
        initialised = False
        try:
            if _nvml is None:
                raise RuntimeError(_IMPORT_ERROR)
            _nvml.nvmlInit()
            initialised = True
            handles = [_nvml.nvmlDeviceGetHandleByIndex(i) for i in range(_nvml.nvmlDeviceGetCount())]
            self._driver = _text(_safe(_nvml.nvmlSystemGetDriverVersion))
            self._static = [
                {"index": i, "name": _text(_safe(_nvml.nvmlDeviceGetName, h))} for i, h in enumerate(handles)
            ]
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / NoPermission, ...
            if initialised:
                _safe(_nvml.nvmlShutdown)
            self._reason = f"{type(exc).__name__}: {exc}"
            log.info("GPU telemetry unavailable: %s", self._reason)
            return False
        self._handles = handles
        log.info("GPU telemetry: %d GPU(s), driver %s", len(handles), self._driver)
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self.sample()
        if self._handles is None:
            return  # nothing to sample, so no thread either
        self._stop.clear()
        self._start_thread()

    def _start_thread(self) -> None:
        self.error = None
        with self._lock:
            self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=max(1.0, self.interval_s))
            if thread.is_alive():
                # Stuck in an NVML call: a shutdown would wait behind it. The process is ending.
                log.warning("GPU sampler is stuck in an NVML call; leaving NVML as it is")
                return
        with self._nvml_lock:
            if self._handles is not None and _nvml is not None:
                _safe(_nvml.nvmlShutdown)  # nvmlInit is refcounted: pair it
                self._handles = None

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.sample()
        except Exception as exc:
            # Kept for the supervisor, which logs it with its stack and restarts the thread.
            self.error = exc

    def stalled(self) -> bool:
        """True while the sampling thread runs but has not finished a sample for
        ``STALL_INTERVALS`` intervals (stuck in an NVML call)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._stop.is_set():
            return False
        with self._lock:
            age = time.monotonic() - self._beat
        return age > max(STALL_INTERVALS * self.interval_s, STALL_MIN_S)

    def alive(self) -> bool:
        """False when the sampling thread died (the supervisor restarts it) or is stalled."""
        thread = self._thread
        if thread is None or self._stop.is_set():
            return True
        return thread.is_alive() and not self.stalled()

    def restart(self) -> bool:
        """Replaces a dead thread; False when there is none to replace. A stalled one cannot be
        interrupted, and a second thread would wait behind it for the same NVML session."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            self._start_thread()
            return True
        return False

    # -- readings --

    @property
    def available(self) -> bool:
        with self._nvml_lock:
            return self._init()

    def sample(self) -> dict[str, Any]:
        """Read every GPU now (blocking on NVML), store the result for ``snapshot`` and return it."""
        with self._nvml_lock:
            if not self._init():
                snap: dict[str, Any] = {"available": False, "reason": self._reason}
            else:
                assert self._handles is not None
                gpus = [self._read(h, dict(s)) for h, s in zip(self._handles, self._static, strict=True)]
                snap = {"available": True, "driver_version": self._driver, "time": time.time(), "gpus": gpus}
        with self._lock:
            self._last = snap
            self._beat = time.monotonic()
        return snap

    def snapshot(self) -> dict[str, Any]:
        """The latest sample; never calls NVML (it runs on the event loop) and never raises.

        While the thread is stalled or dead the readings are withheld (``stale``, why, and the
        last sample's age instead): numbers minutes old must not pass for the GPU's state now."""
        with self._lock:
            last, age = self._last, time.monotonic() - self._beat
        if last is None:
            return {"available": False, "reason": "not sampled yet (the sampler was not started)"}
        if not self.alive():
            why = "stuck in an NVML call" if self.stalled() else "died"
            return {
                "available": last["available"],
                "driver_version": last.get("driver_version"),
                "stale": True,
                "reason": f"the sampling thread {why}",
                "sample_age_s": round(age, 1),
                "gpus": [],
            }
        return last

    def _read(self, h: Any, gpu: dict[str, Any]) -> dict[str, Any]:
        assert _nvml is not None
        n = _nvml
        util = _safe(n.nvmlDeviceGetUtilizationRates, h)
        mem = _safe(n.nvmlDeviceGetMemoryInfo, h)
        power_mw = _safe(n.nvmlDeviceGetPowerUsage, h)
        gpu.update(
            utilization_ratio=None if util is None else util.gpu / 100.0,
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_celsius=_temperature(h),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            process_memory_bytes=self._process_memory(h),
        )
        return gpu

    def _process_memory(self, h: Any) -> int | None:
        assert _nvml is not None
        procs = _safe(_nvml.nvmlDeviceGetComputeRunningProcesses, h)
        if procs is None:
            return None
        # PIDs are host PIDs: inside a PID namespace nothing matches and this reads 0.
        mine = [p.usedGpuMemory for p in procs if p.pid == self.pid]
        if any(m is None for m in mine):
            return None  # NVML_VALUE_NOT_AVAILABLE (e.g. without permission on Windows/WDDM)
        return int(sum(mine))


def _temperature(h: Any) -> float | None:
    assert _nvml is not None
    # nvmlDeviceGetTemperature is deprecated (removed in CUDA 14); older bindings lack the V form.
    if hasattr(_nvml, "nvmlDeviceGetTemperatureV"):
        t = _safe(_nvml.nvmlDeviceGetTemperatureV, h, _nvml.NVML_TEMPERATURE_GPU)
        if t is not None:
            return float(t)
    t = _safe(_nvml.nvmlDeviceGetTemperature, h, _nvml.NVML_TEMPERATURE_GPU)
    return None if t is None else float(t)


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported / FunctionNotFound / GpuIsLost: the field reads None
        return None


def _text(v: Any) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


# --- Prometheus ----------------------------------------------------------------------------------

_GAUGES = (
    # (metric name, snapshot field, help)
    (
        "appliance_gpu_utilization_ratio",
        "utilization_ratio",
        "GPU busy time over the last NVML sample (0-1).",
    ),
    ("appliance_gpu_memory_used_bytes", "memory_used_bytes", "Device memory in use, all processes."),
    ("appliance_gpu_memory_total_bytes", "memory_total_bytes", "Device memory in total."),
    ("appliance_gpu_temperature_celsius", "temperature_celsius", "GPU core temperature."),
    ("appliance_gpu_power_watts", "power_watts", "Board power draw."),
    ("appliance_gpu_process_memory_bytes", "process_memory_bytes", "Device memory used by this process."),
)


class GpuCollector:
    """Prometheus collector reading the sampler's latest snapshot (a scrape never calls NVML)."""

    def __init__(self, sampler: GpuSampler) -> None:
        self.sampler = sampler

    def describe(self) -> Iterator[Any]:
        # Lets the registry check names without taking a sample.
        return self._families(None)

    def collect(self) -> Iterator[Any]:
        return self._families(self.sampler.snapshot())

    def _families(self, snap: dict[str, Any] | None) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily  # not needed by gpu-check machines

        gpus = snap.get("gpus", []) if snap and snap.get("available") else []
        for name, key, doc in _GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=["gpu"])
            for g in gpus:
                if g.get(key) is not None:
                    fam.add_metric([str(g["index"])], float(g[key]))
            yield fam


def register_gpu_metrics(registry: Any, sampler: GpuSampler) -> GpuCollector:
    """Export the sampler's readings as ``appliance_gpu_*`` gauges (label ``gpu``) on ``registry``.

    With no GPU the gauges exist but carry no samples, so dashboards see "no data" rather than 0.
    """
    collector = GpuCollector(sampler)
    registry.register(collector)
    return collector
