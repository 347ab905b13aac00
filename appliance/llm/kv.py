"""The KV store of a generate model: one batch's per-layer keys and values, and the edits the
scheduler, the prefix cache and chunked prefill make to it, written once over array primitives.

A ``KVState`` holds per-layer K/V arrays [B, kv_heads, T, head_dim] wherever the engine keeps
them, plus the mask [B, T] (int64, 1 = a real token) on the host: the mask is tiny, the scheduler
reads it to know each row's length, and it is fed to every engine call like the token ids. Rows
are right-aligned: a row's tokens end at the last column, padding (mask 0) comes before them, so
one new column per decode step serves all rows and a row's next position is its mask sum.

The row edits (``select``: drop rows; ``join``: stack separately prefilled rows, left-padding the
narrower side; ``trim``: drop leading columns that are padding in every row; ``columns`` and
``concat_columns``: cut a row into prefix-cache blocks and put blocks back together) only move
data, never recompute it. They are expressed over ``KVOps``, the five primitives of a placement:

- ``HOST``: NumPy arrays in host memory (the CPU engines).
- ``OrtKVOps(device)``: ONNX Runtime ``OrtValue`` tensors placed on ``device`` ("cuda" keeps the
  cache in GPU memory between steps). Each primitive is a one-node ONNX graph (Gather, Slice,
  Concat, Pad) run through I/O binding with its output bound to the same device, so an edit never
  copies KV to the host. With ``device="cpu"`` the same graphs run on the CPU provider: CI checks
  them bit-exact against ``HOST`` and runs the whole scheduler on them; only the placement differs
  on a GPU.
- ``CudaKVOps(dtype, stream)``: raw device memory (``DeviceArray``) for the TensorRT decoder, which
  binds tensors by address. Every edit is a copy on the device: rows are contiguous blocks
  (``cudaMemcpyAsync``), a column range of every [batch, head] row is one strided copy
  (``cudaMemcpy2DAsync``), padding is a ``cudaMemsetAsync`` to zero. CI runs it on fake device
  memory (host memory behind the same calls, tests/fake_tensorrt.py) bit-exact against ``HOST``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.gpu import cuda


class KVOps(Protocol):
    """Array primitives of one placement (``A`` is the array type: ndarray or OrtValue)."""

    placement: str

    def take_rows(self, a: Any, rows: np.ndarray) -> Any:
        """``a[rows]`` along axis 0."""
        ...

    def columns(self, a: Any, start: int, stop: int) -> Any:
        """``a[:, :, start:stop]``."""
        ...

    def concat(self, arrays: Sequence[Any], axis: int) -> Any: ...

    def pad_left(self, a: Any, n: int) -> Any:
        """``n`` zero columns before axis 2 (zeros: masked scores must stay finite)."""
        ...

    def empty(self, batch: int, heads: int, head_dim: int, dtype: np.dtype) -> Any:
        """A [batch, heads, 0, head_dim] array: the past of a prefill from scratch."""
        ...

    def nbytes(self, a: Any) -> int: ...

    def to_host(self, a: Any) -> np.ndarray: ...


class _HostOps:
    placement = "host"

    def take_rows(self, a: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return a[rows]

    def columns(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        # A copy, not a view: a cached block must not keep its whole source batch alive.
        return np.ascontiguousarray(a[:, :, start:stop])

    def concat(self, arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=axis)

    def pad_left(self, a: np.ndarray, n: int) -> np.ndarray:
        return np.pad(a, [(0, 0), (0, 0), (n, 0), (0, 0)]) if n else a

    def empty(self, batch: int, heads: int, head_dim: int, dtype: np.dtype) -> np.ndarray:
        return np.zeros((batch, heads, 0, head_dim), dtype=dtype)

    def nbytes(self, a: np.ndarray) -> int:
        return int(a.nbytes)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)


HOST: KVOps = _HostOps()

_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
_OPSET = 17


class OrtKVOps:
    """The primitives as one-node ONNX graphs on an ONNX Runtime execution provider, data bound
    with ``io_binding()`` so inputs and outputs stay on ``device`` (``OrtValue`` in, ``OrtValue``
    out). Small index tensors (rows, slice bounds, pads) are bound from the host."""

    def __init__(self, dtype: np.dtype, device: str = "cpu", device_id: int = 0) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        self.placement = f"{device}:{device_id}"
        self._providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self._sessions: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    # -- graphs ------------------------------------------------------------------------------

    def _session(self, key: tuple[Any, ...]) -> Any:
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                sess = self._sessions[key] = self._build(key)
            return sess

    def _build(self, key: tuple[Any, ...]) -> Any:
        elem = _ELEM[self.dtype]
        dims = ["b", "h", "t", "d"]

        def data(name: str, suffix: str = "") -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, elem, [f"{d}{suffix}" for d in dims])

        def ints(name: str) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, TensorProto.INT64, ["n"])

        op = key[0]
        out = helper.make_tensor_value_info("y", elem, None)
        if op == "take":
            inputs = [data("x"), ints("rows")]
            node = helper.make_node("Gather", ["x", "rows"], ["y"], axis=0)
        elif op == "columns":
            inputs = [data("x"), ints("starts"), ints("ends"), ints("axes")]
            node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])
        elif op == "concat":
            _, n, axis = key
            inputs = [data(f"x{i}", str(i)) for i in range(n)]
            node = helper.make_node("Concat", [f"x{i}" for i in range(n)], ["y"], axis=axis)
        elif op == "pad":
            inputs = [data("x"), ints("pads")]
            node = helper.make_node("Pad", ["x", "pads"], ["y"], mode="constant")
        else:
            raise ValueError(f"unknown KV op {op}")
        graph = helper.make_graph([node], f"kv_{op}", inputs, [out])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
        model.ir_version = 8
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = 1
        return self._ort.InferenceSession(model.SerializeToString(), options, providers=self._providers)

    def _run(self, key: tuple[Any, ...], device_inputs: dict[str, Any], host_inputs: dict[str, Any]) -> Any:
        sess = self._session(key)
        io = sess.io_binding()
        for name, value in device_inputs.items():
            io.bind_ortvalue_input(name, value)
        for name, array in host_inputs.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        io.bind_output("y", self.device, self.device_id)
        sess.run_with_iobinding(io)
        return io.get_outputs()[0]

    # -- primitives --------------------------------------------------------------------------

    def from_host(self, a: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(a, dtype=self.dtype), self.device, self.device_id
        )

    def take_rows(self, a: Any, rows: np.ndarray) -> Any:
        return self._run(("take",), {"x": a}, {"rows": rows})

    def columns(self, a: Any, start: int, stop: int) -> Any:
        return self._run(("columns",), {"x": a}, {"starts": [start], "ends": [stop], "axes": [2]})

    def concat(self, arrays: Sequence[Any], axis: int) -> Any:
        if len(arrays) == 1:
            return arrays[0]
        return self._run(("concat", len(arrays), axis), {f"x{i}": a for i, a in enumerate(arrays)}, {})

    def pad_left(self, a: Any, n: int) -> Any:
        if not n:
            return a
        return self._run(("pad",), {"x": a}, {"pads": [0, 0, n, 0, 0, 0, 0, 0]})

    def empty(self, batch: int, heads: int, head_dim: int, dtype: np.dtype) -> Any:
        return self.from_host(np.zeros((batch, heads, 0, head_dim), dtype=dtype))

    def nbytes(self, a: Any) -> int:
        return int(np.prod(a.shape(), dtype=np.int64)) * self.dtype.itemsize

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a.numpy())


_ALIGN = 256  # TensorRT wants every tensor address 256-byte aligned; cudaMalloc gives at least that


@dataclass(eq=False)
class DeviceArray:
    """A C-contiguous array at ``buffer.ptr + offset`` in device memory. Several arrays may share
    one buffer (a step's presents are one allocation); it is freed when the last one is dropped."""

    buffer: cuda.DeviceBuffer
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ptr(self) -> int:
        return int(self.buffer.ptr) + self.offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def device_arrays(shapes: Sequence[tuple[int, ...]], dtype: np.dtype) -> list[DeviceArray]:
    """Arrays of ``shapes`` in one device allocation, each at a 256-byte aligned offset (an empty
    array still gets its own 256 bytes: TensorRT takes no null tensor address)."""
    dtype = np.dtype(dtype)
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        n = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        total += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    buffer = cuda.DeviceBuffer(total)
    return [DeviceArray(buffer, o, tuple(s), dtype) for o, s in zip(offsets, shapes, strict=True)]


class CudaKVOps:
    """The primitives as copies in device memory on ``stream`` (the decoder's own stream, so an edit
    is ordered before the next step that reads it without a host sync). Arrays are [B, H, T, D]
    ``DeviceArray``; a [b, h] row of T*D elements is contiguous, which is what makes every edit one
    copy per row (take, concat rows) or one strided copy (columns, concat and pad columns)."""

    def __init__(self, dtype: np.dtype, stream: Any, device_id: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        self.stream, self.device_id = stream, device_id
        self.placement = f"cuda:{device_id}"
        # Sources of copies still queued on the stream: kept alive (not freed under the copy)
        # until the owner has synchronised the stream and calls ``synced``.
        self._held: list[DeviceArray] = []

    def synced(self) -> None:
        """The stream has been synchronised: every queued copy is done."""
        self._held.clear()

    def _new(self, shape: tuple[int, ...], *sources: DeviceArray) -> DeviceArray:
        self._held.extend(sources)
        return device_arrays([shape], self.dtype)[0]

    def _rows(self, a: DeviceArray) -> tuple[int, int, int]:
        """(batch*heads strided rows, bytes per row, bytes per column) of a [B, H, T, D] array."""
        b, h, t, d = a.shape
        col = d * self.dtype.itemsize
        return b * h, t * col, col

    def take_rows(self, a: DeviceArray, rows: np.ndarray) -> DeviceArray:
        out = self._new((len(rows), *a.shape[1:]), a)
        block = int(np.prod(a.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        for i, r in enumerate(np.asarray(rows, dtype=np.int64)):
            if not 0 <= r < a.shape[0]:
                raise IndexError(f"row {r} of a batch of {a.shape[0]}")
            cuda.memcpy_dtod_async(out.ptr + i * block, a.ptr + int(r) * block, block, self.stream)
        return out

    def columns(self, a: DeviceArray, start: int, stop: int) -> DeviceArray:
        b, h, t, d = a.shape
        start, stop = max(0, min(start, t)), max(0, min(stop, t))
        stop = max(start, stop)
        out = self._new((b, h, stop - start, d), a)
        height, pitch, col = self._rows(a)
        width = (stop - start) * col
        cuda.memcpy2d_async(out.ptr, width, a.ptr + start * col, pitch, width, height, "dtod", self.stream)
        return out

    def concat(self, arrays: Sequence[DeviceArray], axis: int) -> DeviceArray:
        if len(arrays) == 1:
            return arrays[0]
        first = arrays[0]
        if axis == 0:
            out = self._new((sum(a.shape[0] for a in arrays), *first.shape[1:]), *arrays)
            at = out.ptr
            for a in arrays:
                cuda.memcpy_dtod_async(at, a.ptr, a.nbytes, self.stream)
                at += a.nbytes
            return out
        if axis != 2:
            raise ValueError(f"KV arrays are joined on axis 0 or 2, not {axis}")
        b, h, _, d = first.shape
        out = self._new((b, h, sum(a.shape[2] for a in arrays), d), *arrays)
        height, pitch, col = self._rows(out)
        at = 0
        for a in arrays:
            width = a.shape[2] * col
            cuda.memcpy2d_async(out.ptr + at, pitch, a.ptr, width, width, height, "dtod", self.stream)
            at += width
        return out

    def pad_left(self, a: DeviceArray, n: int) -> DeviceArray:
        if not n:
            return a
        b, h, t, d = a.shape
        out = self._new((b, h, t + n, d), a)
        cuda.memset_async(out.ptr, 0, out.nbytes, self.stream)  # zeros: masked scores stay finite
        height, pitch, col = self._rows(out)
        width = t * col
        cuda.memcpy2d_async(out.ptr + n * col, pitch, a.ptr, width, width, height, "dtod", self.stream)
        return out

    def empty(self, batch: int, heads: int, head_dim: int, dtype: np.dtype) -> DeviceArray:
        return self._new((batch, heads, 0, head_dim))

    def nbytes(self, a: DeviceArray) -> int:
        return a.nbytes

    def from_host(self, a: np.ndarray) -> DeviceArray:
        host = np.ascontiguousarray(a, dtype=self.dtype)
        out = self._new(tuple(host.shape))
        cuda.memcpy_htod_async(out.ptr, host, self.stream)
        self.stream.synchronize()  # ``host`` may go as soon as this returns
        self.synced()
        return out

    def to_host(self, a: DeviceArray) -> np.ndarray:
        host = np.empty(a.shape, dtype=self.dtype)
        cuda.memcpy_dtoh_async(host, a.ptr, self.stream)
        self.stream.synchronize()
        self.synced()
        return host


@dataclass
class KVState:
    """Per-layer K/V [B, kv_heads, T, head_dim] on ``ops``' placement and the host mask [B, T]."""

    keys: list[Any]
    values: list[Any]
    mask: np.ndarray  # int64; 1 = a real token
    ops: KVOps = field(default=HOST, repr=False)

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> np.ndarray:
        """Tokens held per row, which is also the position of each row's next token."""
        return np.asarray(self.mask.sum(axis=1))

    def nbytes(self) -> int:
        return sum(self.ops.nbytes(a) for a in self.keys) + sum(self.ops.nbytes(a) for a in self.values)

    def _map(self, fn: Any, mask: np.ndarray) -> KVState:
        return KVState([fn(k) for k in self.keys], [fn(v) for v in self.values], mask, self.ops)

    def select(self, rows: Sequence[int]) -> KVState:
        """The given rows in the given order (e.g. without finished sequences), trimmed."""
        idx = np.asarray(rows, dtype=np.int64)
        return self._map(lambda a: self.ops.take_rows(a, idx), self.mask[idx]).trim()

    def trim(self) -> KVState:
        """Drop leading columns that are padding in every row."""
        used = self.mask.any(axis=0)
        drop = int(np.argmax(used)) if used.any() else self.width
        if drop <= 0:
            return self
        return self.columns(drop, self.width)

    def columns(self, start: int, stop: int) -> KVState:
        """Columns ``start:stop`` of every row (a prefix-cache block of a one-row state)."""
        return self._map(lambda a: self.ops.columns(a, start, stop), self.mask[:, start:stop])

    def pad_left(self, n: int) -> KVState:
        if n <= 0:
            return self
        pad = np.zeros((self.batch, n), dtype=self.mask.dtype)
        return self._map(lambda a: self.ops.pad_left(a, n), np.concatenate([pad, self.mask], axis=1))

    @staticmethod
    def join(states: Sequence[KVState]) -> KVState:
        """Stack batches row-wise, left-padding narrower ones so all stay aligned at the right."""
        width = max(s.width for s in states)
        padded = [s.pad_left(width - s.width) for s in states]
        ops = states[0].ops
        layers = range(len(states[0].keys))
        return KVState(
            [ops.concat([s.keys[i] for s in padded], 0) for i in layers],
            [ops.concat([s.values[i] for s in padded], 0) for i in layers],
            np.concatenate([s.mask for s in padded]),
            ops,
        )

    @staticmethod
    def concat_columns(states: Sequence[KVState]) -> KVState:
        """Put column ranges of the same rows side by side (cached blocks back into a past)."""
        ops = states[0].ops
        layers = range(len(states[0].keys))
        return KVState(
            [ops.concat([s.keys[i] for s in states], 2) for i in layers],
            [ops.concat([s.values[i] for s in states], 2) for i in layers],
            np.concatenate([s.mask for s in states], axis=1),
            ops,
        )


def empty_state(ops: KVOps, layers: int, batch: int, heads: int, head_dim: int, dtype: np.dtype) -> KVState:
    """The past of a prefill from scratch: ``batch`` rows of zero width."""
    empty = ops.empty(batch, heads, head_dim, dtype)
    return KVState([empty] * layers, [empty] * layers, np.zeros((batch, 0), dtype=np.int64), ops)


__all__ = ["HOST", "CudaKVOps", "DeviceArray", "KVOps", "KVState", "OrtKVOps", "device_arrays", "empty_state"]
