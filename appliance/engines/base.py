"""The one interface every engine backend implements.

An engine is synchronous and not thread-safe: the scheduler owns one worker thread per engine
instance and calls ``run`` only from it, so the event loop never blocks on inference.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class EngineError(RuntimeError):
    """The engine failed to run a batch (counts as an engine failure for the breaker)."""


class EngineOutOfMemory(EngineError):
    """The engine ran out of device or host memory for this batch; a smaller one may fit."""


class EngineTimeout(EngineError):
    """A batch ran past ``engine.timeout_ms``; the engine may be hung."""


# The KServe v2 datatypes by element type: the names errors and metadata give a tensor's type at
# every layer (the HTTP codec decodes by them; the services name a mismatch by them).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
NAMES = {v: k for k, v in DTYPES.items()}


def datatype_of(dtype: np.dtype) -> str:
    return NAMES.get(dtype, "BYTES")


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one engine input or output.

    ``shape`` holds ``None`` for a dynamic dimension (the batch dimension is always first and
    always dynamic for batching engines).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


class Interface(NamedTuple):
    """A model's inputs and outputs, as its engine shows them (read without loading it, too)."""

    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]


class Engine(abc.ABC):
    """A loaded model artefact that maps named input arrays to named output arrays."""

    backend: str = "abstract"
    # Why a faster backend was not used for this model (TensorRT -> ONNX Runtime CUDA -> ONNX Runtime
    # CPU), set by ``engines.select`` when it stepped down; None when nothing faster was skipped.
    backend_reason: str | None = None

    @property
    def on_gpu(self) -> bool:
        """Whether this engine's weights and activations live in device memory (its memory budget)."""
        return False

    @property
    def backend_name(self) -> str:
        """The backend as operators see it: ``tensorrt``, ``onnxruntime-cuda`` or ``onnxruntime-cpu``."""
        return self.backend

    @property
    @abc.abstractmethod
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> Sequence[TensorSpec]: ...

    @abc.abstractmethod
    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch. Raises EngineError (or EngineOutOfMemory) on failure."""

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this engine holds resident (weights and persistent buffers)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every resource; the engine is unusable afterwards."""

    def input_spec(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output_spec(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)
