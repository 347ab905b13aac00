"""Which backend runs a model: the fastest that works here, and why any faster one did not.

The chain, per model: TensorRT → ONNX Runtime with the CUDA provider → ONNX Runtime on the CPU.

- TensorRT is tried when the model allows it (``backend: auto`` or ``tensorrt``), the CUDA probe
  found a device (TensorRT objects created without one segfault the process) and the ``tensorrt``
  package imports. The plan is built on first load if no valid cached plan exists (in a child
  process, so a builder crash cannot take the server down); ``appliance engines build`` does it
  ahead of time.
- ONNX Runtime CUDA needs the ``onnxruntime-gpu`` build (its CUDA provider) and a device. ONNX
  Runtime falls back to the CPU by itself when the provider's libraries do not load; that shows as
  a session whose first provider is the CPU one, and counts as a step down too.
- ONNX Runtime on the CPU always works.

Each step down is logged once per model and reason (a warning where a GPU is present or the model
asked for TensorRT, since then it costs speed; info on a CPU-only box, where it is expected), and
the reasons travel with the engine (``Engine.backend_reason``) into ``/v1/models/{m}``,
``/admin/stats`` and the console.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.engines.availability import (
    gpu_engines_available,
    onnxruntime_cuda_unavailable,
    tensorrt_unavailable,
)
from appliance.engines.base import Engine, EngineError
from appliance.engines.onnxruntime import OnnxRuntimeEngine
from appliance.repository import Backend, ModelEntry

log = logging.getLogger(__name__)

__all__ = [
    "gpu_engines_available",
    "onnxruntime_cuda_unavailable",
    "open_engine",
    "open_on_chain",
    "tensorrt_unavailable",
]

_logged: set[tuple[str, str, str]] = set()
_logged_lock = threading.Lock()


def expected_backend(entry: ModelEntry) -> str:
    """The backend a load of ``entry`` tries first (``open_engine``'s chain): TensorRT where it
    can run, unless the model asks for ONNX Runtime."""
    if entry.spec.backend != Backend.onnxruntime and tensorrt_unavailable() is None:
        return "tensorrt"
    return "onnxruntime"


def expected_on_gpu(entry: ModelEntry) -> bool:
    """Where ``open_engine`` will most likely put ``entry``, for sizing room before it is loaded."""
    return expected_backend(entry) == "tensorrt" or onnxruntime_cuda_unavailable() is None


def build_options(entry: ModelEntry, values: dict[str, Any]) -> Any:
    from appliance.engines import tensorrt as trt_backend

    inputs = trt_backend.onnx_input_shapes(entry.artefact("model"))
    return trt_backend.options_from_section(
        entry.spec.tensorrt, inputs, max_batch_size=int(values["batching.max_batch_size"])
    )


def plan_for(entry: ModelEntry, values: dict[str, Any], *, force: bool = False) -> Path:
    from appliance.engines import tensorrt as trt_backend

    opts = build_options(entry, values)
    onnx = entry.artefact("model")
    if not force:
        cached = trt_backend.cached_plan(onnx, entry.folder, opts)
        if cached is not None:
            return cached
    log.info("model %s: building a TensorRT plan (first load on this GPU; minutes)", entry.name)
    return trt_backend.build_plan(
        onnx, entry.folder, opts, force=force, progress=lambda line: log.info("tensorrt: %s", line)
    )


def step_down(model: str, skipped: str, why: str, *, costly: bool) -> str:
    """Log (once per model, backend and reason) that ``skipped`` is not used; return the reason."""
    key = (model, skipped, why)
    with _logged_lock:
        first = key not in _logged
        _logged.add(key)
    if first:
        log.log(logging.WARNING if costly else logging.INFO, "model %s: not on %s: %s", model, skipped, why)
    return f"{skipped}: {why}"


def open_on_chain(
    entry: ModelEntry, tensorrt: Callable[[], Engine], onnxruntime: Callable[[bool], Engine]
) -> Engine:
    """Walk the chain for ``entry``: ``tensorrt()`` opens its TensorRT engine, ``onnxruntime(gpu)``
    its ONNX Runtime engine with (``True``) or without the CUDA provider. Each may raise
    EngineError to step down; the CPU one's error is the only one that propagates. The engine
    returned carries ``backend_reason``: each faster backend skipped, and why."""
    reasons: list[str] = []
    from appliance.gpu import cuda

    gpu_here = cuda.probe().ok
    if entry.spec.backend != Backend.onnxruntime:
        why = tensorrt_unavailable()
        if why is None:
            try:
                return tensorrt()
            except EngineError as exc:
                why = f"TensorRT failed: {exc}"
        costly = gpu_here or entry.spec.backend == Backend.tensorrt
        reasons.append(step_down(entry.name, "TensorRT", why, costly=costly))
    why = onnxruntime_cuda_unavailable()
    if why is None:
        try:
            engine = onnxruntime(True)
        except EngineError as exc:
            why = f"the session failed on the GPU: {exc}"
        else:
            if engine.on_gpu:
                return engine
            # ORT dropped the CUDA provider itself (its libraries did not load). The session is
            # reopened with the CPU path's own options (a decoder's CPU-only 4-bit companion).
            engine.close()
            why = "the CUDA provider did not load (missing CUDA/cuDNN libraries; see ONNX Runtime's log)"
    reasons.append(step_down(entry.name, "ONNX Runtime CUDA", why, costly=gpu_here))
    engine = onnxruntime(False)
    engine.backend_reason = "; ".join(reasons) or None
    return engine


def open_engine(entry: ModelEntry, values: dict[str, Any]) -> Engine:
    """The model's engine (an encoder or tensor model) on the first backend that works."""
    intra, inter = int(values["engine.intra_op_threads"]), int(values["engine.inter_op_threads"])
    spin, spin_us = bool(values["engine.spin_wait"]), int(values["engine.spin_us"])

    def tensorrt() -> Engine:
        from appliance.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(plan_for(entry, values))

    def onnxruntime(gpu: bool) -> Engine:
        return OnnxRuntimeEngine(
            entry.artefact("model"),
            prefer_gpu=gpu,
            intra_op_threads=intra,
            inter_op_threads=inter,
            spin_wait=spin,
            spin_us=spin_us,
        )

    return open_on_chain(entry, tensorrt, onnxruntime)
