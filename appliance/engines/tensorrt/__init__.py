"""TensorRT backend (Python API of TensorRT 10.x and 11.x), one module per concern:

- ``plan``: optimization profiles, the plan key and sidecar, the plan cache (pure Python);
- ``build``: the 10.x/11.x builder recipe, builds in a child process, the command line;
- ``run``: binding plans, the 10.x/11.x runtime dispatch and ``TensorRTEngine``.

Only ``run`` and the build child touch TensorRT, and only after ``cuda.probe()`` found a device:
TensorRT objects created without one segfault the process instead of raising.
"""

from __future__ import annotations

from appliance.engines.tensorrt.build import (
    BuildRecipe,
    api_major,
    build_plan,
    build_recipe,
    flag_bits,
    main,
)
from appliance.engines.tensorrt.plan import (
    BuildOptions,
    PlanIncompatible,
    PlanKey,
    Profile,
    ShapeRange,
    cached_plan,
    check_plan,
    find_plan,
    onnx_digest,
    onnx_input_shapes,
    options_from_section,
    plan_key,
    profiles_from_model,
    select_profile,
    sidecar_path,
    timing_cache_path,
    trt_version,
    write_sidecar,
)
from appliance.engines.tensorrt.run import (
    Binding,
    IoDesc,
    TensorRTEngine,
    activation_size,
    binding_plan,
    create_user_managed_context,
    set_context_memory,
)

__all__ = [
    "Binding",
    "BuildOptions",
    "BuildRecipe",
    "IoDesc",
    "PlanIncompatible",
    "PlanKey",
    "Profile",
    "ShapeRange",
    "TensorRTEngine",
    "activation_size",
    "api_major",
    "binding_plan",
    "build_plan",
    "build_recipe",
    "cached_plan",
    "check_plan",
    "create_user_managed_context",
    "find_plan",
    "flag_bits",
    "main",
    "onnx_digest",
    "onnx_input_shapes",
    "options_from_section",
    "plan_key",
    "profiles_from_model",
    "select_profile",
    "set_context_memory",
    "sidecar_path",
    "timing_cache_path",
    "trt_version",
    "write_sidecar",
]
