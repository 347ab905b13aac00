"""Which backend runs a model: TensorRT where it can, ONNX Runtime everywhere else.

TensorRT is used only when the model allows it (``backend: auto`` or ``tensorrt``), the CUDA probe
found a device (creating TensorRT objects without one segfaults the process) and the ``tensorrt``
package imports. The plan is built on first load if no valid cached plan exists (in a child
process, so a builder crash cannot take the server down); ``appliance engines build`` does it
ahead of time. Anything else falls back to ONNX Runtime, with a log line that says why.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from appliance.engines.base import Engine, EngineError
from appliance.engines.onnxruntime import OnnxRuntimeEngine
from appliance.repository import Backend, ModelEntry

log = logging.getLogger(__name__)


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot be used here, or None when it can."""
    from appliance.gpu import cuda

    probe = cuda.probe()
    if not probe.ok:
        return f"no CUDA device ({probe.error})"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    return None


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


def open_engine(entry: ModelEntry, values: dict[str, Any]) -> Engine:
    if entry.spec.backend != Backend.onnxruntime:
        why = tensorrt_unavailable()
        if why is None:
            from appliance.engines.tensorrt import TensorRTEngine

            try:
                return TensorRTEngine(plan_for(entry, values))
            except EngineError as exc:
                why = f"TensorRT failed: {exc}"
        if entry.spec.backend == Backend.tensorrt:
            log.warning("model %s asks for TensorRT but %s; using ONNX Runtime", entry.name, why)
        else:
            log.debug("model %s: %s; using ONNX Runtime", entry.name, why)
    return OnnxRuntimeEngine(
        entry.artefact("model"),
        intra_op_threads=int(values["engine.intra_op_threads"]),
        inter_op_threads=int(values["engine.inter_op_threads"]),
    )
