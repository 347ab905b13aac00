"""Which GPU engines can run on this box, and if not, why: the facts the backend chain and the
memory budget are decided from.

Light on purpose (none of the server packages): ``scripts/gpu-check`` imports it on boxes that
have none of the server's dependencies. ``onnxruntime`` is imported only when asked about.
"""

from __future__ import annotations

import importlib.util


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot be used here, or None when it can."""
    from appliance.gpu import cuda

    probe = cuda.probe()
    if not probe.ok:
        return f"no CUDA device ({probe.error})"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (install.sh --gpu installs it)"
    return None


def onnxruntime_cuda_unavailable() -> str | None:
    """Why ONNX Runtime cannot run on the GPU here, or None when it can."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)"
    from appliance.gpu import cuda

    probe = cuda.probe()
    if not probe.ok:
        return f"no CUDA device ({probe.error})"
    return None


def gpu_engines_available() -> bool:
    """Whether any model can run on a GPU engine here: then the memory budget is the device's."""
    return tensorrt_unavailable() is None or onnxruntime_cuda_unavailable() is None


def chain() -> list[tuple[str, str | None]]:
    """The backend chain on this box, fastest first: (backend, why it cannot run here or None)."""
    return [
        ("tensorrt", tensorrt_unavailable()),
        ("onnxruntime-cuda", onnxruntime_cuda_unavailable()),
        ("onnxruntime-cpu", None),
    ]
