"""A minimal ONNX Runtime driver for graphs written by ``builder.build_decoder``.

Batches are left-padded: every row's tokens form a contiguous run that ends at the last column,
so one new column per decode step serves all rows, and positions are ``cumsum(mask) - 1``.
``KVState`` keeps that invariant under the edits a continuous-batching scheduler needs: drop
rows (``select``), add separately prefilled rows (``join``, which left-pads the narrower side),
and drop columns that became padding in every row (``trim``). None of these recomputes anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


@dataclass
class KVState:
    """Per-layer K/V [B, kv_heads, T, head_dim] and the mask [B, T] that says which are real."""

    keys: list[np.ndarray]
    values: list[np.ndarray]
    mask: np.ndarray  # int64, rows of the form 0..0 1..1

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> np.ndarray:
        """Tokens held per row, which is also the position of each row's next token."""
        return np.asarray(self.mask.sum(axis=1))

    def select(self, rows: Sequence[int]) -> KVState:
        """The given rows in the given order (e.g. without finished sequences), trimmed."""
        idx = np.asarray(rows, dtype=np.int64)
        return KVState([k[idx] for k in self.keys], [v[idx] for v in self.values], self.mask[idx]).trim()

    def trim(self) -> KVState:
        """Drop leading columns that are padding in every row."""
        drop = self.width - int(self.lengths().max(initial=0))
        if drop <= 0:
            return self
        return KVState(
            [k[:, :, drop:] for k in self.keys], [v[:, :, drop:] for v in self.values], self.mask[:, drop:]
        )

    @staticmethod
    def join(states: Sequence[KVState]) -> KVState:
        """Stack batches row-wise, left-padding narrower ones so all stay aligned at the right."""
        width = max(s.width for s in states)

        def pad(a: np.ndarray, axis: int) -> np.ndarray:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (width - a.shape[axis], 0)
            return np.pad(a, widths)

        layers = range(len(states[0].keys))
        return KVState(
            [np.concatenate([pad(s.keys[i], 2) for s in states]) for i in layers],
            [np.concatenate([pad(s.values[i], 2) for s in states]) for i in layers],
            np.concatenate([pad(s.mask, 1) for s in states]),
        )


class DecoderSession:
    """An ``onnxruntime.InferenceSession`` over a built decoder directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        intra_op_threads: int | None = None,
        providers: Sequence[str] | None = None,
        single_stream: str | Path | None = None,
    ) -> None:
        """``single_stream``: the folder of a 4-bit build of the same weights (same inputs and
        outputs, logits within 2e-4): a batch of one decodes there, where it is 1.4x faster; larger
        batches and prefill stay on the float graph, which is faster for them."""
        self.model_dir = model_dir = Path(model_dir)
        self.generation: dict[str, Any] = json.loads((model_dir / "generation.json").read_text())
        g = self.generation
        self.layers, self.kv_heads, self.head_dim = int(g["layers"]), int(g["kv_heads"]), int(g["head_dim"])
        self.context_length, self.vocab = int(g["context_length"]), int(g["vocab"])
        self.eos_ids: list[int] = [int(i) for i in g["eos_ids"]]
        self.pad_id = int(g["pad"])
        self.kv_dtype = np.dtype(g["dtype"])
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.single: ort.InferenceSession | None = None
        if single_stream is not None:
            self.single = ort.InferenceSession(
                str(Path(single_stream) / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )

    def _run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        past: KVState,
        session: ort.InferenceSession | None = None,
    ) -> tuple[np.ndarray, KVState]:
        if int(positions.max(initial=0)) >= self.context_length:
            raise ValueError(f"sequence exceeds the model context of {self.context_length} tokens")
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = past.keys[i]
            feeds[f"past_key_values.{i}.value"] = past.values[i]
        out = (session or self.session).run(None, feeds)
        # Outputs follow the graph order: logits, then present.{i}.key / .value per layer.
        return out[0], KVState(list(out[1::2]), list(out[2::2]), mask)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, KVState]:
        """Run whole prompts (left-padded into one batch). Returns the last-position logits [B, vocab]
        as float32 and the KV state to continue from."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        empty = np.zeros((len(prompts), self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        logits, state = self._run(
            ids, positions, mask, KVState([empty] * self.layers, [empty] * self.layers, mask)
        )
        return logits[:, -1, :], state

    def decode(self, next_ids: Sequence[int] | np.ndarray, state: KVState) -> np.ndarray:
        """Feed one token per row; advances ``state`` in place and returns logits [B, vocab]."""
        ids = np.asarray(next_ids, dtype=np.int64).reshape(state.batch, 1)
        positions = state.lengths().astype(np.int64).reshape(state.batch, 1)
        mask = np.concatenate([state.mask, np.ones((state.batch, 1), dtype=np.int64)], axis=1)
        single = self.single if state.batch == 1 else None
        logits, new = self._run(ids, positions, mask, state, single)
        state.keys, state.values, state.mask = new.keys, new.values, new.mask
        return logits[:, -1, :]


def greedy_generate(
    session: DecoderSession,
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
