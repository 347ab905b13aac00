"""Chat on TensorRT: a plan built from the same decoder ONNX, and a decoder runtime whose KV cache
stays in device memory between steps.

The plan has two optimization profiles (``decoder_profiles``), one per kind of step:

- ``PREFILL`` (0): batch 1..max_running, new tokens 1..prefill_chunk_tokens (the whole context when
  prompts are not chunked), past 0..context-1: whole prompts from scratch and the chunks of a
  chunked prefill or of a prefix-cache hit, which continue from a past;
- ``DECODE`` (1): batch 1..max_running, one new token, past 1..context-1.

Each step selects its profile (``set_optimization_profile_async`` when the kind changes, then
every input shape and tensor address again, as NVIDIA documents a switch invalidates them). The
execution context is USER_MANAGED with one scratch block of ``device_memory_size_v2`` (the upper
bound over both profiles), set once: the contract ``appliance.engines.tensorrt.run`` settled from
NVIDIA's documentation of TensorRT 10.x and 11.x.

KV placement: the past is bound by address straight from the ``KVState`` (``DeviceArray``), the
presents are written into one fresh device allocation per step and become the next state, and
the scheduler's row edits (select / join / trim, prefix-cache blocks) are device copies
(``appliance.llm.kv.CudaKVOps``) on the decoder's own stream. Only token ids, positions and the
mask go to the device, and only the last position's logits [B, vocab] come back.

Nothing here imports TensorRT at module import time; the session refuses before creating any
TensorRT object when the CUDA probe finds no device (TensorRT segfaults without one).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.base import Engine, EngineError, EngineOutOfMemory, TensorSpec
from appliance.engines.tensorrt.plan import Profile, ShapeRange, require_gpu
from appliance.engines.tensorrt.run import (
    activation_size,
    create_user_managed_context,
    describe_io,
    deserialize,
    read_profiles,
    set_context_memory,
)
from appliance.gpu import cuda
from appliance.gpu.cuda import CudaError, GpuProbe
from appliance.llm.kv import CudaKVOps, DeviceArray, KVState, device_arrays
from appliance.llm.runtime import DecoderBase

log = logging.getLogger(__name__)

PREFILL, DECODE = 0, 1
STEPS = {"prefill": PREFILL, "decode": DECODE}


def decoder_inputs(layers: int) -> list[str]:
    names = ["input_ids", "position_ids", "attention_mask"]
    for i in range(layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def decoder_profiles(
    generation: Mapping[str, Any], *, max_running: int, prefill_tokens: int
) -> tuple[Profile, Profile]:
    """The (prefill, decode) optimization profiles of a decoder described by ``generation.json``.

    ``prefill_tokens`` is ``generation.prefill_chunk_tokens``; 0 (prompts not chunked) means a
    prompt may fill the context. A step holds at most ``context`` tokens, so a past holds at most
    ``context - 1`` and the mask (past + new) at most ``context``.
    """
    context = int(generation["context_length"])
    heads, dim, layers = int(generation["kv_heads"]), int(generation["head_dim"]), int(generation["layers"])
    if max_running < 1 or context < 2:
        raise ValueError(f"need max_running >= 1 and a context >= 2 (got {max_running}, {context})")
    seq = min(prefill_tokens, context) if prefill_tokens > 0 else context
    past_opt = min(context - 1, 1024)  # kernels tuned for a typical past, not the extreme

    def tokens(b: tuple[int, int, int], s: tuple[int, int, int]) -> ShapeRange:
        return ShapeRange((b[0], s[0]), (b[1], s[1]), (b[2], s[2]))

    def past(b: tuple[int, int, int], t: tuple[int, int, int]) -> ShapeRange:
        return ShapeRange(*((b[k], heads, t[k], dim) for k in range(3)))

    batch = (1, 1, max_running)  # a prefill is mostly one prompt (or one chunk)
    prefill: dict[str, ShapeRange] = {
        "input_ids": tokens(batch, (1, seq, seq)),
        "position_ids": tokens(batch, (1, seq, seq)),
        "attention_mask": tokens(batch, (1, seq, context)),
    }
    running = (1, max_running, max_running)  # decode is fast per row when the batch is full
    decode: dict[str, ShapeRange] = {
        "input_ids": tokens(running, (1, 1, 1)),
        "position_ids": tokens(running, (1, 1, 1)),
        "attention_mask": tokens(running, (2, past_opt + 1, context)),
    }
    for i in range(layers):
        for part in ("key", "value"):
            prefill[f"past_key_values.{i}.{part}"] = past(batch, (0, 0, context - 1))
            decode[f"past_key_values.{i}.{part}"] = past(running, (1, past_opt, context - 1))
    return prefill, decode


def decoder_plan(
    model_dir: Path,
    generation: Mapping[str, Any],
    *,
    max_running: int,
    prefill_tokens: int,
    workspace_bytes: int = 1 << 30,
    force: bool = False,
    timeout_s: float = 3600.0,
    progress: Callable[[str], None] | None = None,
    gpu: GpuProbe | None = None,
) -> Path:
    """The decoder's plan next to its ONNX (cached by key: ONNX digest, GPU, TensorRT, profiles),
    built in a child process when missing or stale."""
    from appliance.engines.tensorrt.build import build_plan
    from appliance.engines.tensorrt.plan import BuildOptions

    profiles = decoder_profiles(generation, max_running=max_running, prefill_tokens=prefill_tokens)
    options = BuildOptions(workspace_bytes=workspace_bytes, profiles=profiles)
    return build_plan(
        model_dir / "model.onnx",
        model_dir,
        options,
        force=force,
        timeout_s=timeout_s,
        progress=progress,
        gpu=gpu,
    )


class _Staging:
    """Device memory for one host-fed tensor (or the logits) and its pinned host side, each grown
    to the largest step seen. The logits' host side holds only the last position of each row."""

    def __init__(self) -> None:
        self.device: cuda.DeviceBuffer | None = None
        self.host: cuda.PinnedBuffer | None = None

    @staticmethod
    def _size(need: int, current: int) -> int:
        return (max(need, 256, 2 * current) + 255) // 256 * 256  # doubling: few regrowths

    def fit(self, nbytes: int, host_nbytes: int | None = None) -> tuple[cuda.DeviceBuffer, cuda.PinnedBuffer]:
        host_nbytes = nbytes if host_nbytes is None else host_nbytes
        if self.device is None or self.device.nbytes < nbytes:
            if self.device is not None:
                self.device.close()
            self.device = cuda.DeviceBuffer(self._size(nbytes, self.device.nbytes if self.device else 0))
        if self.host is None or self.host.nbytes < host_nbytes:
            if self.host is not None:
                self.host.close()
            self.host = cuda.PinnedBuffer(self._size(host_nbytes, self.host.nbytes if self.host else 0))
        return self.device, self.host

    def nbytes(self) -> int:
        return self.device.nbytes if self.device is not None else 0

    def close(self) -> None:
        for buf in (self.device, self.host):
            if buf is not None:
                buf.close()
        self.device = self.host = None


class TensorRTDecoderSession(DecoderBase):
    """The decoder on a TensorRT plan (see the module docstring): the same ``prefill`` / ``decode``
    / ``empty`` as ``DecoderSession``, with ``kv`` a ``CudaKVOps`` on this session's stream.

    Not thread-safe, like every engine: one scheduler worker drives it at a time."""

    def __init__(
        self, model_dir: str | Path, plan_path: Path, *, device: int = 0, gpu: GpuProbe | None = None
    ):
        self._read_generation(model_dir)
        require_gpu(device, gpu)  # before any TensorRT object: without a GPU they segfault
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineError(f"TensorRT is not installed: {exc}") from exc
        self._trt, self._device, self.plan_path = trt, device, plan_path
        self._closed = False
        self._staging: dict[str, _Staging] = {}
        self._runtime, self._engine = deserialize(trt, device, plan_path)
        self.io = describe_io(trt, self._engine)
        self.profiles = read_profiles(self._engine, self.io)
        self._check_plan()
        self._activation_bytes = activation_size(self._engine)
        self._context = create_user_managed_context(trt, self._engine)
        if self._context is None:
            raise EngineOutOfMemory(f"cannot create an execution context for {plan_path.name}")
        self._stream = cuda.Stream()
        # One block for both profiles, set once (the settled contract, see run.set_context_memory).
        self._arena = cuda.DeviceBuffer(max(self._activation_bytes, 256))
        set_context_memory(self._context, self._arena.ptr, self._arena.nbytes)
        self._profile = PREFILL  # a new context starts on profile 0
        self.device_kv = CudaKVOps(self.kv_dtype, self._stream, device)
        self.kv = self.device_kv
        self._dtypes = {d.name: d.dtype for d in self.io}
        self._logits_dtype = self._dtypes["logits"]

    def _check_plan(self) -> None:
        names = {d.name for d in self.io if d.is_input}
        want = set(decoder_inputs(self.layers))
        if names != want:
            raise EngineError(
                f"{self.plan_path.name} is not this decoder's plan: inputs {sorted(names ^ want)}"
            )
        if len(self.profiles) != 2 or self.profiles[DECODE]["input_ids"].max[1] != 1:
            raise EngineError(f"{self.plan_path.name} lacks the prefill and decode profiles; rebuild it")

    # -- one step --------------------------------------------------------------------------------

    def _run(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: KVState, step: str
    ) -> tuple[np.ndarray, KVState]:
        if self._closed:
            raise EngineError("the decoder is closed")
        self._check_context(positions)
        if past.ops is not self.kv:
            raise EngineError("the KV state is not in this decoder's device memory")
        try:
            return self._step(ids, positions, mask, past, STEPS[step])
        except CudaError as exc:
            raise (EngineOutOfMemory if exc.out_of_memory else EngineError)(str(exc)) from exc

    def _step(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: KVState, profile: int
    ) -> tuple[np.ndarray, KVState]:
        ctx, stream = self._context, self._stream
        cuda.set_device(self._device)  # per thread; the scheduler may move between worker threads
        fed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        shapes: dict[str, tuple[int, ...]] = {n: tuple(a.shape) for n, a in fed.items()}
        for i in range(self.layers):
            shapes[f"past_key_values.{i}.key"] = past.keys[i].shape
            shapes[f"past_key_values.{i}.value"] = past.values[i].shape
        ranges = self.profiles[profile]
        outside = [f"{n} {shapes[n]} not in {list(r.min)}..{list(r.max)}" for n, r in ranges.items()
                   if not r.contains(shapes[n])]  # fmt: skip
        if outside:
            kind = "prefill" if profile == PREFILL else "decode"
            raise EngineError(f"a {kind} step outside the plan's {kind} profile: {'; '.join(outside[:3])}")
        if profile != self._profile:
            if not ctx.set_optimization_profile_async(profile, stream.handle):
                raise EngineError(f"cannot switch to optimization profile {profile}")
            self._profile = profile
        for name, shape in shapes.items():  # every step: shapes change, and a switch resets them
            if not ctx.set_input_shape(name, shape):
                raise EngineError(f"input {name!r} shape {shape} is outside profile {profile}")
        missing = ctx.infer_shapes()
        if missing:
            raise EngineError(f"input shapes not specified: {list(missing)}")
        batch, seq = ids.shape
        present_shape = (batch, self.kv_heads, mask.shape[1], self.head_dim)
        logits_shape = tuple(int(s) for s in ctx.get_tensor_shape("logits"))
        # Every position's logits, or (decoders built since the LM head runs on the last position
        # only) just the last one's: [B, S, vocab] or [B, 1, vocab].
        out_seq = logits_shape[1] if len(logits_shape) == 3 else -1
        if logits_shape not in ((batch, seq, self.vocab), (batch, 1, self.vocab)):
            raise EngineError(
                f"logits shape {logits_shape}, expected {(batch, seq, self.vocab)} or {(batch, 1, self.vocab)}"
            )
        for i in range(self.layers):
            got = tuple(int(s) for s in ctx.get_tensor_shape(f"present.{i}.key"))
            if got != present_shape:
                raise EngineError(f"present.{i}.key shape {got}, expected {present_shape}")
        presents = device_arrays([present_shape] * (2 * self.layers), self.kv_dtype)
        itemsize = self._logits_dtype.itemsize
        logits_dev, logits_host = self._stage("logits").fit(
            batch * out_seq * self.vocab * itemsize, batch * self.vocab * itemsize
        )
        try:
            for name, array in fed.items():
                dtype = self._dtypes[name]  # int64 unless the graph says otherwise
                dev, host = self._stage(name).fit(array.size * dtype.itemsize)
                staged = host.view(dtype, array.shape)
                np.copyto(staged, array, casting="same_kind")
                cuda.memcpy_htod_async(dev, staged, stream)
                self._address(name, dev.ptr)
            for i in range(self.layers):
                self._address(f"past_key_values.{i}.key", past.keys[i].ptr)
                self._address(f"past_key_values.{i}.value", past.values[i].ptr)
                self._address(f"present.{i}.key", presents[2 * i].ptr)
                self._address(f"present.{i}.value", presents[2 * i + 1].ptr)
            self._address("logits", logits_dev.ptr)
            if not ctx.execute_async_v3(stream.handle):
                raise EngineError("TensorRT could not enqueue the step")
            # Only the last position's logits cross: one strided copy of B rows of vocab values.
            row = self.vocab * itemsize
            out = logits_host.view(self._logits_dtype, (batch, 1, self.vocab))
            cuda.memcpy2d_async(
                out.ctypes.data,
                row,
                logits_dev.ptr + (out_seq - 1) * row,
                out_seq * row,
                row,
                batch,
                "dtoh",
                stream,
            )
        except BaseException:
            with contextlib.suppress(CudaError):
                stream.synchronize()  # drain what was enqueued: the staging is rewritten next step
            raise
        stream.synchronize()
        self.device_kv.synced()
        state = KVState(presents[0::2], presents[1::2], mask, self.device_kv)
        return out.astype(np.float32, copy=True), state

    def _stage(self, name: str) -> _Staging:
        return self._staging.setdefault(name, _Staging())

    def _address(self, name: str, ptr: int) -> None:
        if not self._context.set_tensor_address(name, ptr):
            raise EngineError(f"cannot bind {name!r}")

    # -- resources -------------------------------------------------------------------------------

    def activation_bytes(self) -> int:
        return self._activation_bytes

    def memory_bytes(self) -> int:
        """Plan (about the resident weights) + scratch + staging; the KV cache is the scheduler's."""
        staging = sum(s.nbytes() for s in self._staging.values())
        return self.plan_path.stat().st_size + self._arena.nbytes + staging

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(CudaError):
            self._stream.synchronize()
        for s in self._staging.values():
            s.close()
        # Context before engine before runtime: TensorRT objects die in reverse creation order.
        self._context = None
        self._engine = None
        self._runtime = None
        self._arena.close()
        self._stream.close()


class TensorRTDecoderEngine(Engine):
    """A decoder plan as an Engine, so the manager loads, describes, sizes and closes it like the
    rest; the scheduler drives ``session`` (prefill / decode with a device KV state) directly."""

    backend = "tensorrt"

    def __init__(self, session: TensorRTDecoderSession) -> None:
        self.session = session

    @property
    def on_gpu(self) -> bool:
        return True

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [_spec(d) for d in self.session.io if d.is_input]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [_spec(d) for d in self.session.io if not d.is_input]

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        raise EngineError("a decoder runs through its session's prefill and decode, not Engine.run")

    def memory_bytes(self) -> int:
        return self.session.memory_bytes()

    def close(self) -> None:
        self.session.close()


def _spec(d: Any) -> TensorSpec:
    return TensorSpec(d.name, d.dtype, tuple(None if s < 0 else s for s in d.shape))


def open_tensorrt_decoder(
    model_dir: Path,
    *,
    max_running: int,
    prefill_tokens: int,
    progress: Callable[[str], None] | None = None,
) -> TensorRTDecoderEngine:
    """Build (or find) the plan for this decoder and these scheduler limits, and load it."""
    import json

    generation = json.loads((model_dir / "generation.json").read_text())
    plan = decoder_plan(
        model_dir, generation, max_running=max_running, prefill_tokens=prefill_tokens, progress=progress
    )
    return TensorRTDecoderEngine(TensorRTDecoderSession(model_dir, plan))


__all__ = [
    "DECODE",
    "PREFILL",
    "DeviceArray",
    "TensorRTDecoderEngine",
    "TensorRTDecoderSession",
    "decoder_inputs",
    "decoder_plan",
    "decoder_profiles",
    "open_tensorrt_decoder",
]
