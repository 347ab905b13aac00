"""TensorRT plan cache: optimization profiles, the plan key and its sidecar, cache lookup.

Pure Python apart from the GPU probe that names the device in a key: it runs anywhere, and never
imports TensorRT itself (``trt_version`` does, lazily, and only after the probe found a GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.digest import sha256_files
from appliance.engines.base import EngineError
from appliance.gpu import cuda
from appliance.gpu.cuda import GpuProbe

PLAN_FORMAT = 1  # bump when the sidecar or the meaning of a key field changes
Shape = tuple[int, ...]


class PlanIncompatible(EngineError):
    """TensorRT refused the plan (other TensorRT version or GPU): rebuild it, do not retry the load."""


# --- optimization profiles -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max shapes of one input in one profile; TensorRT tunes its kernels for ``opt``."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        if not all(0 <= a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"need 0 <= min <= opt <= max per dimension: {self.min} {self.opt} {self.max}")

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            a <= s <= c for a, s, c in zip(self.min, shape, self.max, strict=True)
        )

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShapeRange:
        try:
            return cls(*(tuple(int(d) for d in data[k]) for k in ("min", "opt", "max")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"a shape range needs min, opt and max lists: {data!r}") from exc


Profile = Mapping[str, ShapeRange]  # input name -> range; one profile covers every dynamic input


def _profile_json(p: Profile) -> dict[str, Any]:
    return {name: p[name].to_json() for name in sorted(p)}


def onnx_input_shapes(onnx_path: Path) -> dict[str, tuple[int | str | None, ...]]:
    """Graph inputs (not initializers) with their dims: int, symbolic name or None."""
    import onnx  # build-time only: not needed to run plans

    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for inp in graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims
        )
    return shapes


def _dynamic(d: int | str | None) -> bool:
    return not isinstance(d, int) or d <= 0


def profiles_from_model(
    inputs: Mapping[str, Sequence[int | str | None]],
    declared: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    max_batch_size: int = 32,
    max_sequence: int = 512,
    opt_sequence: int | None = None,
) -> tuple[Profile, ...]:
    """Optimization profiles for a model whose ONNX inputs have ``inputs`` dims (int, name or None).

    ``declared`` is the model.yaml ``tensorrt.profiles`` value: one ``{input: {min, opt, max}}`` dict
    or a list of them (several profiles, e.g. short and long sequences). Inputs a profile leaves out
    get the defaults: the first dynamic dim is the batch (1..max_batch_size, tuned for a full batch,
    which is when speed matters), any other dynamic dim a sequence (1..max_sequence, tuned for
    ``opt_sequence``, default 128). Inputs without dynamic dims need no range and get none.
    """
    opt_seq = min(opt_sequence or 128, max_sequence)
    defaults: dict[str, ShapeRange] = {}
    for name, dims in inputs.items():
        if not any(_dynamic(d) for d in dims):
            continue
        per_dim = [
            (d, d, d) if isinstance(d, int) and d > 0
            else (1, max_batch_size, max_batch_size) if i == 0
            else (1, opt_seq, max_sequence)
            for i, d in enumerate(dims)
        ]  # fmt: skip
        lo, mid, hi = (tuple(t[k] for t in per_dim) for k in range(3))
        defaults[name] = ShapeRange(lo, mid, hi)
    if declared is None:
        return (defaults,) if defaults else ()
    listed = [declared] if isinstance(declared, Mapping) else list(declared)
    profiles = []
    for i, entry in enumerate(listed):
        unknown = set(entry) - set(inputs)
        if unknown:
            raise ValueError(f"profile {i}: no model input named {sorted(unknown)}")
        prof = dict(defaults)
        for name, rng in entry.items():
            r = rng if isinstance(rng, ShapeRange) else ShapeRange.from_json(rng)
            dims = inputs[name]
            if len(r.min) != len(dims) or any(
                not _dynamic(d) and not (r.min[k] == r.max[k] == d) for k, d in enumerate(dims)
            ):
                raise ValueError(
                    f"profile {i}: {name} range {r.to_json()} does not fit the model's dims {dims}"
                )
            prof[name] = r
        profiles.append(prof)
    return tuple(profiles)


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the tightest profile that admits every input shape (less scratch, better kernels).

    Raises ValueError when no profile covers the batch; ties go to the lower index.
    """
    best: tuple[int, int] | None = None
    for i, prof in enumerate(profiles):
        if all(r.contains(shapes[n]) for n, r in prof.items() if n in shapes):
            volume = sum(int(np.prod(r.max, dtype=np.int64)) for r in prof.values())
            if best is None or volume < best[0]:
                best = (volume, i)
    if best is None:
        ranges = [{n: f"{list(r.min)}..{list(r.max)}" for n, r in p.items()} for p in profiles]
        raise ValueError(f"no optimization profile admits shapes {dict(shapes)}; profiles: {ranges}")
    return best[1]


# --- plan cache key ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False  # TensorRT 10: BuilderFlag.FP16; 11: precision comes from the ONNX file
    workspace_bytes: int = 1 << 30
    opt_level: int = 3  # 0..5: higher builds slower, may run faster
    profiles: tuple[Profile, ...] = ()  # empty: defaults from the ONNX dynamic dims at build time

    def to_json(self) -> dict[str, Any]:
        return {
            "fp16": self.fp16,
            "workspace_bytes": self.workspace_bytes,
            "opt_level": self.opt_level,
            "profiles": [_profile_json(p) for p in self.profiles],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildOptions:
        profiles = tuple({n: ShapeRange.from_json(r) for n, r in p.items()} for p in data.get("profiles", []))
        return cls(
            fp16=bool(data.get("fp16", False)),
            workspace_bytes=int(data.get("workspace_bytes", 1 << 30)),
            opt_level=int(data.get("opt_level", 3)),
            profiles=profiles,
        )


_SECTION_KEYS = {"fp16", "workspace_mb", "opt_level", "profiles", "max_sequence", "opt_sequence"}


def options_from_section(
    section: Mapping[str, Any], inputs: Mapping[str, Sequence[int | str | None]], *, max_batch_size: int
) -> BuildOptions:
    """BuildOptions from a model.yaml ``tensorrt`` section and the model's ONNX input dims.

    Keys: ``fp16``, ``workspace_mb``, ``opt_level``, ``profiles`` (see ``profiles_from_model``),
    ``max_sequence`` and ``opt_sequence`` (for default sequence ranges).
    """
    unknown = set(section) - _SECTION_KEYS
    if unknown:
        raise ValueError(f"unknown tensorrt setting(s) {sorted(unknown)}; known: {sorted(_SECTION_KEYS)}")
    profiles = profiles_from_model(
        inputs,
        section.get("profiles"),
        max_batch_size=max_batch_size,
        max_sequence=int(section.get("max_sequence", 512)),
        opt_sequence=section.get("opt_sequence"),
    )
    return BuildOptions(
        fp16=bool(section.get("fp16", False)),
        workspace_bytes=int(section.get("workspace_mb", 1024)) << 20,
        opt_level=int(section.get("opt_level", 3)),
        profiles=profiles,
    )


def onnx_digest(onnx_path: Path) -> str:
    """sha256 of the ONNX file and of its ``<name>.data`` external weights, if any."""
    return sha256_files([onnx_path])


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on. A plan is a cache entry for exactly this key, never an artefact:
    TensorRT plans only load on the TensorRT version and GPU model they were built with."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str
    options: BuildOptions = field(default_factory=BuildOptions)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "onnx_sha256": self.onnx_sha256,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
            "trt_version": self.trt_version,
            "options": self.options.to_json(),
        }

    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def plan_name(self, stem: str = "model") -> str:
        major, minor = self.compute_capability
        return f"{stem}.trt{self.trt_version}.sm{major}{minor}.{self.digest()[:16]}.plan"


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def write_sidecar(plan: Path, key: PlanKey, **extra: Any) -> Path:
    data = {"key": key.to_json(), "digest": key.digest(), "plan_bytes": plan.stat().st_size, **extra}
    side = sidecar_path(plan)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, side)
    return side


def check_plan(plan: Path, key: PlanKey) -> str | None:
    """None when ``plan`` was built for exactly ``key``; otherwise why it must be rebuilt."""
    if not plan.exists():
        return "no plan"
    try:
        data = json.loads(sidecar_path(plan).read_text())
        recorded = data["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable sidecar (foreign plan or interrupted build)"
    expected = key.to_json()
    if recorded != expected:
        changed = sorted(k for k in expected.keys() | recorded.keys() if recorded.get(k) != expected.get(k))
        return "stale or foreign plan: " + ", ".join(
            f"{k} {recorded.get(k)!r} != {expected.get(k)!r}" if k != "options" else "build options differ"
            for k in changed
        )
    if data.get("plan_bytes") != plan.stat().st_size:
        return "plan size differs from its sidecar (truncated or replaced)"
    return None


def find_plan(out_dir: Path, key: PlanKey, stem: str = "model") -> Path | None:
    plan = out_dir / key.plan_name(stem)
    return plan if check_plan(plan, key) is None else None


# --- this GPU and TensorRT ----------------------------------------------------------------------


def trt_version() -> str:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"TensorRT is not installed: {exc}") from exc
    return str(trt.__version__)


def require_gpu(device: int, gpu: GpuProbe | None) -> cuda.DeviceInfo:
    gpu = gpu or cuda.probe()
    if not gpu.ok:
        raise EngineError(f"no CUDA device: {gpu.error}")
    if not 0 <= device < gpu.count:
        raise EngineError(f"no CUDA device {device}: found {gpu.count}")
    return gpu.devices[device]


def timing_cache_path(cache_dir: Path, key: PlanKey) -> Path:
    """Kernel timings are per TensorRT version and GPU, not per model: one file serves every model."""
    major, minor = key.compute_capability
    gpu = "".join(c if c.isalnum() else "-" for c in key.gpu_name.lower()).strip("-")
    return cache_dir / f"timing.trt{key.trt_version}.sm{major}{minor}.{gpu}.cache"


def plan_key(
    onnx_path: Path, options: BuildOptions | None = None, *, device: int = 0, gpu: GpuProbe | None = None
) -> PlanKey:
    """The key of ``onnx_path``'s plan on this GPU and TensorRT (no profiles: ONNX-derived defaults)."""
    info = require_gpu(device, gpu)
    options = options or BuildOptions()
    if not options.profiles:
        options = dataclasses.replace(options, profiles=profiles_from_model(onnx_input_shapes(onnx_path)))
    return PlanKey(onnx_digest(onnx_path), info.name, info.compute_capability, trt_version(), options)


def cached_plan(
    onnx_path: Path,
    out_dir: Path,
    options: BuildOptions | None = None,
    *,
    device: int = 0,
    gpu: GpuProbe | None = None,
) -> Path | None:
    """The valid plan already in ``out_dir``, or None (then build, or serve with ONNX Runtime)."""
    return find_plan(out_dir, plan_key(onnx_path, options, device=device, gpu=gpu), onnx_path.stem)
