"""A fake ``tensorrt`` module and device memory for wiring tests of ``appliance.engines.tensorrt``.

TensorRT cannot be installed on the CPU machines this project is built on (its libraries come only
from NVIDIA's index) and its objects segfault without a GPU, so the engine's calls into TensorRT
are checked against this stand-in. It is strict where NVIDIA documents a rule, and raises
``ContractViolation`` where real TensorRT would misbehave silently (undefined behaviour, garbage
output) or fail an enqueue. The rules, with where NVIDIA states them (TensorRT 10.x and 11.x
``NvInferRuntime.h``, ``IExecutionContext``; the Python docstrings say the same):

- ``setDeviceMemoryV2`` / Python ``set_device_memory``: a USER_MANAGED context needs its device
  memory before ``enqueueV3``; the block must be CUDA-aligned and "large enough for performing
  inference with the given network inputs"; ``getDeviceMemorySizeV2`` /
  ``getDeviceMemorySizeForProfileV2`` "report upper bounds"; the memory "is in use from the
  invocation of enqueueV3() until network execution is complete", and using it in another
  context running in parallel is undefined behaviour.
- ``setOptimizationProfileAsync``: changing the profile "will invalidate all dynamic bindings for
  the current execution context, so that they have to be set again using setInputShape".
- ``setInputShape``: returns False (and TensorRT logs an error) for a shape outside the active
  profile's min..max or of the wrong rank.
- ``setTensorAddress``: every I/O tensor needs an address before ``enqueueV3``; "the pointer must
  have at least 256-byte alignment"; it must point at a device buffer of sufficient size.
- ``getTensorShape`` reports -1 for an output until every input shape is set.

Profile switches do not invalidate the device memory: nothing in those documents says so, and
NVIDIA's TensorRT-Edge-LLM runner sets one ``getDeviceMemorySizeV2`` block on its prefill and
decode contexts once and then switches their profiles. The fake therefore accepts memory set once
at the max-over-profiles size, and rejects a block too small for the active profile.

Compute: ``pooled = bias + sum(input_ids, axis=1)``, ``count = sequence length`` (int32).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from appliance.gpu import cuda
from appliance.gpu.cuda import CudaError

ALIGN = 256


class ContractViolation(AssertionError):
    """The engine broke a rule NVIDIA documents for TensorRT's runtime API."""


# --- device memory -------------------------------------------------------------------------------


class FakeDevice(cuda.DeviceBuffer):
    """Device memory stood in for by host memory with real, 256-byte aligned addresses (as
    cudaMalloc's), so copies work and the fake context can check what an address points at."""

    fail_over: int | None = None
    live: ClassVar[dict[int, int]] = {}  # ptr -> nbytes of every allocation not yet freed

    def __init__(self, nbytes: int) -> None:
        if FakeDevice.fail_over is not None and nbytes > FakeDevice.fail_over:
            raise CudaError(2, "cudaErrorMemoryAllocation", f"cudaMalloc({nbytes})")
        self.nbytes = nbytes
        self._mem = np.zeros(max(nbytes, 1) + ALIGN, np.uint8)
        base = int(self._mem.ctypes.data)
        self.ptr = (base + ALIGN - 1) // ALIGN * ALIGN if nbytes else 0
        if self.ptr:
            FakeDevice.live[self.ptr] = nbytes
        self._closed = False

    def _release(self) -> None:
        FakeDevice.live.pop(self.ptr, None)
        self.ptr = 0


def room_at(ptr: int) -> int | None:
    """Bytes from ``ptr`` to the end of the live allocation holding it; None if none does."""
    for base, n in FakeDevice.live.items():
        if base <= ptr < base + n:
            return base + n - ptr
    return None


def device_range(ptr: int, nbytes: int, what: str) -> None:
    """``nbytes`` from ``ptr`` must lie inside one live device allocation."""
    if nbytes and (room_at(ptr) or 0) < nbytes:
        raise ContractViolation(f"{what}: {nbytes} bytes at {ptr:#x} are not inside live device memory")


class FakePinned(cuda.PinnedBuffer):
    def __init__(self, nbytes: int) -> None:
        self.nbytes, self._mem = nbytes, np.zeros(max(nbytes, 1), np.uint8)
        self.array = self._mem[:nbytes]
        self.ptr = int(self._mem.ctypes.data)
        self._closed = False

    def _release(self) -> None:
        self.array = np.empty(0, np.uint8)


class FakeStream:
    """A non-default stream (TensorRT adds device syncs on stream 0). ``synchronize`` ends every
    execution enqueued on it, which frees the scratch memory those executions held."""

    _next: ClassVar[int] = 0x1000

    def __init__(self) -> None:
        FakeStream._next += 1
        self.handle = FakeStream._next

    pending: ClassVar[dict[int, list[Callable[[], None]]]] = {}  # queued copies per stream

    def synchronize(self) -> None:
        flush(self.handle)
        for ptr, stream in list(FakeContext.in_flight.items()):
            if stream == self.handle:
                del FakeContext.in_flight[ptr]

    def close(self) -> None: ...


def _memory(ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(memoryview((ctypes.c_char * n).from_address(ptr)), dtype=dtype).reshape(shape)


# --- engine and context --------------------------------------------------------------------------


class FakeContext:
    in_flight: ClassVar[dict[int, int]] = {}  # scratch ptr -> stream of the execution using it

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile = 0
        self.memory: tuple[int, int] | None = None
        self.calls: list[str] = []  # the order of calls, for tests that read it
        self.rejected: list[str] = []

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.calls.append(f"profile {index}")
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        if index != self.profile:
            self.shapes.clear()  # documented: a profile change invalidates the dynamic bindings
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.calls.append(f"shape {name}")
        if name not in self.engine.inputs:
            return False
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            self.rejected.append(name)
            self.shapes.pop(name, None)
            return False  # TensorRT logs an error and keeps the previous shape unusable
        self.shapes[name] = shape
        return True

    def infer_shapes(self) -> list[str]:
        return [n for n in self.engine.inputs if n not in self.shapes]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        if self.infer_shapes():
            return tuple(-1 for _ in self.engine.get_tensor_shape(name))
        return self.engine.output_shape(name, self.shapes)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.calls.append(f"address {name}")
        if name not in self.engine.desc:
            return False
        if ptr % ALIGN:
            raise ContractViolation(f"address of {name!r} is not 256-byte aligned: {ptr:#x}")
        self.addresses[name] = ptr
        return True

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        self.calls.append("memory")
        if ptr % ALIGN:
            raise ContractViolation(f"device memory {ptr:#x} is not aligned")
        if ptr in FakeContext.in_flight:
            raise ContractViolation("device memory replaced while an execution still uses it")
        self.memory = (ptr, nbytes)

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append("execute")
        if stream == 0:
            raise ContractViolation("enqueued on the default stream")
        if self.memory is None:
            raise ContractViolation("USER_MANAGED context enqueued before set_device_memory")
        ptr, nbytes = self.memory
        need = self.engine.get_device_memory_size_for_profile_v2(self.profile)
        if nbytes < need or (room_at(ptr) or 0) < need:
            raise ContractViolation(f"scratch of {nbytes} bytes < {need} needed by profile {self.profile}")
        if ptr in FakeContext.in_flight:
            raise ContractViolation("scratch memory shared with an execution that has not completed")
        missing = self.infer_shapes()
        if missing:
            raise ContractViolation(f"enqueued without input shapes for {missing} (profile {self.profile})")
        for name, (dtype, _, _) in self.engine.desc.items():
            addr = self.addresses.get(name)
            if not addr:
                raise ContractViolation(f"enqueued with no address for {name!r}")
            need_bytes = int(np.prod(self.get_tensor_shape(name))) * np.dtype(dtype).itemsize
            room = room_at(addr)
            if room is None or room < need_bytes:
                raise ContractViolation(
                    f"buffer for {name!r} holds {room} bytes, the tensor needs {need_bytes}"
                )
        flush(stream)  # stream order: what was queued before this execution has run
        FakeContext.in_flight[ptr] = stream
        self.engine.compute(self)
        return True

    def tensor(self, name: str) -> np.ndarray:
        """The bound memory of ``name`` as an array of its current shape (what a kernel sees)."""
        return _memory(self.addresses[name], np.dtype(self.engine.desc[name][0]), self.get_tensor_shape(name))


class FakeEngine:
    IO: ClassVar[tuple[tuple[str, Any, tuple[int, ...], bool], ...]] = (
        ("input_ids", np.int64, (-1, -1), True),
        ("bias", np.float32, (-1, 8), True),
        ("pooled", np.float32, (-1, 8), False),
        ("count", np.int32, (-1,), False),
    )
    PROFILES: ClassVar[tuple[dict[str, list[tuple[int, ...]]], ...]] = (
        {"input_ids": [(1, 1), (8, 8), (8, 16)], "bias": [(1, 8), (8, 8), (8, 8)]},
        {"input_ids": [(1, 1), (32, 64), (32, 128)], "bias": [(1, 8), (32, 8), (32, 8)]},
    )
    PROFILE_MEMORY = (2048, 4096)  # scratch per profile: the larger profile needs more
    num_io_tensors = len(IO)
    num_optimization_profiles = len(PROFILES)

    def __init__(self, api: int) -> None:
        self.api = api
        self.desc = {name: (dt, shape, is_in) for name, dt, shape, is_in in self.IO}
        self.inputs = [name for name, _, _, is_in in self.IO if is_in]
        self.contexts: list[FakeContext] = []

    @property
    def device_memory_size_v2(self) -> int:
        return max(self.PROFILE_MEMORY)

    def get_device_memory_size_for_profile_v2(self, p: int) -> int:
        return self.PROFILE_MEMORY[p]

    def __getattr__(self, name: str) -> Any:
        # The 10.x names that 11.x removed (TensorRT 10.x-to-11.x migration guide).
        if name == "device_memory_size" and self.api == 10:
            return self.device_memory_size_v2
        raise AttributeError(name)

    def get_tensor_name(self, i: int) -> str:
        return self.IO[i][0]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if self.desc[name][2] else "OUTPUT"

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"

    def get_tensor_dtype(self, name: str) -> Any:
        return self.desc[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.desc[name][1]

    def get_tensor_profile_shape(self, name: str, p: int) -> list[tuple[int, ...]]:
        return self.PROFILES[p][name]

    def output_shape(self, name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        batch = shapes["input_ids"][0]
        return {"pooled": (batch, 8), "count": (batch,)}[name]

    def compute(self, ctx: FakeContext) -> None:
        ids, bias = ctx.tensor("input_ids"), ctx.tensor("bias")
        ctx.tensor("pooled")[:] = bias + ids.sum(1)[:, None]
        ctx.tensor("count")[:] = ids.shape[1]

    def create_execution_context(self, strategy: str = "STATIC") -> FakeContext:
        if strategy != "USER_MANAGED":
            raise ContractViolation(f"the appliance supplies scratch memory; strategy {strategy}")
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


def fake_tensorrt_module(version: str = "11.4.0.106") -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec finds it
    m.__version__ = version  # type: ignore[attr-defined]
    api = 10 if version.startswith("10.") else 11

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None: ...

    class Runtime:
        def __init__(self, logger: Any) -> None:
            if not isinstance(logger, ILogger):
                raise ContractViolation("trt.Runtime needs an ILogger")

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            if data.startswith(DECODER_PLAN):
                return FakeDecoderEngine(api, json.loads(data[len(DECODER_PLAN) :]))
            return FakeEngine(api) if data == b"fake-plan" else None  # None, not an exception

    m.ILogger, m.Runtime = ILogger, Runtime  # type: ignore[attr-defined]
    m.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    m.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")  # type: ignore[attr-defined]
    m.ExecutionContextAllocationStrategy = types.SimpleNamespace(  # type: ignore[attr-defined]
        STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED"
    )
    m.nptype = lambda dt: dt  # type: ignore[attr-defined]
    return m


# --- CUDA copies on fake streams -----------------------------------------------------------------
# Asynchronous as CUDA's: a copy is queued on its stream and runs at the stream's next
# synchronize (or before an execution enqueued after it), reading its source only then. So a
# source freed or a staging buffer rewritten before the stream is synchronised shows as a
# ContractViolation or as wrong numbers, as it would on a GPU.


def flush(handle: int) -> None:
    for op in FakeStream.pending.pop(handle, []):
        op()


def _enqueue(stream: Any, op: Callable[[], None]) -> None:
    if stream.handle == 0:
        raise ContractViolation("copy on the default stream (it serialises with every other stream)")
    FakeStream.pending.setdefault(stream.handle, []).append(op)


def _move(dst: int, src: int, n: int) -> None:
    ctypes.memmove(dst, src, n)


def fake_memcpy_htod_async(dst: Any, src: np.ndarray, stream: Any) -> None:
    ptr, n = int(dst), src.nbytes
    device_range(ptr, n, "memcpy htod")

    def op() -> None:
        device_range(ptr, n, "memcpy htod (at execution)")
        _move(ptr, src.ctypes.data, n)

    _enqueue(stream, op)


def fake_memcpy_dtoh_async(dst: np.ndarray, src: Any, stream: Any) -> None:
    ptr, n = int(src), dst.nbytes
    device_range(ptr, n, "memcpy dtoh")

    def op() -> None:
        device_range(ptr, n, "memcpy dtoh (at execution)")
        _move(dst.ctypes.data, ptr, n)

    _enqueue(stream, op)


def fake_memcpy_dtod_async(dst: Any, src: Any, nbytes: int, stream: Any) -> None:
    d, s = int(dst), int(src)
    device_range(d, nbytes, "memcpy dtod destination")
    device_range(s, nbytes, "memcpy dtod source")

    def op() -> None:
        device_range(s, nbytes, "memcpy dtod source (at execution)")
        device_range(d, nbytes, "memcpy dtod destination (at execution)")
        _move(d, s, nbytes)

    _enqueue(stream, op)


def fake_memcpy2d_async(
    dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, kind: str, stream: Any
) -> None:
    """cudaMemcpy2DAsync: pitches at least the width (else cudaErrorInvalidPitchValue), and each
    device side spans (height - 1) * pitch + width bytes of one allocation."""
    if not (width and height):
        return
    if dpitch < width or spitch < width:
        raise ContractViolation(f"memcpy2d pitch {dpitch}/{spitch} < width {width}")
    span_s, span_d = (height - 1) * spitch + width, (height - 1) * dpitch + width
    device_range(src, span_s, "memcpy2d source")
    if kind == "dtod":
        device_range(dst, span_d, "memcpy2d destination")
    elif kind != "dtoh":
        raise ContractViolation(f"memcpy2d kind {kind!r}")

    def op() -> None:
        device_range(src, span_s, "memcpy2d source (at execution)")
        for r in range(height):
            _move(dst + r * dpitch, src + r * spitch, width)

    _enqueue(stream, op)


def fake_memset_async(dst: Any, value: int, nbytes: int, stream: Any) -> None:
    ptr = int(dst)
    device_range(ptr, nbytes, "memset")

    def op() -> None:
        device_range(ptr, nbytes, "memset (at execution)")
        ctypes.memset(ptr, value, nbytes)

    _enqueue(stream, op)


def install_fake_cuda(monkeypatch: Any) -> None:
    """Point ``appliance.gpu.cuda``'s allocations, streams and copies at the fakes above."""
    monkeypatch.setattr(cuda, "DeviceBuffer", FakeDevice)
    monkeypatch.setattr(cuda, "PinnedBuffer", FakePinned)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "memcpy_htod_async", fake_memcpy_htod_async)
    monkeypatch.setattr(cuda, "memcpy_dtoh_async", fake_memcpy_dtoh_async)
    monkeypatch.setattr(cuda, "memcpy_dtod_async", fake_memcpy_dtod_async)
    monkeypatch.setattr(cuda, "memcpy2d_async", fake_memcpy2d_async)
    monkeypatch.setattr(cuda, "memset_async", fake_memset_async)
    monkeypatch.setattr(FakeContext, "in_flight", {})
    monkeypatch.setattr(FakeStream, "pending", {})
    monkeypatch.setattr(FakeDevice, "fail_over", None)


# --- a decoder plan whose execution is the real ONNX graph ---------------------------------------

DECODER_PLAN = b"fake-decoder-plan\n"
_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16}
_SESSIONS: dict[str, Any] = {}


def decoder_plan_bytes(onnx_path: Path, options: dict[str, Any]) -> bytes:
    """What the fake build child writes: the ONNX it was built from and the profiles it was given
    (``BuildOptions.to_json``), so the fake engine holds exactly the profiles the build asked for."""
    return DECODER_PLAN + json.dumps({"onnx": str(onnx_path), "profiles": options["profiles"]}).encode()


class FakeDecoderEngine(FakeEngine):
    """A decoder plan: I/O and profiles as TensorRT would report them for the ONNX graph (symbolic
    dims as -1), checked like ``FakeEngine``; an execution runs the same ONNX graph on ONNX
    Runtime's CPU provider, reading inputs from and writing outputs to the bound device addresses.
    ``runs`` records (profile, input_ids shape) per execution."""

    def __init__(self, api: int, spec: dict[str, Any]) -> None:
        import onnxruntime as ort

        path = spec["onnx"]
        if path not in _SESSIONS:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            _SESSIONS[path] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.session = _SESSIONS[path]
        self.symbols: dict[str, list[Any]] = {}
        io = []
        for arg, is_in in [(a, True) for a in self.session.get_inputs()] + [
            (a, False) for a in self.session.get_outputs()
        ]:
            self.symbols[arg.name] = list(arg.shape)
            shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
            io.append((arg.name, _ORT_TYPES[arg.type], shape, is_in))
        self.IO = tuple(io)  # type: ignore[misc]
        self.PROFILES = tuple(  # type: ignore[misc]
            {n: [tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])] for n, r in p.items()}
            for p in spec["profiles"]
        )
        self.PROFILE_MEMORY = tuple((1 << 20) if i == 0 else (1 << 16) for i in range(len(self.PROFILES)))  # type: ignore[misc]
        self.num_io_tensors = len(self.IO)  # type: ignore[misc]
        self.num_optimization_profiles = len(self.PROFILES)  # type: ignore[misc]
        self.runs: list[tuple[int, tuple[int, ...]]] = []
        super().__init__(api)

    def output_shape(self, name: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        values: dict[str, int] = {}
        for n, shape in shapes.items():
            for sym, v in zip(self.symbols[n], shape, strict=True):
                if isinstance(sym, str) and values.setdefault(sym, v) != v:
                    raise ContractViolation(f"dimension {sym} is {values[sym]} and {v} across the inputs")
        return tuple(d if isinstance(d, int) else values[d] for d in self.symbols[name])

    def compute(self, ctx: FakeContext) -> None:
        self.runs.append((ctx.profile, ctx.shapes["input_ids"]))
        feeds = {n: ctx.tensor(n).copy() for n in self.inputs}
        names = [d[0] for d in self.IO if not d[3]]
        for name, value in zip(names, self.session.run(names, feeds), strict=True):
            ctx.tensor(name)[...] = value
