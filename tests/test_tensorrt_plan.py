"""TensorRT plan cache (``appliance.engines.tensorrt.plan``): keys, sidecars, optimization profiles.

Pure Python: none of it needs TensorRT or a GPU (the device in a key comes from a ``GpuProbe``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import types
from pathlib import Path
from typing import Any

import pytest

from appliance.engines import tensorrt as trt_mod
from appliance.engines.tensorrt import (
    BuildOptions,
    PlanKey,
    ShapeRange,
    check_plan,
    profiles_from_model,
    select_profile,
)

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check() -> types.ModuleType:
    """scripts/gpu-check as a module, for its tiny ONNX model."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "scripts" / "gpu-check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


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
