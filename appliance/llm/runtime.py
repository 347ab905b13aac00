"""A minimal ONNX Runtime driver for graphs written by ``appliance.build.decoder``.

Batches are left-padded: every row's tokens end at the last column, so one new column per decode
step serves all rows, and a row's next position is the number of real tokens it holds. The KV
cache is an ``appliance.llm.kv.KVState`` on the session's placement: NumPy arrays on the host, or
``OrtValue`` tensors that stay on the device between steps (I/O binding: the past is bound as
device tensors, the presents are bound to the device, only ids, positions, mask and logits cross).
``prefill`` may continue from a past (a prefix-cache hit, the previous chunk of a chunked
prefill): the graph takes P cached and S new tokens with the causal mask offset by P.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from appliance.engines.base import EngineError
from appliance.engines.onnxruntime import spinning
from appliance.llm.fused_decode import fused_decode_graph
from appliance.llm.kv import HOST, KVOps, KVState, OrtKVOps, empty_state

log = logging.getLogger(__name__)

# Largest batch the int8-activation companion decodes (measured on 2 AVX2 cores up to 8 rows, the
# default generation.max_running_sequences; larger batches stay on the float graph, unmeasured).
INT8_DECODE_MAX_BATCH = 8


class DecoderBase:
    """A built decoder directory's shape facts (``generation.json``) and the batch logic of prefill
    and decode, over one ``_run`` that each engine implements (ONNX Runtime here, TensorRT in
    ``appliance.llm.trt_decoder``): the scheduler sees the same interface on every backend."""

    kv: KVOps

    def _read_generation(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir = Path(model_dir)
        self.generation: dict[str, Any] = json.loads((model_dir / "generation.json").read_text())
        g = self.generation
        self.layers, self.kv_heads, self.head_dim = int(g["layers"]), int(g["kv_heads"]), int(g["head_dim"])
        self.context_length, self.vocab = int(g["context_length"]), int(g["vocab"])
        self.eos_ids: list[int] = [int(i) for i in g["eos_ids"]]
        self.pad_id = int(g["pad"])
        self.kv_dtype = np.dtype(g["dtype"])

    def _run(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: KVState, step: str
    ) -> tuple[np.ndarray, KVState]:
        """One engine call: logits [B, S or 1, vocab] on the host (at least the last position) and
        the presents as the new KV state. ``step`` is "prefill" or "decode"."""
        raise NotImplementedError

    def _check_context(self, positions: np.ndarray) -> None:
        if int(positions.max(initial=0)) >= self.context_length:
            raise ValueError(f"sequence exceeds the model context of {self.context_length} tokens")

    def empty(self, batch: int) -> KVState:
        return empty_state(self.kv, self.layers, batch, self.kv_heads, self.head_dim, self.kv_dtype)

    def prefill(
        self, prompts: Sequence[Sequence[int]], past: KVState | None = None
    ) -> tuple[np.ndarray, KVState]:
        """Run whole prompts (left-padded into one batch), or, with ``past``, one row's next
        tokens after what ``past`` holds. Returns the last-position logits [B, vocab] as float32
        and the KV state to continue from."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        if past is not None and past.width:
            if len(prompts) != 1 or past.batch != 1:
                raise ValueError("a prefill that continues from a past takes one row")
            new = np.asarray(prompts[0], dtype=np.int64).reshape(1, -1)
            start = int(past.lengths()[0])
            positions = np.arange(start, start + new.shape[1], dtype=np.int64).reshape(1, -1)
            mask = np.concatenate([past.mask, np.ones_like(new)], axis=1)
            logits, state = self._run(new, positions, mask, past, "prefill")
            return self._last(logits, 1, "prefill"), state
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, state = self._run(ids, positions, mask, self.empty(len(prompts)), "prefill")
        return self._last(logits, len(prompts), "prefill"), state

    def decode(self, next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray:
        """Feed one token per row; advances ``state`` in place and returns logits [B, vocab]."""
        ids = np.asarray(next_ids, dtype=np.int64).reshape(state.batch, 1)
        positions = state.lengths().astype(np.int64).reshape(state.batch, 1)
        mask = np.concatenate([state.mask, np.ones((state.batch, 1), dtype=np.int64)], axis=1)
        logits, new = self._run(ids, positions, mask, state, "decode")
        last = self._last(logits, state.batch, "decode")
        state.keys, state.values, state.mask = new.keys, new.values, new.mask
        return last

    def _last(self, logits: np.ndarray, rows: int, step: str) -> np.ndarray:
        """The last position's logits [rows, vocab], or EngineError where the engine's answer
        cannot be the batch's: a wrong shape, or NaN / +inf (a fault of the engine, such as an
        fp16 overflow or a broken kernel). Sampled, NaN logits made token 0, EOS for SmolLM2:
        an answer cut short, served as a 200 "stop", counted a success and cached; a row short
        or a width off sampled from the wrong ids or killed the scheduler's loop."""
        shape = np.shape(logits)
        if len(shape) != 3 or shape[0] != rows or shape[1] < 1 or shape[2] != self.vocab:
            raise EngineError(
                f"the {step} returned logits of shape {tuple(shape)}; expected ({rows}, n, {self.vocab})"
            )
        last = logits[:, -1, :]
        # One pass per step: a row's max is NaN where it holds a NaN, +inf where it holds +inf,
        # and -inf where every token is ruled out (-inf alone is a token the graph rules out).
        if not np.isfinite(last.max(axis=1)).all():
            raise EngineError(f"the {step} returned logits that are not numbers (NaN or infinite)")
        return last


class DecoderSession(DecoderBase):
    """An ``onnxruntime.InferenceSession`` over a built decoder directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        intra_op_threads: int | None = None,
        providers: Sequence[str] | None = None,
        single_stream: str | Path | None = None,
        kv_device: str | None = None,
        spin_wait: bool = False,
        spin_us: int = 0,
        q4_int8_decode: bool = False,
        fused_decode: bool = False,
        fused_attention: bool = False,
    ) -> None:
        """``kv_device``: None keeps the KV cache in host NumPy arrays; "cuda" (or "cpu", which CI
        uses to run the device code path with host placement) keeps it in ``OrtValue`` tensors on
        that device, edited there by ``OrtKVOps``.

        ``single_stream``: the folder of a 4-bit build of the same weights (same inputs and
        outputs, logits within 2e-4): a batch of one decodes there, where it is 1.4x faster; larger
        batches and prefill stay on the float graph, which is faster for them.

        ``spin_us``: let both sessions' intra-op threads spin up to that long for their next
        kernel before sleeping (``appliance.engines.onnxruntime.spinning``); 0: they sleep at once.

        ``q4_int8_decode``: run that companion with int8 activations (see ``int8_model``),
        and decode batches of up to ``INT8_DECODE_MAX_BATCH`` rows there too.

        ``fused_decode`` (with ``q4_int8_decode``): decode on that companion with its LM head
        rewritten as one 8-bit MatMulNBits and its attention laid out for one token per row, or
        with ``fused_attention`` each layer's attention as one GroupQueryAttention node
        (``appliance.llm.fused_decode``); the file is not changed."""
        self._read_generation(model_dir)
        model_dir = self.model_dir
        options = ort.SessionOptions()
        spinning(options, spin_wait, spin_us)
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        if kv_device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # ORT falls back to the CPU when the CUDA provider cannot load (libraries missing):
            # a device KV cache would then fail at the first step, so keep it on the host.
            log.warning(
                "%s: the CUDA provider did not load; the decoder and its KV cache run on the CPU", model_dir
            )
            kv_device = None
        self.kv = HOST if kv_device is None else OrtKVOps(self.kv_dtype, kv_device)
        self.single: ort.InferenceSession | None = None
        self.single_max_batch = 0
        if single_stream is not None and kv_device is None:
            path = Path(single_stream) / "model.onnx"
            graph: str | bytes = str(path)
            if q4_int8_decode:
                model = int8_model(path)
                if fused_decode:
                    dims = (self.layers, self.kv_heads, self.head_dim)
                    fused_decode_graph(model, *dims, attention=fused_attention)
                graph = model.SerializeToString()
            self.single = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            if isinstance(graph, bytes):
                # ORT's Python session keeps the serialized graph it was built from, to rebuild
                # itself on a provider fallback (onnxruntime's own TODO says it holds the memory
                # indefinitely): 229 MB for SmolLM2's companion, for the model's whole life, 17 %
                # of its lease. The CPU provider has nothing to fall back from.
                self.single.disable_fallback()
                if getattr(self.single, "_model_bytes", None) is not None:
                    self.single._model_bytes = None
            # With int8 activations the companion beats the float graph at every batch measured
            # (2.2x at 2 rows, 1.4x at 8); with float32 accumulation only a lone row gains.
            self.single_max_batch = INT8_DECODE_MAX_BATCH if q4_int8_decode else 1

    def _run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        past: KVState,
        step: str = "prefill",
    ) -> tuple[np.ndarray, KVState]:
        self._check_context(positions)
        sess = (
            self.single
            if step == "decode" and past.batch <= self.single_max_batch and self.single is not None
            else self.session
        )
        if isinstance(self.kv, OrtKVOps):
            return self._run_bound(sess, ids, positions, mask, past, self.kv)
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past.keys[i]
            feeds[f"past_key_values.{i}.value"] = past.values[i]
        out = sess.run(None, feeds)
        # Outputs follow the graph order: logits, then present.{i}.key / .value per layer.
        return out[0], KVState(list(out[1::2]), list(out[2::2]), mask)

    def _run_bound(
        self,
        sess: ort.InferenceSession,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        past: KVState,
        ops: OrtKVOps,
    ) -> tuple[np.ndarray, KVState]:
        """One run with the KV cache bound on the device: logits come back to the host, the
        presents stay where the past was."""
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", positions)
        io.bind_cpu_input("attention_mask", mask)
        for i in range(self.layers):
            io.bind_ortvalue_input(f"past_key_values.{i}.key", past.keys[i])
            io.bind_ortvalue_input(f"past_key_values.{i}.value", past.values[i])
        io.bind_output("logits", "cpu")
        for i in range(self.layers):
            io.bind_output(f"present.{i}.key", ops.device, ops.device_id)
            io.bind_output(f"present.{i}.value", ops.device, ops.device_id)
        sess.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), KVState(list(out[1::2]), list(out[2::2]), mask, ops)


def int8_model(path: Path) -> onnx.ModelProto:
    """The 4-bit graph at ``path`` with its MatMulNBits nodes set to ``accuracy_level`` 4: each
    32-value block of the activations is quantised to int8 and multiplied with integer dot
    products, which is what llama.cpp does for Q4_1 weights (Q8_1 activations). Measured on a
    2-core AVX2 EPYC: a lone decode step 2.6x faster than with float32 accumulation; logits differ
    from the float32 graph by up to 2.3 (float32 accumulation: 2e-4), so a token whose top two
    logits are closer than ~0.1 may flip (the greedy fixtures stay equal). In memory: the load
    may rewrite it further (``appliance.llm.fused_decode``) before it is serialised for ONNX
    Runtime."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 4
    return model


def greedy_generate(
    session: DecoderBase,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_on_eos: bool = False,
) -> list[list[int]]:
    """Argmax decoding of all prompts as one batch. Rows that stop at EOS leave the batch (so the
    EOS token is the last one returned for them); the rest continue undisturbed."""
    outputs: list[list[int]] = [[] for _ in prompts_ids]
    if max_new_tokens <= 0 or not prompts_ids:
        return outputs
    eos = set(session.eos_ids)
    logits, state = session.prefill(prompts_ids)
    active = list(range(len(prompts_ids)))  # which prompt each batch row belongs to
    while True:
        tokens = logits.argmax(axis=-1)
        keep = []
        for row, seq in enumerate(active):
            outputs[seq].append(int(tokens[row]))
            if len(outputs[seq]) < max_new_tokens and not (stop_on_eos and int(tokens[row]) in eos):
                keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(active):
            state, tokens, active = state.select(keep), tokens[keep], [active[r] for r in keep]
        logits = session.decode(tokens, state)
