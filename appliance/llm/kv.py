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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper


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


__all__ = ["HOST", "KVOps", "KVState", "OrtKVOps", "empty_state"]
