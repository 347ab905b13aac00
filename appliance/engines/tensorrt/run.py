"""TensorRT execution: binding plans, the 10.x/11.x runtime dispatch and ``TensorRTEngine``.

Only runs after ``cuda.probe()`` found a device: a TensorRT runtime created without one segfaults
the process instead of raising.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.base import Engine, EngineError, EngineOutOfMemory, TensorSpec
from appliance.engines.tensorrt.plan import (
    PlanIncompatible,
    Profile,
    Shape,
    ShapeRange,
    require_gpu,
    select_profile,
)
from appliance.gpu import cuda
from appliance.gpu.cuda import CudaError, DeviceBuffer, GpuProbe, PinnedBuffer

log = logging.getLogger(__name__)

# --- bindings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IoDesc:
    """One engine I/O tensor as the engine declares it: ``-1`` marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: Shape
    is_input: bool


@dataclass(frozen=True)
class Binding:
    name: str
    dtype: np.dtype
    shape: Shape
    mode: str  # "input"; "output" (copied back); "unused" (bound, since TensorRT writes every output)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def binding_plan(
    io: Sequence[IoDesc],
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    output_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[Binding]:
    """What to bind for one batch: each input at its fed shape in the *engine's* dtype (int64
    ``input_ids`` stay int64: the ONNX parser no longer narrows them), and every output.

    Output shapes come from ``output_shapes`` (the context's, after ``infer_shapes``) or, failing
    that, from the engine with a dynamic first dim set to the batch size; -1 is left where unknown.
    """
    inputs = [d for d in io if d.is_input]
    outputs = [d for d in io if not d.is_input]
    unknown = set(feeds) - {d.name for d in inputs}
    if unknown:
        raise EngineError(f"unknown input(s) {sorted(unknown)}; the engine takes {[d.name for d in inputs]}")
    wanted = list(output_names) if output_names else [d.name for d in outputs]
    missing_out = set(wanted) - {d.name for d in outputs}
    if missing_out:
        raise EngineError(f"unknown output(s) {sorted(missing_out)}")
    plan: list[Binding] = []
    batch: int | None = None
    for d in inputs:
        if d.name not in feeds:
            raise EngineError(f"missing input {d.name!r}")
        arr = np.asarray(feeds[d.name])
        if arr.ndim != len(d.shape) or any(
            e >= 0 and e != s for e, s in zip(d.shape, arr.shape, strict=True)
        ):
            raise EngineError(f"input {d.name!r} has shape {arr.shape}; the engine expects {d.shape}")
        if not np.can_cast(arr.dtype, d.dtype, casting="same_kind"):
            raise EngineError(f"input {d.name!r} is {arr.dtype}; the engine takes {d.dtype}")
        if batch is None and d.shape and d.shape[0] < 0:
            batch = arr.shape[0]
        plan.append(Binding(d.name, d.dtype, tuple(arr.shape), "input"))
    for d in outputs:
        if output_shapes is not None and d.name in output_shapes:
            shape = tuple(int(s) for s in output_shapes[d.name])
        else:
            shape = tuple(
                batch if (i == 0 and s < 0 and batch is not None) else s for i, s in enumerate(d.shape)
            )
        plan.append(Binding(d.name, d.dtype, shape, "output" if d.name in wanted else "unused"))
    return plan


# --- TensorRT 10 / 11 runtime dispatch -----------------------------------------------------------


def activation_size(engine: Any) -> int:
    """Scratch bytes a context needs (max over profiles); 11.x removed the non-v2 attribute."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def create_user_managed_context(trt: Any, engine: Any) -> Any:
    """A context whose scratch memory we supply, so one arena can serve several engines."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()  # removed in 11.x


def set_context_memory(ctx: Any, ptr: int, nbytes: int) -> None:
    """Give a USER_MANAGED context its scratch block: once per block, not before every execution.

    Settled from NVIDIA's documentation of TensorRT 10.x and 11.x (``NvInferRuntime.h``,
    ``IExecutionContext::setDeviceMemoryV2``, and the Python ``set_device_memory`` docstring): the
    block must be set before ``enqueueV3``, aligned, and "large enough for performing inference with
    the given network inputs", for which ``getDeviceMemorySizeV2`` and
    ``getDeviceMemorySizeForProfileV2`` "report upper bounds"; it is "in use from the invocation of
    enqueueV3() until network execution is complete" and must not serve a context running in
    parallel. ``setOptimizationProfileAsync`` is documented to invalidate the input shapes, not the
    device memory. So a block of ``device_memory_size_v2`` (the max over profiles) is valid for
    every profile and shape, and is set again only when the block itself changes (the memory
    manager grows the shared arena). NVIDIA's TensorRT-Edge-LLM runner does the same: one
    ``getDeviceMemorySizeV2`` block set once on its prefill and decode contexts, then profile
    switches. Setting it before each run (as Polygraphy does) is what per-shape sizing with
    ``update_device_memory_size_for_shapes`` needs, where the block size changes between runs; the
    appliance does not size per shape. tests/fake_tensorrt.py enforces this contract, and
    ``scripts/gpu-check`` switches profiles on a real GPU to confirm it.
    """
    if hasattr(ctx, "set_device_memory"):  # 10.1+: size-checked
        ctx.set_device_memory(ptr, nbytes)
    else:
        ctx.device_memory = ptr


def describe_io(trt: Any, eng: Any) -> list[IoDesc]:
    """The engine's I/O tensors in its own dtypes (refusing shape tensors and types numpy lacks)."""
    io = []
    for i in range(eng.num_io_tensors):
        name = eng.get_tensor_name(i)
        is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if is_input and eng.get_tensor_location(name) == trt.TensorLocation.HOST:
            raise EngineError(f"input {name!r} is a shape tensor; those are not supported")
        try:
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
        except TypeError as exc:  # BF16/FP8/INT4 I/O: keep graph I/O at FP32/FP16
            raise EngineError(f"{name!r} has type {eng.get_tensor_dtype(name)} with no numpy type") from exc
        io.append(IoDesc(name, dtype, tuple(int(d) for d in eng.get_tensor_shape(name)), is_input))
    return io


def read_profiles(eng: Any, io: Sequence[IoDesc]) -> list[Profile]:
    """Each optimization profile's min/opt/max of every dynamic input, as the plan holds them."""
    dynamic = [d.name for d in io if d.is_input and any(s < 0 for s in d.shape)]
    return [
        {
            n: ShapeRange(*(tuple(int(x) for x in s) for s in eng.get_tensor_profile_shape(n, p)))
            for n in dynamic
        }
        for p in range(eng.num_optimization_profiles)
    ]


# --- execution -----------------------------------------------------------------------------------

_logger_lock = threading.Lock()
_trt_logger: Any = None


def deserialize(trt: Any, device: int, plan_path: Path) -> tuple[Any, Any]:
    """A TensorRT runtime and the engine it deserializes from ``plan_path`` on ``device``.
    Raises EngineError when the file or the device fails, PlanIncompatible when this TensorRT
    cannot load the plan (another version or GPU built it: rebuild)."""
    try:
        cuda.set_device(device)
        runtime = trt.Runtime(process_logger(trt))
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    except (OSError, CudaError) as exc:
        raise EngineError(f"cannot load {plan_path.name}: {exc}") from exc
    if engine is None:
        raise PlanIncompatible(f"TensorRT {trt.__version__} cannot load {plan_path.name}; rebuild it")
    return runtime, engine


def process_logger(trt: Any) -> Any:
    """One ILogger per process: TensorRT keeps a single logger pointer and calls it from its threads."""
    global _trt_logger
    with _logger_lock:
        if _trt_logger is None:
            sev = trt.ILogger.Severity
            levels = {
                sev.INTERNAL_ERROR: logging.CRITICAL,
                sev.ERROR: logging.ERROR,
                sev.WARNING: logging.WARNING,
                sev.INFO: logging.DEBUG,
                sev.VERBOSE: logging.DEBUG - 5,
            }

            class Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

            _trt_logger = Logger()
        return _trt_logger


@dataclass
class _Slot:
    """Device memory for one I/O tensor, plus pinned staging for those copied to or from the host."""

    device: DeviceBuffer
    host: PinnedBuffer | None

    def close(self) -> None:
        self.device.close()
        if self.host is not None:
            self.host.close()


class TensorRTEngine(Engine):
    """A deserialized plan with one user-managed execution context.

    ``activation`` is the scratch arena: give one shared buffer (at least ``activation_bytes()``) to
    several engines whose runs never overlap, or leave it None and the engine allocates its own at the
    first run. I/O buffers grow to the largest batch seen and stay; ``run`` is synchronous.
    """

    backend = "tensorrt"

    def __init__(
        self,
        plan_path: Path,
        *,
        device: int = 0,
        activation: DeviceBuffer | None = None,
        gpu: GpuProbe | None = None,
    ) -> None:
        require_gpu(device, gpu)  # before any TensorRT object: without a GPU they segfault
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(f"TensorRT is not installed: {exc}") from exc
        self._trt = trt
        self._device = device
        self._closed = False
        self._slots: dict[str, _Slot] = {}
        self._arena: DeviceBuffer | None = None
        self._own_arena: DeviceBuffer | None = None
        self._runtime, self._engine = deserialize(trt, device, plan_path)
        self._io = self._describe_io()
        self._profiles = self._read_profiles()
        self._activation_bytes = activation_size(self._engine)
        self._context = create_user_managed_context(trt, self._engine)
        if self._context is None:
            raise EngineOutOfMemory(f"cannot create an execution context for {plan_path.name}")
        self._profile = 0
        self._streams = cuda.ThreadStreams(device)
        self._plan_bytes = plan_path.stat().st_size
        if activation is not None:
            self.set_activation(activation)

    def _describe_io(self) -> list[IoDesc]:
        return describe_io(self._trt, self._engine)

    def _read_profiles(self) -> list[Profile]:
        return read_profiles(self._engine, self._io)

    # -- Engine interface --

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [_spec(d) for d in self._io if d.is_input]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [_spec(d) for d in self._io if not d.is_input]

    @property
    def profiles(self) -> list[Profile]:
        return list(self._profiles)

    @property
    def on_gpu(self) -> bool:
        return True

    def activation_bytes(self) -> int:
        """Scratch bytes this engine's context needs (max over its profiles)."""
        return self._activation_bytes

    def set_activation(self, arena: DeviceBuffer | None) -> None:
        """Point the context's scratch at ``arena`` (shared; the caller keeps it alive and serialises
        runs of every engine using it), or at a private arena when None. Call between runs only."""
        if arena is not None and arena.nbytes < self._activation_bytes:
            raise EngineError(f"activation arena of {arena.nbytes} bytes < {self._activation_bytes} needed")
        if arena is None:
            arena = self._own_arena or DeviceBuffer(max(self._activation_bytes, 256))
            self._own_arena = arena
        elif self._own_arena is not None:
            self._own_arena.close()
            self._own_arena = None
        if arena.nbytes:  # an engine that needs no scratch gets no pointer (a 0-byte arena has none)
            set_context_memory(self._context, arena.ptr, arena.nbytes)
        self._arena = arena

    def memory_bytes(self) -> int:
        """Plan size (about the resident weights) + I/O buffers + a private arena, if any."""
        slots = sum(s.device.nbytes for s in self._slots.values())
        return self._plan_bytes + slots + (self._own_arena.nbytes if self._own_arena else 0)

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if self._closed:
            raise EngineError("engine is closed")
        try:
            return self._run(feeds, output_names)
        except CudaError as exc:
            raise (EngineOutOfMemory if exc.out_of_memory else EngineError)(str(exc)) from exc

    def _run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        ctx = self._context
        plan = binding_plan(self._io, feeds, output_names)
        inputs = [b for b in plan if b.mode == "input"]
        stream = self._streams.get()
        if self._arena is None:
            self.set_activation(None)
        if self._profiles:
            try:
                index = select_profile(self._profiles, {b.name: b.shape for b in inputs})
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
            if index != self._profile:
                if not ctx.set_optimization_profile_async(index, stream.handle):
                    raise EngineError(f"cannot switch to optimization profile {index}")
                self._profile = index
        for b in inputs:
            if not ctx.set_input_shape(b.name, b.shape):
                raise EngineError(f"input {b.name!r} shape {b.shape} is outside profile {self._profile}")
        missing = ctx.infer_shapes()
        if missing:
            raise EngineError(f"input shapes not specified: {list(missing)}")
        shapes = {b.name: tuple(ctx.get_tensor_shape(b.name)) for b in plan if b.mode != "input"}
        if any(s < 0 for shape in shapes.values() for s in shape):
            raise EngineError("data-dependent output shapes are not supported")
        plan = binding_plan(self._io, feeds, output_names, shapes)
        results: dict[str, np.ndarray] = {}
        try:
            for b in plan:
                slot = self._slot(b)
                if not ctx.set_tensor_address(b.name, slot.device.ptr):
                    raise EngineError(f"cannot bind {b.name!r}")
                if b.mode == "input":
                    assert slot.host is not None
                    staged = slot.host.view(b.dtype, b.shape)
                    np.copyto(staged, feeds[b.name], casting="same_kind")  # int32 ids -> int64 input
                    cuda.memcpy_htod_async(slot.device, staged, stream)
            if not ctx.execute_async_v3(stream.handle):
                raise EngineError("TensorRT could not enqueue the batch")
            for b in plan:
                if b.mode == "output":
                    slot = self._slots[b.name]
                    assert slot.host is not None
                    results[b.name] = slot.host.view(b.dtype, b.shape)
                    cuda.memcpy_dtoh_async(results[b.name], slot.device, stream)
        except BaseException:
            # Drain what was enqueued: the next batch rewrites these staging buffers.
            with contextlib.suppress(CudaError):
                stream.synchronize()
            raise
        stream.synchronize()  # outputs are only valid now; it also frees the arena for the next engine
        wanted = list(output_names) if output_names else [d.name for d in self._io if not d.is_input]
        # Copies: the pinned staging buffers are reused by the next batch.
        return {n: results[n].copy() for n in wanted}

    def _slot(self, b: Binding) -> _Slot:
        slot = self._slots.get(b.name)
        staged = b.mode != "unused"
        need = max(256, b.nbytes)  # never a null pointer, even for an empty tensor
        if slot is not None and slot.device.nbytes >= need and (slot.host is not None or not staged):
            return slot
        size = need
        if slot is not None:
            # Grow by half again so a slowly rising batch size does not reallocate every time.
            size = max(need, slot.device.nbytes * 3 // 2 if slot.device.nbytes < need else slot.device.nbytes)
            slot.close()
        size = (size + 255) // 256 * 256
        slot = self._slots[b.name] = _Slot(DeviceBuffer(size), PinnedBuffer(size) if staged else None)
        return slot

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
        # Context before engine before runtime: TensorRT objects must die in reverse creation order.
        self._context = None
        self._engine = None
        self._runtime = None
        if self._own_arena is not None:
            self._own_arena.close()
        self._own_arena = self._arena = None
        self._streams.close()


def _spec(d: IoDesc) -> TensorSpec:
    return TensorSpec(d.name, d.dtype, tuple(None if s < 0 else s for s in d.shape))
