"""TensorRT backend (Python API of TensorRT 10.x and 11.x): plan cache, builds, execution.

Layout: the first half is pure Python (plan-cache keys, optimization profiles, binding plans, API
dispatch) and runs anywhere; the second half touches TensorRT and only runs after ``cuda.probe()``
found a device, because a TensorRT runtime created without one segfaults the process instead of
raising. Builds run in a child process (``python -m appliance.engines.tensorrt build-child``) so a
builder crash or memory spike cannot take the server down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.base import Engine, EngineError, EngineOutOfMemory, TensorSpec
from appliance.gpu import cuda
from appliance.gpu.cuda import CudaError, DeviceBuffer, GpuProbe, PinnedBuffer

log = logging.getLogger(__name__)

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
    h = hashlib.sha256()
    for p in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        if p.exists():
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


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


# --- bindings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IoDesc:
    """One engine I/O tensor as the engine declares it: ``-1`` marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: Shape
    is_input: bool


@dataclass(frozen=True)
class Binding:
    name: str
    dtype: np.dtype
    shape: Shape
    mode: str  # "input"; "output" (copied back); "unused" (bound, since TensorRT writes every output)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def binding_plan(
    io: Sequence[IoDesc],
    feeds: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    output_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[Binding]:
    """What to bind for one batch: each input at its fed shape in the *engine's* dtype (int64
    ``input_ids`` stay int64: the ONNX parser no longer narrows them), and every output.

    Output shapes come from ``output_shapes`` (the context's, after ``infer_shapes``) or, failing
    that, from the engine with a dynamic first dim set to the batch size; -1 is left where unknown.
    """
    inputs = [d for d in io if d.is_input]
    outputs = [d for d in io if not d.is_input]
    unknown = set(feeds) - {d.name for d in inputs}
    if unknown:
        raise EngineError(f"unknown input(s) {sorted(unknown)}; the engine takes {[d.name for d in inputs]}")
    wanted = list(output_names) if output_names else [d.name for d in outputs]
    missing_out = set(wanted) - {d.name for d in outputs}
    if missing_out:
        raise EngineError(f"unknown output(s) {sorted(missing_out)}")
    plan: list[Binding] = []
    batch: int | None = None
    for d in inputs:
        if d.name not in feeds:
            raise EngineError(f"missing input {d.name!r}")
        arr = np.asarray(feeds[d.name])
        if arr.ndim != len(d.shape) or any(
            e >= 0 and e != s for e, s in zip(d.shape, arr.shape, strict=True)
        ):
            raise EngineError(f"input {d.name!r} has shape {arr.shape}; the engine expects {d.shape}")
        if not np.can_cast(arr.dtype, d.dtype, casting="same_kind"):
            raise EngineError(f"input {d.name!r} is {arr.dtype}; the engine takes {d.dtype}")
        if batch is None and d.shape and d.shape[0] < 0:
            batch = arr.shape[0]
        plan.append(Binding(d.name, d.dtype, tuple(arr.shape), "input"))
    for d in outputs:
        if output_shapes is not None and d.name in output_shapes:
            shape = tuple(int(s) for s in output_shapes[d.name])
        else:
            shape = tuple(
                batch if (i == 0 and s < 0 and batch is not None) else s for i, s in enumerate(d.shape)
            )
        plan.append(Binding(d.name, d.dtype, shape, "output" if d.name in wanted else "unused"))
    return plan


# --- TensorRT 10 / 11 dispatch -------------------------------------------------------------------


def api_major(trt_version: str) -> int:
    """10 or 11: which Python API family a TensorRT version speaks (12+ is assumed to speak 11's)."""
    major = int(trt_version.split(".", 1)[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt_version} is not supported (need 10.x or 11.x)")
    return 10 if major == 10 else 11


def flag_bits(enum: Any, names: Sequence[str]) -> int:
    """OR of ``1 << int(enum.NAME)`` over the members that exist. Values moved between majors
    (STRONGLY_TYPED is 1 in 10.x, 0 in 11.x), so never hard-code the shifts."""
    bits = 0
    for n in names:
        member = getattr(enum, n, None)
        if member is not None:
            bits |= 1 << int(member)
    return bits


@dataclass(frozen=True)
class BuildRecipe:
    api: int
    network_flags: int
    builder_flags: tuple[Any, ...]
    strongly_typed: bool
    notes: tuple[str, ...] = ()


def build_recipe(trt: Any, options: BuildOptions) -> BuildRecipe:
    """Network creation flags and builder flags for ``options`` on the ``trt`` module given.

    10.x + fp16: a weakly typed network with BuilderFlag.FP16 (deprecated since 10.12, but the only
    route on Jetson, which stays on 10.x). Otherwise strongly typed: the ONNX file's own types decide
    the precision, which on 11.x (no precision flags at all) is the only way to get FP16.
    """
    api = api_major(str(trt.__version__))
    if api == 10 and options.fp16:
        fp16 = getattr(trt.BuilderFlag, "FP16", None)
        if fp16 is None:
            raise EngineError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16")
        return BuildRecipe(api, 0, (fp16,), strongly_typed=False)
    notes: tuple[str, ...] = ()
    if options.fp16:
        notes = ("TensorRT 11 takes precision from the ONNX file: build the model with fp16 weights",)
    # 11.x networks are always strongly typed and its STRONGLY_TYPED member is a deprecated no-op.
    flags = flag_bits(trt.NetworkDefinitionCreationFlag, ["STRONGLY_TYPED"]) if api == 10 else 0
    return BuildRecipe(api, flags, (), strongly_typed=True, notes=notes)


def activation_size(engine: Any) -> int:
    """Scratch bytes a context needs (max over profiles); 11.x removed the non-v2 attribute."""
    if hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(engine.device_memory_size)


def create_user_managed_context(trt: Any, engine: Any) -> Any:
    """A context whose scratch memory we supply, so one arena can serve several engines."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()  # removed in 11.x


def set_context_memory(ctx: Any, ptr: int, nbytes: int) -> None:
    if hasattr(ctx, "set_device_memory"):  # 10.1+: size-checked
        ctx.set_device_memory(ptr, nbytes)
    else:
        ctx.device_memory = ptr


# --- building (parent side) ----------------------------------------------------------------------


def trt_version() -> str:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"TensorRT is not installed: {exc}") from exc
    return str(trt.__version__)


def _require_gpu(device: int, gpu: GpuProbe | None) -> cuda.DeviceInfo:
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
    info = _require_gpu(device, gpu)
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


def build_plan(
    onnx_path: Path,
    out_dir: Path,
    options: BuildOptions | None = None,
    *,
    device: int = 0,
    timing_cache_dir: Path | None = None,
    timeout_s: float = 3600.0,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    gpu: GpuProbe | None = None,
) -> Path:
    """The plan for ``onnx_path`` on this GPU and TensorRT, built in a child process unless a valid
    one (matching sidecar key) is already in ``out_dir``. Returns the plan's path.

    ``progress`` receives the child's output lines (default: logged at INFO). Raises EngineError.
    """
    key = plan_key(onnx_path, options, device=device, gpu=gpu)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / key.plan_name(onnx_path.stem)
    reason = "forced" if force else check_plan(plan, key)
    if reason is None:
        return plan
    report = progress or (lambda line: log.info("tensorrt build %s: %s", onnx_path.name, line))
    report(f"building {plan.name} ({reason})")
    tmp = plan.with_name(f"{plan.name}.{os.getpid()}.tmp")
    args = {
        "--onnx": os.fspath(onnx_path),
        "--out": os.fspath(tmp),
        "--device": str(device),
        "--options": json.dumps(key.options.to_json()),
        "--timing-cache": os.fspath(timing_cache_path(timing_cache_dir or out_dir, key)),
    }
    cmd = [sys.executable, "-m", "appliance.engines.tensorrt", "build-child"]
    cmd += [part for pair in args.items() for part in pair]
    started = time.monotonic()
    try:
        rc, tail = _run_child(cmd, timeout_s, report)
        if rc != 0:
            what = f"crashed ({_signal_name(-rc)})" if rc < 0 else f"failed (exit {rc})"
            raise EngineError(f"TensorRT build of {onnx_path.name} {what}: " + " | ".join(tail))
        sidecar_path(plan).unlink(missing_ok=True)  # the plan is unkeyed until its new sidecar lands
        os.replace(tmp, plan)
    finally:
        tmp.unlink(missing_ok=True)
    write_sidecar(plan, key, build_seconds=round(time.monotonic() - started, 1), built_at=time.time())
    report(f"built {plan.name} in {time.monotonic() - started:.1f}s")
    return plan


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _run_child(cmd: list[str], timeout_s: float, report: Callable[[str], None]) -> tuple[int, list[str]]:
    root = str(Path(__file__).resolve().parents[2])  # the child must import this same package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    )
    tail: deque[str] = deque(maxlen=8)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line := line.rstrip():
                tail.append(line)
                report(line)

    reader = threading.Thread(target=pump, name="trt-build-output", daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise EngineError(f"TensorRT build timed out after {timeout_s:.0f}s") from None
    reader.join(timeout=5)
    return rc, list(tail)


# --- building (child side) -----------------------------------------------------------------------


def _child_build(onnx_path: Path, out: Path, options: BuildOptions, timing_cache: Path, device: int) -> int:
    def say(msg: str) -> None:
        print(msg, flush=True)

    gpu = cuda.probe()
    if not gpu.ok:
        say(f"no CUDA device: {gpu.error}")
        return 2
    cuda.set_device(device)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)  # stderr is piped to the parent's progress output
    recipe = build_recipe(trt, options)
    for note in recipe.notes:
        say(f"note: {note}")
    builder = trt.Builder(logger)
    network = builder.create_network(recipe.network_flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name} (TensorRT {trt.__version__}, strongly typed: {recipe.strongly_typed})")
    if not parser.parse_from_file(os.fspath(onnx_path)):
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            say(f"parse error: {e.node_name()}({e.node_operator()}): {e.desc()} [{e.code()}]")
        return 3
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.opt_level
    for flag in recipe.builder_flags:
        config.set_flag(flag)
    for prof in options.profiles:
        p = builder.create_optimization_profile()
        for name, r in prof.items():
            p.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(p)
    cache = None
    if timing_cache.exists():
        try:
            cache = config.create_timing_cache(timing_cache.read_bytes())
        except Exception as exc:  # TensorRT raises its own types for a corrupt blob
            say(f"timing cache unreadable ({exc}): starting empty")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another device or version is refused: a slower build beats a failed one.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    # TensorRT holds raw pointers to the monitor (and to logger and parser): keep them referenced.
    monitor = _progress_monitor(trt, say) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor
    say(f"building: {len(options.profiles)} profile(s), workspace {options.workspace_bytes >> 20} MiB")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        say("build failed: see the TensorRT messages above")
        return 4
    with out.open("wb") as f:
        f.write(serialized)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = timing_cache.with_name(f"{timing_cache.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, timing_cache)  # concurrent builds: last writer wins, each file stays whole
    say(f"plan: {out.stat().st_size} bytes")
    del monitor, parser  # only now may they go
    return 0


def _progress_monitor(trt: Any, say: Callable[[str], None]) -> Any:
    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                say(f"phase {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            if now - self._last > 5:  # a heartbeat, not a line per tactic
                self._last = now
                say(f"  {phase_name}: step {step}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


# --- execution -----------------------------------------------------------------------------------

_logger_lock = threading.Lock()
_trt_logger: Any = None


def _process_logger(trt: Any) -> Any:
    """One ILogger per process: TensorRT keeps a single logger pointer and calls it from its threads."""
    global _trt_logger
    with _logger_lock:
        if _trt_logger is None:
            sev = trt.ILogger.Severity
            levels = {
                sev.INTERNAL_ERROR: logging.CRITICAL,
                sev.ERROR: logging.ERROR,
                sev.WARNING: logging.WARNING,
                sev.INFO: logging.DEBUG,
                sev.VERBOSE: logging.DEBUG - 5,
            }

            class Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

            _trt_logger = Logger()
        return _trt_logger


@dataclass
class _Slot:
    """Device memory for one I/O tensor, plus pinned staging for those copied to or from the host."""

    device: DeviceBuffer
    host: PinnedBuffer | None

    def close(self) -> None:
        self.device.close()
        if self.host is not None:
            self.host.close()


class TensorRTEngine(Engine):
    """A deserialized plan with one user-managed execution context.

    ``activation`` is the scratch arena: give one shared buffer (at least ``activation_bytes()``) to
    several engines whose runs never overlap, or leave it None and the engine allocates its own at the
    first run. I/O buffers grow to the largest batch seen and stay; ``run`` is synchronous.
    """

    backend = "tensorrt"

    def __init__(
        self,
        plan_path: Path,
        *,
        device: int = 0,
        activation: DeviceBuffer | None = None,
        gpu: GpuProbe | None = None,
    ) -> None:
        _require_gpu(device, gpu)  # before any TensorRT object: without a GPU they segfault
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(f"TensorRT is not installed: {exc}") from exc
        self._trt = trt
        self._device = device
        self._closed = False
        self._slots: dict[str, _Slot] = {}
        self._arena: DeviceBuffer | None = None
        self._own_arena: DeviceBuffer | None = None
        try:
            cuda.set_device(device)
            self._runtime = trt.Runtime(_process_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        except (OSError, CudaError) as exc:
            raise EngineError(f"cannot load {plan_path.name}: {exc}") from exc
        if self._engine is None:
            raise PlanIncompatible(f"TensorRT {trt.__version__} cannot load {plan_path.name}; rebuild it")
        self._io = self._describe_io()
        self._profiles = self._read_profiles()
        self._activation_bytes = activation_size(self._engine)
        self._context = create_user_managed_context(trt, self._engine)
        if self._context is None:
            raise EngineOutOfMemory(f"cannot create an execution context for {plan_path.name}")
        self._profile = 0
        self._streams = cuda.ThreadStreams(device)
        self._plan_bytes = plan_path.stat().st_size
        if activation is not None:
            self.set_activation(activation)

    def _describe_io(self) -> list[IoDesc]:
        trt, eng = self._trt, self._engine
        io = []
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and eng.get_tensor_location(name) == trt.TensorLocation.HOST:
                raise EngineError(f"input {name!r} is a shape tensor; those are not supported")
            try:
                dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
            except TypeError as exc:  # BF16/FP8/INT4 I/O: keep graph I/O at FP32/FP16
                raise EngineError(
                    f"{name!r} has type {eng.get_tensor_dtype(name)} with no numpy type"
                ) from exc
            io.append(IoDesc(name, dtype, tuple(int(d) for d in eng.get_tensor_shape(name)), is_input))
        return io

    def _read_profiles(self) -> list[Profile]:
        dynamic = [d.name for d in self._io if d.is_input and any(s < 0 for s in d.shape)]
        return [
            {
                n: ShapeRange(
                    *(tuple(int(x) for x in s) for s in self._engine.get_tensor_profile_shape(n, p))
                )
                for n in dynamic
            }
            for p in range(self._engine.num_optimization_profiles)
        ]

    # -- Engine interface --

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [_spec(d) for d in self._io if d.is_input]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [_spec(d) for d in self._io if not d.is_input]

    @property
    def profiles(self) -> list[Profile]:
        return list(self._profiles)

    def activation_bytes(self) -> int:
        """Scratch bytes this engine's context needs (max over its profiles)."""
        return self._activation_bytes

    def set_activation(self, arena: DeviceBuffer | None) -> None:
        """Point the context's scratch at ``arena`` (shared; the caller keeps it alive and serialises
        runs of every engine using it), or at a private arena when None. Call between runs only."""
        if arena is not None and arena.nbytes < self._activation_bytes:
            raise EngineError(f"activation arena of {arena.nbytes} bytes < {self._activation_bytes} needed")
        if arena is None:
            arena = self._own_arena or DeviceBuffer(max(self._activation_bytes, 256))
            self._own_arena = arena
        elif self._own_arena is not None:
            self._own_arena.close()
            self._own_arena = None
        if arena.nbytes:  # an engine that needs no scratch gets no pointer (a 0-byte arena has none)
            set_context_memory(self._context, arena.ptr, arena.nbytes)
        self._arena = arena

    def memory_bytes(self) -> int:
        """Plan size (about the resident weights) + I/O buffers + a private arena, if any."""
        slots = sum(s.device.nbytes for s in self._slots.values())
        return self._plan_bytes + slots + (self._own_arena.nbytes if self._own_arena else 0)

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        if self._closed:
            raise EngineError("engine is closed")
        try:
            return self._run(feeds, output_names)
        except CudaError as exc:
            raise (EngineOutOfMemory if exc.out_of_memory else EngineError)(str(exc)) from exc

    def _run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        ctx = self._context
        plan = binding_plan(self._io, feeds, output_names)
        inputs = [b for b in plan if b.mode == "input"]
        stream = self._streams.get()
        if self._arena is None:
            self.set_activation(None)
        if self._profiles:
            try:
                index = select_profile(self._profiles, {b.name: b.shape for b in inputs})
            except ValueError as exc:
                raise EngineError(str(exc)) from exc
            if index != self._profile:
                if not ctx.set_optimization_profile_async(index, stream.handle):
                    raise EngineError(f"cannot switch to optimization profile {index}")
                self._profile = index
        for b in inputs:
            if not ctx.set_input_shape(b.name, b.shape):
                raise EngineError(f"input {b.name!r} shape {b.shape} is outside profile {self._profile}")
        missing = ctx.infer_shapes()
        if missing:
            raise EngineError(f"input shapes not specified: {list(missing)}")
        shapes = {b.name: tuple(ctx.get_tensor_shape(b.name)) for b in plan if b.mode != "input"}
        if any(s < 0 for shape in shapes.values() for s in shape):
            raise EngineError("data-dependent output shapes are not supported")
        plan = binding_plan(self._io, feeds, output_names, shapes)
        results: dict[str, np.ndarray] = {}
        try:
            for b in plan:
                slot = self._slot(b)
                if not ctx.set_tensor_address(b.name, slot.device.ptr):
                    raise EngineError(f"cannot bind {b.name!r}")
                if b.mode == "input":
                    assert slot.host is not None
                    staged = slot.host.view(b.dtype, b.shape)
                    np.copyto(staged, feeds[b.name], casting="same_kind")  # int32 ids -> int64 input
                    cuda.memcpy_htod_async(slot.device, staged, stream)
            if not ctx.execute_async_v3(stream.handle):
                raise EngineError("TensorRT could not enqueue the batch")
            for b in plan:
                if b.mode == "output":
                    slot = self._slots[b.name]
                    assert slot.host is not None
                    results[b.name] = slot.host.view(b.dtype, b.shape)
                    cuda.memcpy_dtoh_async(results[b.name], slot.device, stream)
        except BaseException:
            # Drain what was enqueued: the next batch rewrites these staging buffers.
            with contextlib.suppress(CudaError):
                stream.synchronize()
            raise
        stream.synchronize()  # outputs are only valid now; it also frees the arena for the next engine
        wanted = list(output_names) if output_names else [d.name for d in self._io if not d.is_input]
        # Copies: the pinned staging buffers are reused by the next batch.
        return {n: results[n].copy() for n in wanted}

    def _slot(self, b: Binding) -> _Slot:
        slot = self._slots.get(b.name)
        staged = b.mode != "unused"
        need = max(256, b.nbytes)  # never a null pointer, even for an empty tensor
        if slot is not None and slot.device.nbytes >= need and (slot.host is not None or not staged):
            return slot
        size = need
        if slot is not None:
            # Grow by half again so a slowly rising batch size does not reallocate every time.
            size = max(need, slot.device.nbytes * 3 // 2 if slot.device.nbytes < need else slot.device.nbytes)
            slot.close()
        size = (size + 255) // 256 * 256
        slot = self._slots[b.name] = _Slot(DeviceBuffer(size), PinnedBuffer(size) if staged else None)
        return slot

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self._slots.values():
            slot.close()
        self._slots.clear()
        # Context before engine before runtime: TensorRT objects must die in reverse creation order.
        self._context = None
        self._engine = None
        self._runtime = None
        if self._own_arena is not None:
            self._own_arena.close()
        self._own_arena = self._arena = None
        self._streams.close()


def _spec(d: IoDesc) -> TensorSpec:
    return TensorSpec(d.name, d.dtype, tuple(None if s < 0 else s for s in d.shape))


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.engines.tensorrt", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find the cached) plan for an ONNX model")
    b.add_argument("onnx", type=Path)
    b.add_argument("out_dir", type=Path, nargs="?")
    b.add_argument("--fp16", action="store_true")
    b.add_argument("--workspace-mb", type=int, default=1024)
    b.add_argument("--opt-level", type=int, default=3)
    b.add_argument("--max-batch-size", type=int, default=32)
    b.add_argument("--max-sequence", type=int, default=512)
    b.add_argument("--profiles", help="JSON: {input: {min, opt, max}} or a list of those")
    b.add_argument("--timing-cache-dir", type=Path)
    b.add_argument("--force", action="store_true")
    c = sub.add_parser("build-child", help=argparse.SUPPRESS)
    c.add_argument("--onnx", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--options", required=True)
    c.add_argument("--timing-cache", type=Path, required=True)
    c.add_argument("--device", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "build-child":
        return _child_build(
            args.onnx,
            args.out,
            BuildOptions.from_json(json.loads(args.options)),
            args.timing_cache,
            args.device,
        )
    section = {
        "fp16": args.fp16,
        "workspace_mb": args.workspace_mb,
        "opt_level": args.opt_level,
        "max_sequence": args.max_sequence,
    }
    if args.profiles:
        section["profiles"] = json.loads(args.profiles)
    try:
        options = options_from_section(
            section, onnx_input_shapes(args.onnx), max_batch_size=args.max_batch_size
        )
        plan = build_plan(
            args.onnx,
            args.out_dir or args.onnx.parent,
            options,
            timing_cache_dir=args.timing_cache_dir,
            force=args.force,
            progress=lambda line: print(line, flush=True),
        )
    except (EngineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
