"""GPU layer: plan cache keys, profiles, binding plans, TensorRT 10/11 dispatch, CUDA probe, NVML, gpu-check.

TensorRT cannot be installed on the CPU dev boxes (its libraries come only from NVIDIA's index) and
creating TensorRT objects without a GPU segfaults, so the TensorRT-facing code is exercised here
against small fakes of the ``tensorrt`` module (enums, engine, context) and of device memory (numpy
arrays). What only a real GPU can show is in the ``@pytest.mark.gpu`` tests at the end, skipped
when the CUDA probe finds no device.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from appliance.engines import tensorrt as trt_mod
from appliance.engines.base import EngineError, EngineOutOfMemory
from appliance.engines.tensorrt import (
    BuildOptions,
    IoDesc,
    PlanIncompatible,
    PlanKey,
    ShapeRange,
    binding_plan,
    build_recipe,
    check_plan,
    profiles_from_model,
    select_profile,
)
from appliance.gpu import cuda, nvml
from appliance.gpu.cuda import CudaError, DeviceInfo, GpuProbe

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu-check"
PROBE = cuda.probe()
needs_gpu = pytest.mark.skipif(not PROBE.ok, reason=f"needs an NVIDIA GPU ({PROBE.error})")
no_gpu_here = pytest.mark.skipif(PROBE.ok, reason="this machine has a GPU")


def load_gpu_check() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(GPU_CHECK))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


FAKE_GPU = GpuProbe(1, (DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, 132),), 13000, 13000)
PROFILE = {"input_ids": ShapeRange((1, 1), (8, 128), (32, 512))}


def key(**changes: Any) -> PlanKey:
    base = PlanKey(
        "ab" * 32, "NVIDIA H100 80GB HBM3", (9, 0), "11.4.0.106", BuildOptions(profiles=(PROFILE,))
    )
    return PlanKey(**{**base.__dict__, **changes})


# --- plan cache ----------------------------------------------------------------------------------


def test_plan_key_changes_with_every_field() -> None:
    base = key()
    variants = [
        key(onnx_sha256="cd" * 32),
        key(gpu_name="NVIDIA L4"),
        key(compute_capability=(8, 9)),
        key(trt_version="10.16.1.11"),
        key(options=BuildOptions(fp16=True, profiles=(PROFILE,))),
        key(options=BuildOptions(workspace_bytes=2 << 30, profiles=(PROFILE,))),
        key(options=BuildOptions(opt_level=5, profiles=(PROFILE,))),
        key(options=BuildOptions(profiles=({"input_ids": ShapeRange((1, 1), (8, 64), (32, 512))},))),
        key(options=BuildOptions(profiles=(PROFILE, PROFILE))),
    ]
    digests = {v.digest() for v in variants} | {base.digest()}
    assert len(digests) == len(variants) + 1
    assert len({v.plan_name() for v in variants} | {base.plan_name()}) == len(variants) + 1
    assert key().digest() == base.digest()  # deterministic
    assert base.plan_name().startswith("model.trt11.4.0.106.sm90.") and base.plan_name().endswith(".plan")


def test_profile_order_does_not_change_the_key() -> None:
    a = {"a": ShapeRange((1,), (2,), (3,)), "b": ShapeRange((1,), (1,), (1,))}
    b = dict(reversed(list(a.items())))
    assert (
        key(options=BuildOptions(profiles=(a,))).digest() == key(options=BuildOptions(profiles=(b,))).digest()
    )


def test_build_options_round_trip_json() -> None:
    opts = BuildOptions(fp16=True, workspace_bytes=123, opt_level=2, profiles=(PROFILE,))
    assert BuildOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts


def test_sidecar_detects_missing_stale_foreign_and_truncated(tmp_path: Path) -> None:
    k = key()
    plan = tmp_path / k.plan_name()
    assert check_plan(plan, k) == "no plan"
    plan.write_bytes(b"plan-bytes")
    assert "no readable sidecar" in (check_plan(plan, k) or "")
    trt_mod.write_sidecar(plan, k)
    assert check_plan(plan, k) is None
    assert trt_mod.find_plan(tmp_path, k) == plan
    stale = check_plan(plan, key(trt_version="10.16.1.11"))
    assert stale is not None and "trt_version '11.4.0.106' != '10.16.1.11'" in stale
    foreign = check_plan(plan, key(gpu_name="NVIDIA L4", compute_capability=(8, 9)))
    assert foreign is not None and "gpu_name" in foreign and "compute_capability" in foreign
    assert "build options differ" in (check_plan(plan, key(options=BuildOptions())) or "")
    plan.write_bytes(b"plan")
    assert "size differs" in (check_plan(plan, k) or "")
    trt_mod.sidecar_path(plan).write_text("{not json")
    assert "no readable sidecar" in (check_plan(plan, k) or "")


def test_onnx_digest_covers_external_data(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    first = trt_mod.onnx_digest(model)
    model.with_name("model.onnx.data").write_bytes(b"weights")
    second = trt_mod.onnx_digest(model)
    model.write_bytes(b"graph2")
    assert len({first, second, trt_mod.onnx_digest(model)}) == 3


# --- profiles ------------------------------------------------------------------------------------


def test_default_profiles_from_onnx_dynamic_dims(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    shapes = trt_mod.onnx_input_shapes(load_gpu_check().tiny_model(tmp_path / "tiny.onnx"))
    assert shapes == {"input_ids": ("batch", "seq"), "bias": ("batch", 8)}
    (prof,) = profiles_from_model(shapes, max_batch_size=16, max_sequence=256)
    assert prof["input_ids"] == ShapeRange((1, 1), (16, 128), (16, 256))
    assert prof["bias"] == ShapeRange((1, 8), (16, 8), (16, 8))


def test_static_inputs_get_no_profile() -> None:
    assert profiles_from_model({"x": (1, 3, 224, 224)}) == ()
    (prof,) = profiles_from_model({"x": (None, 3), "y": (4,)}, max_batch_size=8)
    assert set(prof) == {"x"} and prof["x"] == ShapeRange((1, 3), (8, 3), (8, 3))


def test_declared_profiles_override_and_fill_defaults() -> None:
    inputs = {"input_ids": (-1, -1), "attention_mask": (-1, -1)}
    short = {"input_ids": {"min": [1, 1], "opt": [32, 64], "max": [32, 128]}}
    long = {
        "input_ids": {"min": [1, 129], "opt": [4, 512], "max": [8, 512]},
        "attention_mask": {"min": [1, 129], "opt": [4, 512], "max": [8, 512]},
    }
    p_short, p_long = profiles_from_model(inputs, [short, long], max_batch_size=32, max_sequence=512)
    assert p_short["input_ids"] == ShapeRange((1, 1), (32, 64), (32, 128))
    assert p_short["attention_mask"] == ShapeRange((1, 1), (32, 128), (32, 512))  # default
    assert p_long["attention_mask"].min == (1, 129)
    (single,) = profiles_from_model(inputs, short)  # one dict = one profile
    assert single["input_ids"].max == (32, 128)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"nope": {"min": [1], "opt": [1], "max": [1]}}, "no model input named"),
        ({"x": {"min": [1, 4], "opt": [1, 4], "max": [2, 4]}}, "does not fit"),  # static dim 3
        ({"x": {"min": [1], "opt": [1], "max": [1]}}, "does not fit"),  # rank
        ({"x": {"min": [2, 3], "opt": [1, 3], "max": [4, 3]}}, "min <= opt <= max"),
        ({"x": {"min": [1, 3], "max": [4, 3]}}, "min, opt and max"),
    ],
)
def test_bad_declared_profiles_are_rejected(declared: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        profiles_from_model({"x": (-1, 3)}, declared)


def test_options_from_model_yaml_section() -> None:
    opts = trt_mod.options_from_section(
        {"fp16": True, "workspace_mb": 512, "max_sequence": 256}, {"ids": ("b", "s")}, max_batch_size=8
    )
    assert opts.fp16 and opts.workspace_bytes == 512 << 20
    assert opts.profiles[0]["ids"] == ShapeRange((1, 1), (8, 128), (8, 256))
    with pytest.raises(ValueError, match="unknown tensorrt setting"):
        trt_mod.options_from_section({"int8": True}, {}, max_batch_size=8)


def test_select_profile_picks_the_tightest_fit() -> None:
    small = {"ids": ShapeRange((1, 1), (8, 64), (8, 128))}
    large = {"ids": ShapeRange((1, 1), (32, 256), (32, 512))}
    long_only = {"ids": ShapeRange((1, 129), (4, 512), (4, 512))}
    profiles = [large, small, long_only]
    assert select_profile(profiles, {"ids": (4, 100)}) == 1
    assert select_profile(profiles, {"ids": (16, 100)}) == 0
    assert select_profile(profiles, {"ids": (2, 300)}) == 2  # tighter than `large`
    assert select_profile([large, large], {"ids": (1, 1)}) == 0  # ties: lowest index
    assert select_profile(profiles, {"ids": (4, 100), "static": (1,)}) == 1  # inputs without ranges ignored
    with pytest.raises(ValueError, match="no optimization profile admits"):
        select_profile(profiles, {"ids": (64, 10)})


# --- binding plans -------------------------------------------------------------------------------

IO = [
    IoDesc("input_ids", np.dtype(np.int64), (-1, -1), True),
    IoDesc("bias", np.dtype(np.float32), (-1, 8), True),
    IoDesc("pooled", np.dtype(np.float32), (-1, 8), False),
    IoDesc("logits", np.dtype(np.float16), (-1, -1, 3), False),
]


def feeds(batch: int, seq: int, ids_dtype: type = np.int32) -> dict[str, np.ndarray]:
    return {"input_ids": np.ones((batch, seq), ids_dtype), "bias": np.zeros((batch, 8), np.float32)}


def test_binding_plan_uses_engine_dtypes_and_per_batch_shapes() -> None:
    for batch, seq in ((1, 7), (12, 64)):
        plan = {b.name: b for b in binding_plan(IO, feeds(batch, seq))}
        assert plan["input_ids"].dtype == np.int64  # int32 ids are widened for an int64 engine input
        assert plan["input_ids"].shape == (batch, seq) and plan["input_ids"].mode == "input"
        assert plan["input_ids"].nbytes == batch * seq * 8
        assert plan["pooled"].shape == (batch, 8) and plan["pooled"].mode == "output"
        assert plan["logits"].shape == (batch, -1, 3)  # unknown until the context infers it
        assert plan["logits"].dtype == np.float16


def test_binding_plan_with_context_shapes_and_selected_outputs() -> None:
    plan = binding_plan(IO, feeds(2, 5), ["logits"], {"pooled": (2, 8), "logits": (2, 5, 3)})
    modes = {b.name: (b.mode, b.shape) for b in plan}
    assert modes["logits"] == ("output", (2, 5, 3))
    assert modes["pooled"] == ("unused", (2, 8))  # still bound: TensorRT writes every output


@pytest.mark.parametrize(
    ("bad", "names", "message"),
    [
        ({"bias": np.zeros((1, 8), np.float32)}, None, "missing input 'input_ids'"),
        ({**feeds(1, 2), "extra": np.zeros(1)}, None, "unknown input"),
        ({**feeds(1, 2), "bias": np.zeros((1, 9), np.float32)}, None, "expects"),
        ({**feeds(1, 2), "bias": np.zeros((1, 8, 1), np.float32)}, None, "expects"),
        ({**feeds(1, 2), "input_ids": np.ones((1, 2), np.float32)}, None, "the engine takes int64"),
        (feeds(1, 2), ["nope"], "unknown output"),
    ],
)
def test_binding_plan_rejects_bad_feeds(
    bad: dict[str, np.ndarray], names: list[str] | None, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        binding_plan(IO, bad, names)


# --- TensorRT 10 / 11 dispatch -------------------------------------------------------------------
# Fakes of the two enums as each major defines them (values from the TensorRT sources), because
# TensorRT itself cannot be installed here.


class Flags10(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1
    PREFER_AOT_PYTHON_PLUGINS = 2
    PREFER_JIT_PYTHON_PLUGINS = 3


class Flags11(enum.IntEnum):
    STRONGLY_TYPED = 0
    PREFER_JIT_PYTHON_PLUGINS = 1
    PREFER_AOT_PYTHON_PLUGINS = 2


class Builder10(enum.IntEnum):
    FP16 = 0
    BF16 = 1
    INT8 = 2
    TF32 = 6


class Builder11(enum.IntEnum):  # no precision flags at all
    DEBUG = 0
    TF32 = 5


def fake_trt(version: str) -> Any:
    ten = version.startswith("10.")
    return types.SimpleNamespace(
        __version__=version,
        NetworkDefinitionCreationFlag=Flags10 if ten else Flags11,
        BuilderFlag=Builder10 if ten else Builder11,
    )


def test_api_major() -> None:
    assert trt_mod.api_major("10.16.1.11") == 10
    assert trt_mod.api_major("11.4.0.106") == 11
    assert trt_mod.api_major("12.0.0") == 11
    with pytest.raises(EngineError, match="not supported"):
        trt_mod.api_major("8.6.1")


def test_flag_bits_only_for_existing_members() -> None:
    assert trt_mod.flag_bits(Flags10, ["STRONGLY_TYPED"]) == 1 << 1
    assert trt_mod.flag_bits(Flags11, ["STRONGLY_TYPED"]) == 1 << 0  # the value moved
    assert trt_mod.flag_bits(Flags11, ["EXPLICIT_BATCH", "STRONGLY_TYPED"]) == 1  # gone in 11: skipped


def test_build_recipe_trt10() -> None:
    fp32 = build_recipe(fake_trt("10.16.1.11"), BuildOptions())
    assert (fp32.api, fp32.network_flags, fp32.builder_flags, fp32.strongly_typed) == (10, 2, (), True)
    fp16 = build_recipe(fake_trt("10.16.1.11"), BuildOptions(fp16=True))
    # FP16 flag needs a weakly typed network (flags 0), as on Jetson.
    assert (fp16.network_flags, fp16.builder_flags, fp16.strongly_typed) == (0, (Builder10.FP16,), False)


def test_build_recipe_trt11_takes_precision_from_onnx() -> None:
    for fp16 in (False, True):
        r = build_recipe(fake_trt("11.4.0.106"), BuildOptions(fp16=fp16))
        # Builder11 has no FP16: touching it would raise AttributeError.
        assert (r.api, r.network_flags, r.builder_flags, r.strongly_typed) == (11, 0, (), True)
        assert bool(r.notes) == fp16 and (not fp16 or "ONNX" in r.notes[0])


def test_runtime_dispatch_for_removed_apis() -> None:
    calls: list[Any] = []

    def create_context(strategy: str) -> str:
        calls.append(("strategy", strategy))
        return "ctx"

    v11_engine = types.SimpleNamespace(device_memory_size_v2=4096, create_execution_context=create_context)
    v10_old = types.SimpleNamespace(
        device_memory_size=1024, create_execution_context_without_device_memory=lambda: "old-ctx"
    )
    strategy = types.SimpleNamespace(
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="UM")
    )
    assert trt_mod.activation_size(v11_engine) == 4096 and trt_mod.activation_size(v10_old) == 1024
    assert trt_mod.create_user_managed_context(strategy, v11_engine) == "ctx" and calls == [
        ("strategy", "UM")
    ]
    assert trt_mod.create_user_managed_context(types.SimpleNamespace(), v10_old) == "old-ctx"
    new_ctx = types.SimpleNamespace(set_device_memory=lambda p, n: calls.append((p, n)))
    trt_mod.set_context_memory(new_ctx, 0x1000, 4096)
    old_ctx = types.SimpleNamespace(device_memory=None)
    trt_mod.set_context_memory(old_ctx, 0x2000, 4096)
    assert calls[-1] == (0x1000, 4096) and old_ctx.device_memory == 0x2000


# --- CUDA layer without a GPU --------------------------------------------------------------------


@no_gpu_here
def test_probe_reports_an_error_instead_of_raising() -> None:
    p = cuda.probe(refresh=True)
    assert not p.ok and p.count == 0 and p.error
    if cuda.available():
        assert p.error.startswith("cuda") and p.error_code is not None  # e.g. cudaErrorInsufficientDriver
    assert p.describe().startswith("no CUDA device: ")
    json.dumps(p.as_dict())


@no_gpu_here
@pytest.mark.skipif(not cuda.available(), reason="cuda-python is not installed (extra gpu)")
def test_cuda_calls_without_a_device_raise_cuda_error() -> None:
    for fn in (
        lambda: cuda.DeviceBuffer(16),
        lambda: cuda.PinnedBuffer(16),
        cuda.Stream,
        lambda: cuda.mem_info(0),
    ):
        with pytest.raises(CudaError) as info:
            fn()
        assert info.value.name.startswith("cudaError")
    with cuda.DeviceBuffer(0) as empty:  # needs no call at all
        assert empty.ptr == 0


@pytest.mark.skipif(not cuda.available(), reason="cuda-python is not installed (extra gpu)")
def test_check_unwraps_results_and_names_errors() -> None:
    from cuda.bindings import runtime as rt

    ok = rt.cudaError_t.cudaSuccess
    assert cuda.check((ok, 7)) == 7 and cuda.check((ok, 1, 2)) == (1, 2) and cuda.check(ok) is None
    with pytest.raises(CudaError, match=r"cudaMalloc: cudaErrorMemoryAllocation \(2\)") as info:
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    assert info.value.out_of_memory


def test_probe_without_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_rt", None)
    monkeypatch.setattr(cuda, "_IMPORT_ERROR", "cuda-python is not installed (test)")
    p = cuda.probe(refresh=True)
    assert not p.ok and "not installed" in (p.error or "")
    with pytest.raises(CudaError, match="PythonBindingsMissing"):
        cuda.DeviceBuffer(1)
    monkeypatch.undo()
    cuda.probe(refresh=True)


def test_engine_and_build_refuse_without_gpu(tmp_path: Path) -> None:
    no_gpu = GpuProbe(error="cudaErrorInsufficientDriver", error_code=35)
    was_imported = "tensorrt" in sys.modules
    with pytest.raises(EngineError, match="no CUDA device: cudaErrorInsufficientDriver"):
        trt_mod.TensorRTEngine(tmp_path / "x.plan", gpu=no_gpu)
    with pytest.raises(EngineError, match="no CUDA device"):
        trt_mod.build_plan(tmp_path / "x.onnx", tmp_path, gpu=no_gpu)
    assert ("tensorrt" in sys.modules) == was_imported  # refused before touching TensorRT


def test_child_build_without_gpu_exits_cleanly(tmp_path: Path) -> None:
    if PROBE.ok:
        pytest.skip("this machine has a GPU")
    args = ["--onnx", "x.onnx", "--out", "x.plan", "--options", "{}", "--timing-cache", str(tmp_path / "t")]
    r = subprocess.run(
        [sys.executable, "-m", "appliance.engines.tensorrt", "build-child", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert r.returncode == 2 and "no CUDA device" in r.stdout


# --- build orchestration (child replaced) --------------------------------------------------------


def test_build_plan_caches_and_rebuilds_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"fake onnx")
    builds: list[list[str]] = []

    def fake_child(cmd: list[str], timeout_s: float, report: Any) -> tuple[int, list[str]]:
        builds.append(cmd)
        report("phase Building (3 steps)")
        Path(cmd[cmd.index("--out") + 1]).write_bytes(b"serialized plan")
        return 0, []

    monkeypatch.setattr(trt_mod, "_run_child", fake_child)
    monkeypatch.setattr(trt_mod, "trt_version", lambda: "11.4.0.106")
    opts = BuildOptions(profiles=(PROFILE,))
    assert trt_mod.cached_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU) is None
    lines: list[str] = []
    plan = trt_mod.build_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU, progress=lines.append)
    assert plan.read_bytes() == b"serialized plan" and len(builds) == 1
    assert any("phase Building" in line for line in lines)
    cmd = builds[0]
    assert cmd[1:4] == ["-m", "appliance.engines.tensorrt", "build-child"]
    assert BuildOptions.from_json(json.loads(cmd[cmd.index("--options") + 1])) == opts
    assert "timing.trt11.4.0.106.sm90.nvidia-h100-80gb-hbm3.cache" in cmd[cmd.index("--timing-cache") + 1]
    assert trt_mod.build_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU) == plan and len(builds) == 1
    assert trt_mod.cached_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU) == plan
    assert (
        trt_mod.build_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU, force=True) == plan
        and len(builds) == 2
    )
    assert check_plan(plan, trt_mod.plan_key(onnx, opts, gpu=FAKE_GPU)) is None
    # A sidecar from another machine with the same file name: rebuilt, never loaded.
    side = trt_mod.sidecar_path(plan)
    data = json.loads(side.read_text())
    data["key"]["gpu_name"] = "NVIDIA A100"
    side.write_text(json.dumps(data))
    assert trt_mod.build_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU) == plan and len(builds) == 3
    onnx.write_bytes(b"changed onnx")  # new digest -> new plan name
    assert trt_mod.build_plan(onnx, tmp_path / "out", opts, gpu=FAKE_GPU) != plan and len(builds) == 4
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_build_plan_reports_a_crashed_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"fake onnx")
    monkeypatch.setattr(trt_mod, "_run_child", lambda cmd, t, r: (-11, ["parsing model.onnx"]))
    monkeypatch.setattr(trt_mod, "trt_version", lambda: "10.16.1.11")
    with pytest.raises(EngineError, match=r"crashed \(SIGSEGV\): parsing model.onnx"):
        trt_mod.build_plan(onnx, tmp_path, BuildOptions(profiles=(PROFILE,)), gpu=FAKE_GPU)
    assert not list(tmp_path.glob("*.plan*"))


def test_run_child_streams_output_and_enforces_timeout() -> None:
    lines: list[str] = []
    code = "import os, signal; print('one', flush=True); print('two', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    rc, tail = trt_mod._run_child([sys.executable, "-c", code], 30, lines.append)
    assert rc == -11 and lines == ["one", "two"] and tail == ["one", "two"]
    with pytest.raises(EngineError, match="timed out"):
        trt_mod._run_child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, lines.append)


# --- TensorRTEngine against a fake TensorRT ------------------------------------------------------


class FakeDevice(cuda.DeviceBuffer):
    """Device memory stood in for by a numpy array (real addresses, so ctypes copies work)."""

    fail_over: int | None = None

    def __init__(self, nbytes: int) -> None:
        if FakeDevice.fail_over is not None and nbytes > FakeDevice.fail_over:
            raise CudaError(2, "cudaErrorMemoryAllocation", f"cudaMalloc({nbytes})")
        self.nbytes, self._mem = nbytes, np.zeros(max(nbytes, 1), np.uint8)
        self.ptr = int(self._mem.ctypes.data) if nbytes else 0
        self._closed = False

    def _release(self) -> None:
        self.ptr = 0


class FakePinned(cuda.PinnedBuffer):
    def __init__(self, nbytes: int) -> None:
        self.nbytes, self._mem = nbytes, np.zeros(max(nbytes, 1), np.uint8)
        self.array = self._mem[:nbytes]
        self.ptr = int(self._mem.ctypes.data)
        self._closed = False

    def _release(self) -> None:
        self.array = np.empty(0, np.uint8)


class FakeStream:
    handle = 0

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


def _memory(ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(memoryview((ctypes.c_char * n).from_address(ptr)), dtype=dtype).reshape(shape)


class FakeContext:
    """pooled = bias + sum(input_ids, axis=1); count = sequence length (int32), per row."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.profile = 0
        self.memory: tuple[int, int] | None = None

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self) -> list[str]:
        return [n for n in ("input_ids", "bias") if n not in self.shapes]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch = self.shapes["input_ids"][0]
        return {"pooled": (batch, 8), "count": (batch,)}.get(name) or self.shapes[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return ptr != 0

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        assert nbytes >= self.engine.device_memory_size_v2
        self.memory = (ptr, nbytes)

    def execute_async_v3(self, stream: int) -> bool:
        assert self.memory is not None, "USER_MANAGED context enqueued without scratch memory"
        assert set(self.addresses) == {"input_ids", "bias", "pooled", "count"}
        ids = _memory(self.addresses["input_ids"], np.dtype(np.int64), self.shapes["input_ids"])
        bias = _memory(self.addresses["bias"], np.dtype(np.float32), self.shapes["bias"])
        batch, seq = ids.shape
        _memory(self.addresses["pooled"], np.dtype(np.float32), (batch, 8))[:] = bias + ids.sum(1)[:, None]
        _memory(self.addresses["count"], np.dtype(np.int32), (batch,))[:] = seq
        return True


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
    device_memory_size_v2 = 4096
    num_io_tensors = len(IO)
    num_optimization_profiles = len(PROFILES)

    def __init__(self) -> None:
        self.desc = {name: (dt, shape, is_in) for name, dt, shape, is_in in self.IO}

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

    def create_execution_context(self, strategy: str) -> FakeContext:
        assert strategy == "USER_MANAGED"
        self.context = FakeContext(self)
        return self.context


def fake_tensorrt_module() -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = "11.4.0.106"  # type: ignore[attr-defined]

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None: ...

    class Runtime:
        def __init__(self, logger: Any) -> None:
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            return FakeEngine() if data == b"fake-plan" else None

    m.ILogger, m.Runtime = ILogger, Runtime  # type: ignore[attr-defined]
    m.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    m.TensorLocation = types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST")  # type: ignore[attr-defined]
    m.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")  # type: ignore[attr-defined]
    m.nptype = lambda dt: dt  # type: ignore[attr-defined]
    return m


@pytest.fixture
def fake_trt_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module())
    monkeypatch.setattr(trt_mod, "_trt_logger", None)
    monkeypatch.setattr(trt_mod, "DeviceBuffer", FakeDevice)
    monkeypatch.setattr(trt_mod, "PinnedBuffer", FakePinned)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)

    def copy(dst: Any, src: Any, stream: Any) -> None:
        if isinstance(src, np.ndarray):
            ctypes.memmove(int(dst), src.ctypes.data, src.nbytes)
        else:
            ctypes.memmove(dst.ctypes.data, int(src), dst.nbytes)

    monkeypatch.setattr(cuda, "memcpy_htod_async", copy)
    monkeypatch.setattr(cuda, "memcpy_dtoh_async", copy)
    monkeypatch.setattr(FakeDevice, "fail_over", None)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"fake-plan")
    return plan


def test_engine_runs_batches_through_bindings(fake_trt_env: Path) -> None:
    engine = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    assert [s.describe() for s in engine.inputs] == ["input_ids: int64[?, ?]", "bias: float32[?, 8]"]
    assert [s.describe() for s in engine.outputs] == ["pooled: float32[?, 8]", "count: int32[?]"]
    assert len(engine.profiles) == 2 and engine.activation_bytes() == 4096
    ctx = engine._context
    for batch, seq, profile in ((2, 5, 0), (20, 100, 1), (3, 4, 0)):
        ids = np.arange(batch * seq, dtype=np.int32).reshape(batch, seq)  # int32 in, int64 engine input
        bias = np.full((batch, 8), 0.5, np.float32)
        out = engine.run({"input_ids": ids, "bias": bias})
        assert ctx.profile == profile
        np.testing.assert_allclose(out["pooled"], bias + ids.sum(1)[:, None])
        assert out["count"].dtype == np.int32 and out["count"].tolist() == [seq] * batch
    only = engine.run({"input_ids": ids, "bias": bias}, ["count"])
    assert list(only) == ["count"]
    first = engine.run({"input_ids": ids, "bias": bias})["pooled"]
    engine.run({"input_ids": ids + 1, "bias": bias})
    assert first[0, 0] == bias[0, 0] + ids[0].sum()  # results are copies, not the reused pinned buffers
    assert engine.memory_bytes() > len(b"fake-plan") + 4096  # plan + private arena + I/O buffers
    with pytest.raises(EngineError, match="no optimization profile admits"):
        engine.run({"input_ids": np.ones((2, 500), np.int64), "bias": np.zeros((2, 8), np.float32)})
    with pytest.raises(EngineError, match="missing input"):
        engine.run({"input_ids": ids})
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.run({"input_ids": ids, "bias": bias})


def test_engine_uses_a_shared_activation_arena(fake_trt_env: Path) -> None:
    arena = FakeDevice(8192)
    a = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU, activation=arena)
    b = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    b.set_activation(arena)  # the memory manager's order: load, read activation_bytes(), then share
    assert a._context.memory == b._context.memory == (arena.ptr, 8192)
    assert a._own_arena is None and b._own_arena is None
    a.run({"input_ids": np.ones((1, 2), np.int64), "bias": np.zeros((1, 8), np.float32)})
    with pytest.raises(EngineError, match="arena of 1024 bytes < 4096 needed"):
        a.set_activation(FakeDevice(1024))
    a.close()
    b.close()
    assert arena.ptr != 0  # the shared arena belongs to the memory manager, not to the engines


def test_engine_maps_cuda_oom_and_refuses_foreign_plans(fake_trt_env: Path) -> None:
    engine = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    FakeDevice.fail_over = 4096
    with pytest.raises(EngineOutOfMemory, match="cudaErrorMemoryAllocation"):
        engine.run({"input_ids": np.ones((32, 128), np.int64), "bias": np.zeros((32, 8), np.float32)})
    engine.close()
    fake_trt_env.write_bytes(b"plan from another TensorRT")
    with pytest.raises(PlanIncompatible, match="rebuild"):
        trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)


# --- NVML ----------------------------------------------------------------------------------------


def _nvml_works() -> bool:
    return bool(nvml.GpuSampler().available)


@pytest.mark.skipif(_nvml_works(), reason="NVML works on this machine")
def test_sampler_reports_no_gpu_once(caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    caplog.set_level(logging.INFO, logger="appliance.gpu.nvml")
    sampler = nvml.GpuSampler(interval_s=0.01)
    sampler.start()
    snaps = [sampler.sample(), sampler.snapshot(), sampler.sample()]
    assert sampler._thread is None  # nothing to sample: no thread
    sampler.stop()
    assert all(s["available"] is False and s["reason"] for s in snaps)
    assert snaps[0]["reason"].startswith(("NVMLError", "RuntimeError"))
    records = [r for r in caplog.records if r.name == "appliance.gpu.nvml"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    registry = CollectorRegistry()
    nvml.register_gpu_metrics(registry, sampler)
    text = generate_latest(registry).decode()
    assert "# TYPE appliance_gpu_power_watts gauge" in text and 'gpu="' not in text


class FakeNvml(types.SimpleNamespace):
    """pynvml as seen on a one-GPU box where temperature is not supported."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0


def fake_pynvml() -> FakeNvml:
    def unsupported(*args: Any) -> None:
        raise FakeNvml.NVMLError("Not Supported")

    proc = types.SimpleNamespace
    return FakeNvml(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlSystemGetDriverVersion=lambda: "580.1",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=5),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 << 30, total=80 << 30, free=77 << 30),
        nvmlDeviceGetTemperatureV=unsupported,
        nvmlDeviceGetTemperature=unsupported,
        nvmlDeviceGetPowerUsage=lambda h: 123_456,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            proc(pid=os.getpid(), usedGpuMemory=1 << 30),
            proc(pid=1, usedGpuMemory=2 << 30),
        ],
    )


def test_sampler_readings_and_prometheus_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    monkeypatch.setattr(nvml, "_nvml", fake_pynvml())
    sampler = nvml.GpuSampler(interval_s=0.01)
    sampler.start()
    try:
        snap = sampler.snapshot()
        assert snap["available"] and snap["driver_version"] == "580.1"
        (gpu,) = snap["gpus"]
        assert gpu == {
            "index": 0,
            "name": "NVIDIA H100",
            "utilization_ratio": 0.37,
            "memory_used_bytes": 3 << 30,
            "memory_total_bytes": 80 << 30,
            "temperature_celsius": None,
            "power_watts": 123.456,
            "process_memory_bytes": 1 << 30,
        }
        registry = CollectorRegistry()
        nvml.register_gpu_metrics(registry, sampler)
        text = generate_latest(registry).decode()
    finally:
        sampler.stop()
    assert 'appliance_gpu_utilization_ratio{gpu="0"} 0.37' in text
    assert 'appliance_gpu_process_memory_bytes{gpu="0"} 1.073741824e+09' in text
    assert 'appliance_gpu_power_watts{gpu="0"} 123.456' in text
    assert 'appliance_gpu_temperature_celsius{gpu="0"}' not in text  # unsupported: no sample, not 0


# --- gpu-check -----------------------------------------------------------------------------------


def test_gpu_check_cpu_run_skips_cleanly_without_server_dependencies(tmp_path: Path) -> None:
    # Block the server's own dependencies: the script must run on a box that has none of them.
    runner = (
        "import sys, runpy\n"
        "for m in ('aiohttp', 'yaml', 'pydantic', 'prometheus_client'): sys.modules[m] = None\n"
        f"sys.argv = [{str(GPU_CHECK)!r}]\n"
        f"runpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", runner], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    steps = [line for line in lines if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIPPED")]
    assert len(steps) == 6 and not any(line.startswith("FAIL") for line in steps)
    assert lines[-1].startswith("gpu-check: ")
    if not PROBE.ok:
        skipped = {line.split(":")[0].split(None, 1)[1] for line in steps if line.startswith("SKIPPED")}
        assert {"cuda probe", "cuda round trip", "tensorrt"} <= skipped
        assert "SKIPPED  cuda probe: no CUDA device: " in r.stdout


def test_gpu_check_is_importable() -> None:
    module = load_gpu_check()
    assert callable(module.main) and callable(module.tiny_model)


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_gpu_round_trip_and_nvml(tmp_path: Path) -> None:
    check = load_gpu_check().Check(True, tmp_path)
    check.run("cuda probe", check.cuda_probe)
    check.run("nvml", check.nvml)
    check.run("cuda round trip", check.round_trip)
    assert [r[0] for r in check.results] == ["PASS"] * 3, check.results


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed")
def test_gpu_tensorrt_matches_onnxruntime(tmp_path: Path) -> None:
    check = load_gpu_check().Check(True, tmp_path)
    check.run("cuda probe", check.cuda_probe)
    check.run("onnx model", check.onnx_model)
    check.run("tensorrt", check.tensorrt)
    assert [r[0] for r in check.results] == ["PASS"] * 3, check.results
