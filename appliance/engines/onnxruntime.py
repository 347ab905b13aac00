"""ONNX Runtime backend: CPU provider here, CUDA provider when onnxruntime-gpu finds a GPU."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnxruntime as ort

from appliance.engines.base import Engine, EngineError, EngineOutOfMemory, Interface, TensorSpec

log = logging.getLogger(__name__)

_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, np.dtype(object)), shape)


# -- a model's interface read from its file, without loading it --------------------------------

# ONNX's protobuf field numbers: ModelProto.graph; GraphProto.initializer, .input, .output;
# TensorProto.name.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _TENSOR_NAME = 7, 5, 11, 12, 8


def _varint(f: BinaryIO) -> int:
    shift = value = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated protobuf")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("malformed protobuf varint")


def _fields(f: BinaryIO, end: int) -> Iterator[tuple[int, int]]:
    """(field number, length) of each length-delimited field of the message that ends at ``end``,
    with ``f`` at the field's bytes; what the caller does not read is skipped by a seek."""
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            if start + length > end:
                raise ValueError("truncated protobuf")
            yield number, length
            f.seek(start + length)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


def _value_spec(info: Any) -> TensorSpec:
    """A graph input's or output's spec as ONNX Runtime's NodeArg gives it (``_spec``)."""
    import onnx

    tensor = info.type.tensor_type
    try:
        type_name = "tensor(" + onnx.TensorProto.DataType.Name(tensor.elem_type).lower() + ")"
    except ValueError:
        type_name = ""
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return TensorSpec(info.name, _ORT_DTYPES.get(type_name, np.dtype(object)), shape)


def graph_io(path: Path) -> Interface:
    """The inputs (initializers left out, as ONNX Runtime does) and outputs of the ONNX model at
    ``path``, as its engine would show them, read without loading it: the weights are skipped
    by seeking past them, so a 500 MB file costs a few reads, where ``onnx.load`` parses it all
    (seconds) and a session is a model load. Raises OSError or ValueError for a file that is not
    an ONNX model."""
    import onnx

    with open(path, "rb") as f:
        for number, length in _fields(f, os.fstat(f.fileno()).st_size):
            if number != _MODEL_GRAPH:
                continue
            initializers: set[bytes] = set()
            inputs: list[Any] = []
            outputs: list[Any] = []
            for field, size in _fields(f, f.tell() + length):
                if field == _GRAPH_INITIALIZER:
                    for part, n in _fields(f, f.tell() + size):
                        if part == _TENSOR_NAME:
                            initializers.add(f.read(n))
                elif field in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                    info = onnx.ValueInfoProto.FromString(f.read(size))
                    (inputs if field == _GRAPH_INPUT else outputs).append(info)
            return Interface(
                [_value_spec(i) for i in inputs if i.name.encode() not in initializers],
                [_value_spec(o) for o in outputs],
            )
    raise ValueError(f"{path.name}: no graph in the file; not an ONNX model")


@functools.cache
def load_cuda_libraries() -> None:
    """Load CUDA and cuDNN before the first CUDA session, once per process.

    install.sh installs ``onnxruntime-gpu[cuda,cudnn]``: the CUDA and cuDNN libraries come as
    ``nvidia-*`` wheels, which the dynamic loader does not search. Unless they are loaded first
    (ONNX Runtime >= 1.21: ``preload_dlls``), the CUDA provider fails to load and the session
    quietly runs on the CPU. Libraries already on the loader's path (a system CUDA) are found
    either way; a failure here is logged and leaves that path to decide."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # ORT's helper raises whatever ctypes does
        log.warning("could not preload CUDA/cuDNN libraries for ONNX Runtime: %s", exc)


def providers(prefer_gpu: bool = True) -> list[str]:
    available = ort.get_available_providers()
    chosen = []
    if prefer_gpu and "CUDAExecutionProvider" in available:
        load_cuda_libraries()
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spin_wait: bool = False,
        spin_us: int = 0,
        prefer_gpu: bool = True,
        session: ort.InferenceSession | None = None,
    ) -> None:
        """Open ``path``, or wrap a ``session`` already opened on it (the decoder runtime's)."""
        self._bytes = _file_bytes(path)
        if session is not None:
            self._adopt(session)
            return
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Without ORT's CPU arena, a run's working memory is returned when it ends: the memory
        # manager can then share one activation budget between models taking turns (and the
        # arena was no faster here: 29 vs 35 ms for a MiniLM batch of 8).
        opts.enable_cpu_mem_arena = False
        spinning(opts, spin_wait, spin_us, stop_after_run=True)
        try:
            opened = ort.InferenceSession(os.fspath(path), sess_options=opts, providers=providers(prefer_gpu))
        except Exception as exc:  # ORT raises its own untyped errors
            raise EngineError(f"cannot load {path.name}: {exc}") from exc
        self._adopt(opened)

    def _adopt(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._inputs = [_spec(a) for a in session.get_inputs()]
        self._outputs = [_spec(a) for a in session.get_outputs()]
        self.provider = session.get_providers()[0]

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        try:
            results = self._session.run(names, dict(feeds))
        except Exception as exc:
            text = str(exc)
            if "Failed to allocate memory" in text or "bad_alloc" in text or "out of memory" in text:
                raise EngineOutOfMemory(text) from exc
            raise EngineError(text) from exc
        return dict(zip(names, results, strict=True))

    @property
    def on_gpu(self) -> bool:
        return bool(self.provider == "CUDAExecutionProvider")

    @property
    def backend_name(self) -> str:
        return "onnxruntime-cuda" if self.on_gpu else "onnxruntime-cpu"

    def memory_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        # Dropping the last reference frees the session; ORT has no explicit close.
        del self._session


def spinning(opts: ort.SessionOptions, spin_wait: bool, spin_us: int = 0, *, stop_after_run: bool = False) -> None:
    """ORT's intra-op threads spin after a run, waiting for the next. That helps one model running
    batch after batch, but when models take turns on the cores (the compute arbiter) the idle
    model's spinning threads steal the cores the running model needs: measured with
    ``bench/bench_overload.py`` (both default models, 3x embedding load plus chat), goodput 0.41
    with spinning and 0.80 without. ``engine.spin_wait`` turns it back on for a one-model box.

    ``spin_us`` (without ``spin_wait``): spin at most that many microseconds for the next piece of
    work, then sleep (``session.intra_op.spin_duration_us``, backing off up to 8 pauses between
    checks). Inside one run of ~1300 small kernels (a chat decode step) the worker thread then
    catches the next parallel kernel without a futex wake-up; a millisecond after the run it
    sleeps, so an idle model does not keep a core.

    ``stop_after_run`` (an encoder's ``engine.spin_us``): the threads also stop spinning the moment
    a run ends (``session.force_spinning_stop``). A batch is one run with gaps between runs, so
    the spin between runs bought nothing, while the models taking turns after it lost that time."""
    if spin_us > 0 and not spin_wait:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.intra_op.spin_duration_us", str(int(spin_us)))
        opts.add_session_config_entry("session.intra_op.spin_backoff_max", "8")
        if stop_after_run:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        return
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")


def _file_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total
