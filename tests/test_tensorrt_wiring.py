"""Wiring tests of the TensorRT backend: its calls into TensorRT, checked against fakes.

TensorRT cannot be installed on the CPU machines this project is built and tested on, and its
objects segfault without a GPU. So these tests run ``appliance.engines.tensorrt`` against
``tests/fake_tensorrt.py``, a stand-in that enforces the call contract NVIDIA documents for
TensorRT 10.x and 11.x (device memory before enqueue and large enough for the active profile,
input shapes set again after a profile switch and inside the profile, an aligned address of a big
enough buffer for every I/O tensor, no scratch shared with an unfinished execution) and raises
``ContractViolation`` when the engine breaks it. They prove the wiring, not TensorRT's numbers:
``scripts/gpu-check --require-gpu`` and ``pytest -m gpu`` do that on a GPU.
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.engines import tensorrt as trt_mod
from appliance.engines.base import EngineError, EngineOutOfMemory
from appliance.engines.tensorrt import (
    BuildOptions,
    IoDesc,
    PlanIncompatible,
    ShapeRange,
    binding_plan,
    build_recipe,
    check_plan,
)
from appliance.engines.tensorrt import build as build_mod
from appliance.engines.tensorrt import plan as plan_mod
from appliance.engines.tensorrt import run as run_mod
from appliance.gpu import cuda
from appliance.gpu.cuda import DeviceInfo, GpuProbe
from tests.fake_tensorrt import (
    ContractViolation,
    FakeContext,
    FakeDevice,
    FakePinned,
    FakeStream,
    fake_tensorrt_module,
)

ROOT = Path(__file__).resolve().parents[1]
PROBE = cuda.probe()
FAKE_GPU = GpuProbe(1, (DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, 132),), 13000, 13000)
PROFILE = {"input_ids": ShapeRange((1, 1), (8, 128), (32, 512))}


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

    monkeypatch.setattr(build_mod, "_run_child", fake_child)
    monkeypatch.setattr(plan_mod, "trt_version", lambda: "11.4.0.106")
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
    monkeypatch.setattr(build_mod, "_run_child", lambda cmd, t, r: (-11, ["parsing model.onnx"]))
    monkeypatch.setattr(plan_mod, "trt_version", lambda: "10.16.1.11")
    with pytest.raises(EngineError, match=r"crashed \(SIGSEGV\): parsing model.onnx"):
        trt_mod.build_plan(onnx, tmp_path, BuildOptions(profiles=(PROFILE,)), gpu=FAKE_GPU)
    assert not list(tmp_path.glob("*.plan*"))


def test_run_child_streams_output_and_enforces_timeout() -> None:
    lines: list[str] = []
    code = "import os, signal; print('one', flush=True); print('two', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
    rc, tail = build_mod._run_child([sys.executable, "-c", code], 30, lines.append)
    assert rc == -11 and lines == ["one", "two"] and tail == ["one", "two"]
    with pytest.raises(EngineError, match="timed out"):
        build_mod._run_child([sys.executable, "-c", "import time; time.sleep(30)"], 0.5, lines.append)


# --- TensorRTEngine against the contract-enforcing fake ------------------------------------------


@pytest.fixture(params=["10.16.1.11", "11.4.0.106"])
def fake_trt_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake TensorRT of each supported major, fake device memory and streams; returns a plan."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt_module(request.param))
    monkeypatch.setattr(run_mod, "_trt_logger", None)
    monkeypatch.setattr(run_mod, "DeviceBuffer", FakeDevice)
    monkeypatch.setattr(run_mod, "PinnedBuffer", FakePinned)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(FakeContext, "in_flight", {})

    def copy(dst: Any, src: Any, stream: Any) -> None:
        import ctypes

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


def batch(rows: int, seq: int) -> dict[str, np.ndarray]:
    ids = np.arange(rows * seq, dtype=np.int32).reshape(rows, seq)  # int32 in, int64 engine input
    return {"input_ids": ids, "bias": np.full((rows, 8), 0.5, np.float32)}


def test_engine_runs_batches_through_bindings(fake_trt_env: Path) -> None:
    engine = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    assert [s.describe() for s in engine.inputs] == ["input_ids: int64[?, ?]", "bias: float32[?, 8]"]
    assert [s.describe() for s in engine.outputs] == ["pooled: float32[?, 8]", "count: int32[?]"]
    assert len(engine.profiles) == 2 and engine.activation_bytes() == 4096  # max over the profiles
    ctx = engine._context
    for rows, seq, profile in ((2, 5, 0), (20, 100, 1), (3, 4, 0)):
        feeds = batch(rows, seq)
        out = engine.run(feeds)
        assert ctx.profile == profile
        np.testing.assert_allclose(out["pooled"], feeds["bias"] + feeds["input_ids"].sum(1)[:, None])
        assert out["count"].dtype == np.int32 and out["count"].tolist() == [seq] * rows
    only = engine.run(feeds, ["count"])
    assert list(only) == ["count"]
    first = engine.run(feeds)["pooled"]
    engine.run({**feeds, "input_ids": feeds["input_ids"] + 1})
    assert first[0, 0] == feeds["bias"][0, 0] + feeds["input_ids"][0].sum()  # copies, not staging
    assert engine.memory_bytes() > len(b"fake-plan") + 4096  # plan + private arena + I/O buffers
    with pytest.raises(EngineError, match="no optimization profile admits"):
        engine.run({"input_ids": np.ones((2, 500), np.int64), "bias": np.zeros((2, 8), np.float32)})
    with pytest.raises(EngineError, match="missing input"):
        engine.run({"input_ids": feeds["input_ids"]})
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.run(feeds)


def test_profile_switch_sets_shapes_again_and_keeps_the_max_size_scratch(fake_trt_env: Path) -> None:
    # The settled reading of NVIDIA's contract: one scratch block of device_memory_size_v2 (the
    # upper bound over profiles) is set once; a profile switch invalidates input shapes, not memory.
    engine = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    ctx = engine._context
    engine.run(batch(2, 5))
    engine.run(batch(20, 100))  # profile 1
    engine.run(batch(2, 5))  # back to profile 0
    calls = ctx.calls
    assert calls.count("memory") == 1 and calls.index("memory") < calls.index("execute")
    for switch in (i for i, c in enumerate(calls) if c.startswith("profile ")):
        after = calls[switch:]
        nxt = after.index("execute")
        assert {"shape input_ids", "shape bias"} <= set(after[:nxt]), after[:nxt]
        assert {"address input_ids", "address bias", "address pooled", "address count"} <= set(after[:nxt])
    engine.close()


def test_shape_outside_the_profile_is_refused_before_enqueue(fake_trt_env: Path) -> None:
    engine = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    # Pretend the engine read a wider profile than TensorRT holds: TensorRT's False must stop the run.
    engine._profiles = [{n: ShapeRange((1, 1), (1, 1), (64, 1024)) if n == "input_ids" else r
                         for n, r in p.items()} for p in engine._profiles]  # fmt: skip
    with pytest.raises(EngineError, match=r"shape \(2, 500\) is outside profile 0"):
        engine.run({"input_ids": np.ones((2, 500), np.int64), "bias": np.zeros((2, 8), np.float32)})
    assert "execute" not in engine._context.calls
    np.testing.assert_allclose(engine.run(batch(1, 3))["count"], [3])  # and it still serves
    engine.close()


def test_engines_share_one_arena_in_turn(fake_trt_env: Path) -> None:
    arena = FakeDevice(8192)
    a = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU, activation=arena)
    b = trt_mod.TensorRTEngine(fake_trt_env, gpu=FAKE_GPU)
    b.set_activation(arena)  # the memory manager's order: load, read activation_bytes(), then share
    assert a._context.memory == b._context.memory == (arena.ptr, 8192)
    assert a._own_arena is None and b._own_arena is None
    for engine in (a, b, a, b):  # the fake raises if a run started while the other's was in flight
        engine.run(batch(20, 100))
    with pytest.raises(EngineError, match="arena of 1024 bytes < 4096 needed"):
        a.set_activation(FakeDevice(1024))
    bigger = FakeDevice(16384)
    a.set_activation(bigger)  # the manager grew the arena: the new block is set on the context
    assert a._context.memory == (bigger.ptr, 16384)
    a.run(batch(2, 5))
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


# --- the fake itself: strict where NVIDIA documents a rule ---------------------------------------


def _bound_context(fake_trt_env: Path) -> tuple[Any, dict[str, FakeDevice]]:
    trt = sys.modules["tensorrt"]
    engine = trt.Runtime(trt.ILogger()).deserialize_cuda_engine(fake_trt_env.read_bytes())
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    bufs = {n: FakeDevice(1 << 14) for n in engine.desc}
    return ctx, bufs


def _ready(ctx: Any, bufs: dict[str, FakeDevice], rows: int = 2, seq: int = 3) -> None:
    assert ctx.set_input_shape("input_ids", (rows, seq)) and ctx.set_input_shape("bias", (rows, 8))
    for n, b in bufs.items():
        assert ctx.set_tensor_address(n, b.ptr)


def test_fake_tensorrt_raises_on_each_documented_violation(fake_trt_env: Path) -> None:
    ctx, bufs = _bound_context(fake_trt_env)
    stream = FakeStream()
    _ready(ctx, bufs)
    with pytest.raises(ContractViolation, match="before set_device_memory"):
        ctx.execute_async_v3(stream.handle)
    small = FakeDevice(2048)
    ctx.set_device_memory(small.ptr, small.nbytes)
    assert ctx.execute_async_v3(stream.handle)  # profile 0 needs 2048
    stream.synchronize()
    assert ctx.set_optimization_profile_async(1, stream.handle)
    with pytest.raises(ContractViolation, match="scratch of 2048 bytes < 4096 needed by profile 1"):
        ctx.execute_async_v3(stream.handle)
    big = FakeDevice(4096)
    ctx.set_device_memory(big.ptr, big.nbytes)
    with pytest.raises(ContractViolation, match="without input shapes"):  # the switch reset them
        ctx.execute_async_v3(stream.handle)
    _ready(ctx, bufs, rows=20, seq=40)
    assert not ctx.set_input_shape("input_ids", (64, 3))  # outside the profile: False, as TensorRT
    with pytest.raises(ContractViolation, match="without input shapes for \\['input_ids'\\]"):
        ctx.execute_async_v3(stream.handle)
    _ready(ctx, bufs, rows=20, seq=40)
    ctx.set_tensor_address("pooled", 0)
    with pytest.raises(ContractViolation, match="no address for 'pooled'"):
        ctx.execute_async_v3(stream.handle)
    with pytest.raises(ContractViolation, match="not 256-byte aligned"):
        ctx.set_tensor_address("pooled", bufs["pooled"].ptr + 8)
    tiny = FakeDevice(16)
    ctx.set_tensor_address("pooled", tiny.ptr)
    with pytest.raises(ContractViolation, match="buffer for 'pooled' holds 16 bytes"):
        ctx.execute_async_v3(stream.handle)
    ctx.set_tensor_address("pooled", bufs["pooled"].ptr)
    assert ctx.execute_async_v3(stream.handle)
    with pytest.raises(ContractViolation, match="not completed"):  # no sync yet: scratch in use
        ctx.execute_async_v3(FakeStream().handle)
    with pytest.raises(ContractViolation, match="replaced while an execution still uses it"):
        ctx.set_device_memory(big.ptr, big.nbytes)
    with pytest.raises(ContractViolation, match="default stream"):
        ctx.execute_async_v3(0)
    stream.synchronize()
    assert ctx.execute_async_v3(stream.handle)


def test_fake_tensorrt_11_lacks_the_removed_10x_attributes(fake_trt_env: Path) -> None:
    ctx, _ = _bound_context(fake_trt_env)
    engine = ctx.engine
    if engine.api == 11:
        assert not hasattr(engine, "device_memory_size")
    else:
        assert engine.device_memory_size == engine.device_memory_size_v2
    assert run_mod.activation_size(engine) == 4096
