"""Reduced-precision variants of a built float32 graph: FP16, and calibrated static INT8 (QDQ).

INT8 is the explicit-quantization form TensorRT 10 builds INT8 engines from and ONNX Runtime's CPU
provider runs: QuantizeLinear/DequantizeLinear pairs around the GEMMs, signed int8, symmetric
(zero point 0), per-output-channel weight scales, per-tensor activation scales calibrated on
sample text. ``onnxruntime.quantization.quantize_static`` writes the QDQ graph; this module only
chooses what to quantize and prepares the graph for it:

- Only the MatMuls with a weight initializer (the linear layers) are quantized; the attention
  products (Q·Kᵀ, P·V) and the elementwise ops stay float, as in TensorRT's own BERT INT8 recipe.
- BERT-family encoders carry a few huge activation outliers (MiniLM: one hidden channel reaches
  ~30 on the [CLS] token while the median channel stays under 1.5), so one per-tensor int8 scale
  leaves the other channels a handful of levels: quantized as is, MiniLM's held-out cosine to
  float32 falls to 0.95. SmoothQuant (Xiao et al., 2023) moves that range into the weights, exactly
  in real arithmetic: each linear layer's input channel k is divided by
  ``s_k = max|x_k|**alpha / max|W_k|**(1 - alpha)`` (an elementwise float Mul before the
  Q node) and row k of the weight multiplied by ``s_k``.

Every variant is checked against the float32 graph on held-out sentences (never the calibration
ones): the build fails, naming the figure, when the minimum cosine similarity is under the bar.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

from appliance.build.bert import _atomic_write, encode_batch

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MIN_COSINE = 0.99
# Share of the activation range moved into the weights. MiniLM, min held-out cosine to float32 by
# alpha: none 0.953, 0.5 0.891, 0.7 0.991, 0.8 0.993 (weights are per-channel, so they absorb it).
SMOOTHING_ALPHA = 0.8
_DATA = Path(__file__).parent / "data"
DEFAULT_CALIBRATION = _DATA / "calibration.txt"
HELD_OUT = _DATA / "held_out.txt"
_CALIBRATION_BATCH = 8


class QualityError(RuntimeError):
    """A reduced-precision graph is too far from its float32 reference."""


@dataclass(frozen=True)
class Quality:
    min_cosine: float
    mean_cosine: float
    sentences: int
    threshold: float

    def record(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def read_sentences(path: Path) -> list[str]:
    """One sentence per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read sentences from {path}: {exc}") from None
    sentences = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not sentences:
        raise ValueError(f"{path}: no sentences (one per line expected)")
    return sentences


def held_out_sentences(calibration: Sequence[str]) -> list[str]:
    """The shipped held-out set minus anything the calibration saw (a user's file may overlap)."""
    seen = {s.casefold() for s in calibration}
    held = [s for s in read_sentences(HELD_OUT) if s.casefold() not in seen]
    if len(held) < 8:
        raise ValueError("the calibration file repeats the held-out sentences; use different text")
    return held


def _session(model: Path | bytes) -> Any:
    import onnxruntime as ort  # the build path only; kept lazy like the other builders' imports

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # builds run beside a serving process; these graphs are small
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def embed(model: Path, tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    ids, mask = encode_batch(tokenizer, texts)
    out = _session(model).run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    return np.asarray(out[0], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embedding_quality(
    reference: Path, candidate: Path, tokenizer: Tokenizer, texts: Sequence[str], threshold: float
) -> Quality:
    """Cosine of each sentence's embedding from ``candidate`` to the float32 ``reference``."""
    cos = cosines(embed(candidate, tokenizer, texts), embed(reference, tokenizer, texts))
    return Quality(float(cos.min()), float(cos.mean()), len(texts), threshold)


def check(quality: Quality, what: str) -> None:
    if not quality.min_cosine >= quality.threshold:  # also refuses NaN
        raise QualityError(
            f"{what}: minimum cosine similarity to the float32 graph {quality.min_cosine:.5f} "
            f"(mean {quality.mean_cosine:.5f}, {quality.sentences} held-out sentences) is below "
            f"the required {quality.threshold}; keep the float32 model or lower --min-cosine"
        )


def runs_on_cpu(model: Path) -> str | None:
    """None when ONNX Runtime's CPU provider can load the graph, else its reason (fp16 kernels
    missing on this build): such a graph is for GPU engines only."""
    try:
        _session(model)
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        return str(exc).splitlines()[0]
    return None


# ----------------------------------------------------------------------------- INT8


def _calibration_batches(tokenizer: Tokenizer, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    batches = []
    for i in range(0, len(texts), _CALIBRATION_BATCH):
        ids, mask = encode_batch(tokenizer, texts[i : i + _CALIBRATION_BATCH])
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def linear_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second operand is a 2-D weight initializer: the linear layers."""
    weights = {i.name: i for i in model.graph.initializer if len(i.dims) == 2}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _channel_absmax(model: onnx.ModelProto, names: Sequence[str], batches: Sequence[dict[str, Any]]) -> Any:
    """Per-last-axis-channel max |x| of the named tensors over the calibration batches."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = _session(probe.SerializeToString())
    amax: dict[str, np.ndarray] = {}
    for feed in batches:
        for name, value in zip(names, session.run(list(names), feed), strict=True):
            m = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


def smooth(model: onnx.ModelProto, batches: Sequence[dict[str, Any]], alpha: float = SMOOTHING_ALPHA) -> None:
    """SmoothQuant in place on every linear MatMul: x/s feeds the MatMul, W rows are scaled by s."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = linear_matmuls(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        consumers.setdefault(n.input[0], []).append(n)
    amax = _channel_absmax(model, sorted(consumers), batches)
    new_nodes: list[onnx.NodeProto] = []
    for x, users in consumers.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in users]
        w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = np.power(np.maximum(amax[x], 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-5, None).astype(np.float32)
        smoothed = f"{x}.smoothed"
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}.inv_smoothing")
        model.graph.initializer.append(inv)
        new_nodes.append(helper.make_node("Mul", [x, inv.name], [smoothed], name=smoothed))
        for n, w in zip(users, weights, strict=True):
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], n.input[1]))
            n.input[0] = smoothed
    # Keep the node list topologically sorted: each Mul goes right before its first consumer.
    first_user = {x: users[0].name for x, users in consumers.items()}
    by_user = {first_user[n.input[0]]: n for n in new_nodes}
    ordered: list[onnx.NodeProto] = []
    for n in model.graph.node:
        if n.name in by_user:
            ordered.append(by_user[n.name])
        ordered.append(n)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


@dataclass(frozen=True)
class Int8Info:
    quantized_nodes: int
    calibration_sentences: int
    calibration_sha256: str
    smoothing_alpha: float


def quantize_int8(
    fp32_model: Path,
    out_model: Path,
    tokenizer: Tokenizer,
    calibration: Sequence[str],
    alpha: float = SMOOTHING_ALPHA,
) -> Int8Info:
    """Write ``out_model``: the smoothed float32 graph with calibrated symmetric int8 QDQ GEMMs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = _calibration_batches(tokenizer, calibration)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, Any]] = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    model = onnx.load(str(fp32_model))
    smooth(model, batches, alpha)
    targets = [n.name for n in linear_matmuls(model)]
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        smoothed = Path(tmp) / "smoothed.onnx"
        onnx.save(model, str(smoothed))
        # quantize_static logs advice (pre-processing, ...) at WARNING on the root logger.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(smoothed),
                str(Path(tmp) / "int8.onnx"),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=targets,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    # Q/DQ on the GEMM inputs only, as TensorRT wants: a quantized MatMul output
                    # would put the residual stream's outliers back on a per-tensor int8 scale.
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                },
            )
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(Path(tmp) / "int8.onnx"))
    quantized.producer_name = "appliance.build.precision"
    onnx.checker.check_model(quantized)
    _atomic_write(out_model, quantized.SerializeToString())
    digest = hashlib.sha256("\n".join(calibration).encode("utf-8")).hexdigest()
    return Int8Info(len(targets), len(calibration), digest, alpha)


# ----------------------------------------------------------------------------- encoder variants


def build_embedding_variant(
    checkpoint: Path,
    out_dir: Path,
    precision: str,
    *,
    calibration: Path | None = None,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> dict[str, Any]:
    """Build the ``precision`` variant of a BERT checkpoint into ``out_dir`` and return its build
    record. The float32 graph is built beside it as the reference; a variant that fails the
    quality bar raises QualityError and leaves ``out_dir`` as it was."""
    from appliance.build.bert import ONNX_FILE, TOKENIZER_FILE, build_bert_embedding

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        build_bert_embedding(checkpoint, out_dir)
        return {"precision": "fp32"}
    calibration_file = calibration or DEFAULT_CALIBRATION
    calibration_texts = read_sentences(calibration_file)
    held_out = held_out_sentences(calibration_texts if precision == "int8" else [])
    record: dict[str, Any] = {"precision": precision}
    with tempfile.TemporaryDirectory(prefix=f"{precision}-") as tmp:
        reference, staged = Path(tmp) / "fp32", Path(tmp) / precision
        build_bert_embedding(checkpoint, reference)
        tokenizer = Tokenizer.from_file(str(reference / TOKENIZER_FILE))
        if precision == "fp16":
            build_bert_embedding(checkpoint, staged, float16=True)
        else:
            staged.mkdir()
            info = quantize_int8(reference / ONNX_FILE, staged / ONNX_FILE, tokenizer, calibration_texts)
            (staged / TOKENIZER_FILE).write_bytes((reference / TOKENIZER_FILE).read_bytes())
            record["calibration"] = {
                "file": "default" if calibration is None else Path(calibration).name,
                **asdict(info),
            }
        why = runs_on_cpu(staged / ONNX_FILE)
        if why is None:
            quality = embedding_quality(
                reference / ONNX_FILE, staged / ONNX_FILE, tokenizer, held_out, min_cosine
            )
            check(quality, f"{precision} build of {checkpoint.name}")
            record["quality"] = quality.record()
        else:
            # Nothing here can run it; TensorRT will, so it is marked rather than refused.
            record["gpu_only"] = f"ONNX Runtime CPU cannot run it, quality unchecked: {why}"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (TOKENIZER_FILE, ONNX_FILE):
            _atomic_write(out_dir / name, (staged / name).read_bytes())
    return record


# ----------------------------------------------------------------------------- decoder variants

DECODER_CHECK_PROMPTS = 2
DECODER_CHECK_TOKENS = 16


def greedy_agreement(reference: Path, candidate: Path, prompts: Sequence[str], tokens: int) -> dict[str, Any]:
    """Greedy continuations of the chat-rendered ``prompts`` from both decoder folders: how many
    prompts give the same tokens, and where the first differing one parts."""
    from appliance.llm.chat_template import render_chat
    from appliance.llm.runtime import DecoderSession, greedy_generate

    outputs = []
    for folder in (reference, candidate):
        session = DecoderSession(folder, intra_op_threads=1)
        gen = session.generation
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        ids = [
            tokenizer.encode(
                render_chat(
                    gen["chat_template"],
                    [{"role": "user", "content": p}],
                    bos_token=gen["bos_token"],
                    eos_token=gen["eos_token"],
                ),
                add_special_tokens=False,
            ).ids
            for p in prompts
        ]
        outputs.append([greedy_generate(session, [one], tokens)[0] for one in ids])
        del session
    same = [a == b for a, b in zip(*outputs, strict=True)]
    parts = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(*outputs, strict=True)
    ]
    return {"prompts": len(prompts), "tokens": tokens, "identical": sum(same), "first_difference": parts}


def build_decoder_variant(source: Any, out_dir: Path, precision: str) -> dict[str, Any]:
    """The FP16 decoder: its greedy tokens must equal the float32 graph's on held-out prompts (on
    the CPU where ONNX Runtime runs it, else it is marked GPU-only). A failing build raises
    QualityError and leaves ``out_dir`` as it was."""
    import os

    from appliance.build.decoder import build_decoder

    if precision != "fp16":
        raise ValueError(f"decoders are built as fp32 or fp16, not {precision!r}")
    record: dict[str, Any] = {"precision": precision}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fp16-", dir=out_dir) as tmp:
        reference, staged = Path(tmp) / "fp32", Path(tmp) / "fp16"
        build_decoder(source, reference)
        info = build_decoder(source, staged, float16=True)
        why = runs_on_cpu(staged / "model.onnx")
        if why is None:
            prompts = read_sentences(HELD_OUT)[:DECODER_CHECK_PROMPTS]
            agreement = greedy_agreement(reference, staged, prompts, DECODER_CHECK_TOKENS)
            record["greedy_check"] = agreement
            if agreement["identical"] != agreement["prompts"]:
                raise QualityError(
                    f"fp16 build of {source.name}: greedy tokens differ from the float32 graph's on "
                    f"{agreement['prompts'] - agreement['identical']} of {agreement['prompts']} held-out "
                    f"prompts (first differing token at {agreement['first_difference']})"
                )
        else:
            record["gpu_only"] = f"ONNX Runtime CPU cannot run it, greedy check skipped: {why}"
        for name in info.files:
            os.replace(staged / name, out_dir / name)
    record.update({"dtype": info.dtype, "nodes": info.nodes, "bytes": info.bytes})
    return record
