"""TensorRT builds: the 10.x/11.x builder recipe, the parent that runs a build in a child process,
the child that builds, and the command line (``python -m appliance.engines.tensorrt``).

A builder crash or memory spike happens in the child (``build-child``), so it cannot take the
server down; the parent keeps the plan cache consistent (plan and sidecar replaced atomically).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.engines.base import EngineError
from appliance.engines.tensorrt.plan import (
    BuildOptions,
    check_plan,
    onnx_input_shapes,
    options_from_section,
    plan_key,
    sidecar_path,
    timing_cache_path,
    write_sidecar,
)
from appliance.gpu import cuda
from appliance.gpu.cuda import GpuProbe

log = logging.getLogger(__name__)


# --- TensorRT 10 / 11 builder dispatch -----------------------------------------------------------


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


# --- building (parent side) ----------------------------------------------------------------------


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
    root = str(Path(__file__).resolve().parents[3])  # the child must import this same package
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
