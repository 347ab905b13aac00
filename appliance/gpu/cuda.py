"""A small CUDA layer on the runtime API of cuda-python (``cuda.bindings.runtime``).

The runtime API works on each device's *primary* context, the one TensorRT uses too, so buffers made
here are valid on any thread without context push/pop; only the current device is per thread
(``set_device``). Without cuda-python or a driver, ``probe()`` reports an error instead of raising,
and nothing else here is called: allocation helpers raise ``CudaError`` if used anyway.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

try:  # cuda-bindings >= 12.6 (what `cuda-python` installs today)
    from cuda.bindings import runtime as _rt

    _IMPORT_ERROR: str | None = None
except ImportError as _exc:
    try:  # cuda-python < 12.6 shipped the same API as `cuda.cudart`
        from cuda import cudart as _rt

        _IMPORT_ERROR = None
    except ImportError:
        _rt = None
        _IMPORT_ERROR = f"cuda-python is not installed ({_exc})"

# cudaErrorMemoryAllocation: mapped to EngineOutOfMemory by the engines.
OUT_OF_MEMORY = 2


class CudaError(RuntimeError):
    """A CUDA runtime call failed; ``name`` is the cudaError_t name (e.g. cudaErrorMemoryAllocation)."""

    def __init__(self, code: int, name: str, what: str = "") -> None:
        self.code, self.name = code, name
        super().__init__(f"{what + ': ' if what else ''}{name} ({code})")

    @property
    def out_of_memory(self) -> bool:
        return self.code == OUT_OF_MEMORY


def available() -> bool:
    """cuda-python imported (says nothing about a driver or a device: see ``probe``)."""
    return _rt is not None


def _runtime() -> Any:
    if _rt is None:
        raise CudaError(-1, "cudaErrorPythonBindingsMissing", _IMPORT_ERROR or "")
    return _rt


def _error_name(err: Any) -> str:
    try:
        _, name = _runtime().cudaGetErrorName(err)
        return bytes(name).decode()
    except Exception:  # unknown code or no bindings: the enum's own name is the next best thing
        return str(getattr(err, "name", err))


def check(result: Any, what: str = "") -> Any:
    """Raise ``CudaError`` unless a call succeeded; return its values.

    Accepts a bare ``cudaError_t`` or the ``(err, *values)`` tuple every cuda-python call returns,
    and unwraps a single value so ``ptr = check(cudaMalloc(n))`` reads naturally.
    """
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        raise CudaError(int(err), _error_name(err), what)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# --- probe --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    multiprocessors: int


@dataclass(frozen=True)
class GpuProbe:
    """What the CUDA runtime sees. ``error`` is set (and ``count`` is 0) when there is no usable GPU."""

    count: int = 0
    devices: tuple[DeviceInfo, ...] = ()
    driver_version: int | None = None  # CUDA encoding: 13040 = 13.4; 0 means no driver
    runtime_version: int | None = None
    error: str | None = None
    error_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.count > 0 and self.error is None

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    @property
    def compute_capabilities(self) -> list[tuple[int, int]]:
        return [d.compute_capability for d in self.devices]

    def describe(self) -> str:
        if not self.ok:
            return f"no CUDA device: {self.error}"
        gpus = ", ".join(
            f"[{d.index}] {d.name} (cc {d.compute_capability[0]}.{d.compute_capability[1]}, "
            f"{d.total_memory / 2**30:.1f} GiB)"
            for d in self.devices
        )
        return (
            f"{self.count} device(s): {gpus}; driver CUDA {version_text(self.driver_version)}, "
            f"runtime {version_text(self.runtime_version)}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def version_text(v: int | None) -> str:
    return "none" if not v else f"{v // 1000}.{(v % 1000) // 10}"


_probe_lock = threading.Lock()
_probe_cache: GpuProbe | None = None


def probe(refresh: bool = False) -> GpuProbe:
    """Count and describe the GPUs. Never raises: failures come back in ``error``/``error_code``.

    ``cudaGetDeviceCount`` returns cudaErrorInsufficientDriver/NoDevice without a driver rather than
    crashing, unlike the driver API's ``cuInit`` (which raises when libcuda is missing) and unlike
    TensorRT (which segfaults later), so this is the gate every GPU code path must pass first.
    The result is cached: the device set of a process does not change.
    """
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None or refresh:
            _probe_cache = _probe()
        return _probe_cache


def _probe() -> GpuProbe:
    if _rt is None:
        return GpuProbe(error=_IMPORT_ERROR)
    try:
        driver = _version(_rt.cudaDriverGetVersion())
        runtime = _version(_rt.cudaRuntimeGetVersion())
        err, count = _rt.cudaGetDeviceCount()
        if int(err) != 0:
            return GpuProbe(
                driver_version=driver,
                runtime_version=runtime,
                error=_error_name(err),
                error_code=int(err),
            )
        devices = []
        for i in range(count or 0):
            prop = check(_rt.cudaGetDeviceProperties(i), f"cudaGetDeviceProperties({i})")
            raw = prop.name
            name = (bytes(raw).split(b"\0", 1)[0].decode(errors="replace") if raw else "").strip()
            cc = (int(prop.major), int(prop.minor))
            devices.append(DeviceInfo(i, name, cc, int(prop.totalGlobalMem), int(prop.multiProcessorCount)))
        if not devices:
            return GpuProbe(driver_version=driver, runtime_version=runtime, error="cudaErrorNoDevice")
        return GpuProbe(len(devices), tuple(devices), driver, runtime)
    except CudaError as exc:
        return GpuProbe(error=exc.name, error_code=exc.code)
    except Exception as exc:  # a broken install must still read as "no GPU", not crash the caller
        return GpuProbe(error=f"{type(exc).__name__}: {exc}")


def _version(result: Any) -> int | None:
    err, value = result
    return int(value) if int(err) == 0 and value is not None else None


# --- device selection and memory info ------------------------------------------------------------


def set_device(device: int) -> None:
    """Make ``device`` current on the calling thread (CUDA keeps the current device per thread)."""
    check(_runtime().cudaSetDevice(device), f"cudaSetDevice({device})")


def mem_info(device: int = 0) -> tuple[int, int]:
    """``(free, total)`` bytes on ``device``, restoring the thread's previous current device."""
    rt = _runtime()
    previous = check(rt.cudaGetDevice(), "cudaGetDevice")
    if previous != device:
        set_device(device)
    try:
        free, total = check(rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)
    finally:
        if previous != device:
            set_device(previous)


def synchronize() -> None:
    check(_runtime().cudaDeviceSynchronize(), "cudaDeviceSynchronize")


# --- buffers, streams, events --------------------------------------------------------------------


class _Resource:
    """Freed exactly once: by ``close()``/the ``with`` block, or failing that by the collector."""

    _closed = True  # until the subclass has really allocated

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Primary-context memory may be freed from any thread; at interpreter exit the bindings may be
        # gone already, and the driver reclaims everything then anyway.
        try:  # noqa: SIM105 - contextlib may already be torn down at interpreter exit
            self.close()
        except Exception:
            pass


class DeviceBuffer(_Resource):
    """``nbytes`` of device memory (cudaMalloc: aligned to at least 256 bytes, as TensorRT requires)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self.nbytes = nbytes
        # cudaMalloc(0) succeeds with a null pointer anyway; skipping it keeps a 0-byte arena cheap.
        self.ptr: int = int(check(_runtime().cudaMalloc(nbytes), f"cudaMalloc({nbytes})")) if nbytes else 0
        self._closed = False

    def _release(self) -> None:
        if self.ptr:
            check(_runtime().cudaFree(self.ptr), "cudaFree")
        self.ptr = 0

    def __int__(self) -> int:
        return self.ptr

    def __repr__(self) -> str:
        return f"DeviceBuffer({self.nbytes} bytes at {self.ptr:#x})"


class PinnedBuffer(_Resource):
    """``nbytes`` of page-locked host memory, the only kind async copies really overlap with.

    ``array`` (uint8) and ``view(dtype, shape)`` alias the buffer without copying; they must not be used
    after ``close()``.
    """

    def __init__(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self.nbytes = nbytes
        rt = _runtime()
        self.ptr: int = (
            int(check(rt.cudaHostAlloc(nbytes, rt.cudaHostAllocDefault), f"cudaHostAlloc({nbytes})"))
            if nbytes
            else 0
        )
        self._closed = False
        if nbytes:
            self.array: np.ndarray = np.ctypeslib.as_array(
                ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_ubyte)), (nbytes,)
            )
        else:
            self.array = np.empty(0, np.uint8)

    def view(self, dtype: np.dtype | type, shape: Sequence[int]) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if n > self.nbytes:
            raise ValueError(f"view of {n} bytes exceeds the {self.nbytes}-byte pinned buffer")
        return self.array[:n].view(dt).reshape(tuple(shape))

    def _release(self) -> None:
        if self.ptr:
            check(_runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
        self.ptr = 0
        self.array = np.empty(0, np.uint8)


class Stream(_Resource):
    """A non-blocking stream: the legacy default stream would make TensorRT add device-wide syncs."""

    def __init__(self) -> None:
        rt = _runtime()
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._closed = False

    @property
    def handle(self) -> int:
        """The ``cudaStream_t`` as an int, the form ``execute_async_v3`` takes."""
        return int(self._stream)

    def synchronize(self) -> None:
        check(_runtime().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def _release(self) -> None:
        check(_runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")


class Event(_Resource):
    def __init__(self, timing: bool = False) -> None:
        rt = _runtime()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self._event = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreate")
        self._closed = False

    @property
    def handle(self) -> int:
        return int(self._event)

    def record(self, stream: Stream) -> None:
        check(_runtime().cudaEventRecord(self._event, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(_runtime().cudaEventSynchronize(self._event), "cudaEventSynchronize")

    def query(self) -> bool:
        """True once all work before ``record`` has finished (cudaErrorNotReady means not yet)."""
        err = _runtime().cudaEventQuery(self._event)[0]
        if int(err) == 600:  # cudaErrorNotReady
            return False
        check(err, "cudaEventQuery")
        return True

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to ``end`` (both created with ``timing=True``)."""
        return float(check(_runtime().cudaEventElapsedTime(self._event, end._event), "cudaEventElapsedTime"))

    def _release(self) -> None:
        check(_runtime().cudaEventDestroy(self._event), "cudaEventDestroy")


def _host_ptr(arr: np.ndarray) -> int:
    if not arr.flags.c_contiguous:
        raise ValueError("host array must be C-contiguous")
    return int(arr.ctypes.data)


def memcpy_htod_async(dst: DeviceBuffer | int, src: np.ndarray, stream: Stream) -> None:
    """Copy ``src`` (pinned for a truly async copy) to device memory ``dst`` on ``stream``."""
    if src.nbytes:
        rt = _runtime()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(int(dst), _host_ptr(src), src.nbytes, kind, stream.handle), "memcpy htod")


def memcpy_dtoh_async(dst: np.ndarray, src: DeviceBuffer | int, stream: Stream) -> None:
    """Copy ``dst.nbytes`` from device memory ``src`` into ``dst``; valid after ``stream.synchronize()``."""
    if dst.nbytes:
        rt = _runtime()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(_host_ptr(dst), int(src), dst.nbytes, kind, stream.handle), "memcpy dtoh")


def memcpy_dtod_async(dst: DeviceBuffer | int, src: DeviceBuffer | int, nbytes: int, stream: Stream) -> None:
    """Copy ``nbytes`` between device addresses on ``stream`` (the data never leaves the device)."""
    if nbytes:
        rt = _runtime()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(rt.cudaMemcpyAsync(int(dst), int(src), nbytes, kind, stream.handle), "memcpy dtod")


def memcpy2d_async(
    dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: str, stream: Stream
) -> None:
    """``height`` rows of ``width`` bytes from ``src`` (rows ``spitch`` apart) to ``dst`` (rows
    ``dpitch`` apart): one strided copy cuts a column range out of every [batch, head] row of a KV
    tensor. ``kind``: "dtod" or "dtoh" (the host side pinned, for a truly async copy)."""
    if width and height:
        rt = _runtime()
        kinds = {
            "dtod": rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            "dtoh": rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        }
        check(
            rt.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, kinds[kind], stream.handle),
            "memcpy2d " + kind,
        )


def memset_async(dst: DeviceBuffer | int, value: int, nbytes: int, stream: Stream) -> None:
    """Fill ``nbytes`` of device memory with the byte ``value`` on ``stream`` (a device kernel: the
    GPU check uses it as load that NVML's utilisation sees)."""
    if nbytes:
        check(_runtime().cudaMemsetAsync(int(dst), value, nbytes, stream.handle), "memset")


@dataclass
class ThreadStreams:
    """One stream per thread, created on first use (an engine's context runs on one thread at a time,
    but the scheduler may move it between worker threads over its life)."""

    device: int = 0
    _local: threading.local = field(default_factory=threading.local)
    _all: list[Stream] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self) -> Stream:
        stream: Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            set_device(self.device)  # the current device is per thread; set it before the first call
            stream = Stream()
            self._local.stream = stream
            with self._lock:
                self._all.append(stream)
        return stream

    def close(self) -> None:
        with self._lock:
            streams, self._all = self._all, []
        for s in streams:
            s.close()
        self._local = threading.local()
