"""Read a decoder checkpoint (llama-architecture GGUF, or a HF Llama/Qwen2 directory) into one form.

Both readers return a ``DecoderSource`` whose weights use Hugging Face names and layout, so the
builder has a single code path. GGUF specifics handled here: quantised tensors are dequantised to
float32, llama.cpp's interleaved-RoPE row order of Q/K is undone, and the byte-level BPE tokenizer
is rebuilt from metadata with the pre-tokenizer llama.cpp would use for ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_ARCHITECTURES = ("llama", "qwen2")
_MOE = (
    "a mixture-of-experts model{extra}; only dense Llama and Qwen2 decoders can be served "
    "(DeepSeek's R1 distills are: DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B, -Llama-8B/70B)"
)
# Architectures recognised only to say why they cannot be served (HF names, then GGUF names).
_REFUSED = {
    "DeepseekV3ForCausalLM": _MOE.format(extra=" with multi-head latent attention (DeepSeek-V3/R1)"),
    "DeepseekV2ForCausalLM": _MOE.format(extra=" with multi-head latent attention (DeepSeek-V2)"),
    "Qwen2MoeForCausalLM": _MOE.format(extra=" (Qwen2-MoE)"),
    "Qwen3MoeForCausalLM": _MOE.format(extra=" (Qwen3-MoE)"),
    "MixtralForCausalLM": _MOE.format(extra=" (Mixtral)"),
    "deepseek2": _MOE.format(extra=" with multi-head latent attention (DeepSeek-V2/V3/R1)"),
    "deepseek": _MOE.format(extra=" (DeepSeek-MoE)"),
    "qwen2moe": _MOE.format(extra=" (Qwen2-MoE)"),
    "qwen3moe": _MOE.format(extra=" (Qwen3-MoE)"),
}


def unsupported_architecture(where: str, arch: str, supported: Sequence[str]) -> ValueError:
    """The refusal for an architecture the builder cannot serve, saying why where it is known."""
    why = _REFUSED.get(arch)
    if why is not None:
        return ValueError(f"{where}: architecture {arch!r} is {why}")
    return ValueError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(supported)})")


def reasoning_parser_for(chat_template: str | None, pre: str | None = None) -> str:
    """The reasoning format of a model's family: ``deepseek-r1`` for DeepSeek-R1 and its distills
    (llama.cpp's ``deepseek-r1-qwen`` pre-tokenizer, or a chat template in DeepSeek's format that
    handles ``</think>``), else ``none``."""
    if pre == "deepseek-r1-qwen":
        return "deepseek-r1"
    if chat_template and "</think>" in chat_template and "<｜Assistant｜>" in chat_template:
        return "deepseek-r1"
    return "none"


@dataclass(frozen=True)
class DecoderConfig:
    arch: str  # "llama" | "qwen2"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float
    rms_eps: float
    vocab: int
    context_length: int
    tie_embeddings: bool
    qkv_bias: bool
    # Per-frequency divisors of the RoPE inverse frequencies (Llama 3.1 "llama3" or "linear"
    # scaling); None means plain RoPE.
    rope_freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class QuantizedTensor:
    """A GGUF weight as stored: ``blocks`` is uint8 [rows, bytes per row], each row a run of ggml
    blocks (``kind``: "Q4_1", "Q8_0", ...) along the input dimension, rows in HF order."""

    kind: str
    blocks: np.ndarray


@dataclass
class DecoderSource:
    config: DecoderConfig
    weights: dict[str, np.ndarray]  # float32, HF names ("model.layers.0.self_attn.q_proj.weight")
    tokenizer: Tokenizer
    chat_template: str | None
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int
    name: str = "decoder"
    bos_token: str | None = None
    eos_token: str | None = None
    # The GGUF's quantised 2-D weights as stored (HF names; float ``weights`` holds them dequantised
    # too), for builders that re-encode them instead of using float32. Empty for HF checkpoints.
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    # How chat answers split into reasoning and content (``appliance.llm.reasoning``).
    reasoning_parser: str = "none"


# ----------------------------------------------------------------------------- validation


def _expected_shapes(c: DecoderConfig) -> dict[str, tuple[int, ...]]:
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab, c.hidden),
        "model.norm.weight": (c.hidden,),
    }
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab, c.hidden)
    for i in range(c.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden,),
            p + "post_attention_layernorm.weight": (c.hidden,),
            p + "self_attn.q_proj.weight": (q, c.hidden),
            p + "self_attn.k_proj.weight": (kv, c.hidden),
            p + "self_attn.v_proj.weight": (kv, c.hidden),
            p + "self_attn.o_proj.weight": (c.hidden, q),
            p + "mlp.gate_proj.weight": (c.ffn, c.hidden),
            p + "mlp.up_proj.weight": (c.ffn, c.hidden),
            p + "mlp.down_proj.weight": (c.hidden, c.ffn),
        }
        if c.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
    return shapes


def validate(config: DecoderConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming every missing or mis-shaped tensor (a wrong config reads as garbage
    output much later otherwise)."""
    if config.heads % config.kv_heads:
        raise ValueError(f"heads ({config.heads}) must be a multiple of kv_heads ({config.kv_heads})")
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {config.head_dim}")
    expected = _expected_shapes(config)
    # Refuse rather than ignore tensors the graph has no place for (o_proj or MLP biases, ...).
    problems = [f"unsupported tensor {name}" for name in sorted(set(weights) - set(expected))]
    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"missing {name}")
        elif tuple(weights[name].shape) != shape:
            problems.append(f"{name}: shape {tuple(weights[name].shape)}, expected {shape}")
    if problems:
        raise ValueError("checkpoint does not match its config: " + "; ".join(problems[:8]))


def rope_llama3_factors(scaling: Mapping[str, Any], head_dim: int, theta: float) -> tuple[float, ...]:
    """Divisors of the inverse frequencies for Llama 3.1 rope scaling (what llama.cpp stores as
    ``rope_freqs.weight``), so HF and GGUF checkpoints share one representation."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def _rope_factors(scaling: Mapping[str, Any] | None, head_dim: int, theta: float) -> tuple[float, ...] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return (float(scaling["factor"]),) * (head_dim // 2)
    if kind == "llama3":
        return rope_llama3_factors(scaling, head_dim, theta)
    raise ValueError(f"rope scaling {kind!r} is not supported (only default, linear and llama3)")


# ----------------------------------------------------------------------------- tokenizer

# Pre-tokenizers as llama.cpp applies them per ``tokenizer.ggml.pre`` (llama-vocab.cpp); the
# llama3/qwen2 patterns are the originals from the models' tokenizer.json files.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's fallback for BPE vocabularies (also used when a GGUF has no ``pre`` key).
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]
_PRE_REGEXES: dict[str, list[str]] = {
    "default": _DEFAULT,
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "deepseek-r1-qwen": [_QWEN2],
}
PRE_TOKENIZERS = sorted([*_PRE_REGEXES, "smollm", "gpt-2"])
# Vocabularies where llama.cpp looks a whole pre-token up in the vocab before merging.
_IGNORE_MERGES = {"llama-bpe", "llama3"}
# Tokens llama.cpp also treats as end-of-generation when they are control tokens.
_EOG_TEXTS = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"}


def pre_tokenizer_for(pre: str) -> pre_tokenizers.PreTokenizer:
    """The ``tokenizers`` pre-tokenizer equivalent to llama.cpp's handling of ``tokenizer.ggml.pre``."""
    byte_level_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":  # single digits, then the GPT-2 split (verified against llama.cpp)
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre not in _PRE_REGEXES:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}"
        )
    splits: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False) for rx in _PRE_REGEXES[pre]
    ]
    return pre_tokenizers.Sequence([*splits, byte_level_only])


def tokenizer_from_vocab(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None,
    pre: str,
    *,
    bos_id: int | None = None,
    add_bos: bool = False,
) -> Tokenizer:
    """Byte-level BPE tokenizer from GGUF-style vocab lists (token type 3 = control, 4 = user)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [(a, b) for a, b in (m.split(" ", 1) for m in merges)]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizer_for(pre)
    tok.decoder = decoders.ByteLevel()
    types = list(token_types or [])
    # Control tokens must be matched verbatim in rendered chat prompts and skipped on decode.
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
    return tok


# ----------------------------------------------------------------------------- GGUF

_GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's Q/K row permutation (interleaved RoPE pairs -> HF rotate_half
    halves) per head; works for weights [rows, in] and biases [rows]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_fields(reader: Any) -> dict[str, Any]:
    return {name: f.contents() for name, f in reader.fields.items()}


def _f32(value: Any) -> float:
    """A GGUF float32 as the decimal it was written from (9.99999974e-06 -> 1e-05), as in HF configs."""
    return float(str(np.float32(value)))


def load_gguf(path: str | Path) -> DecoderSource:
    """Read a ``llama`` or ``qwen2`` architecture GGUF, dequantising every tensor to float32."""
    import gguf  # imported lazily: only builders need it, not the serving path

    path = Path(path)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (and not a Hugging Face checkpoint folder)")
    reader = gguf.GGUFReader(str(path))
    meta = _gguf_fields(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise unsupported_architecture(path.name, str(arch), GGUF_ARCHITECTURES)

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path.name}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"{path.name}: partial rotary embeddings are not supported")
    theta = _f32(key("rope.freq_base", 10000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    factors = None
    if scaling not in (None, "none"):
        factors = _rope_factors(
            {"type": scaling, "factor": meta.get(f"{arch}.rope.scaling.factor", 1.0)}, head_dim, theta
        )
    weights: dict[str, np.ndarray] = {}
    raw: dict[str, QuantizedTensor] = {}
    for t in reader.tensors:
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGML dims are innermost-first
        if t.name == "rope_freqs.weight":  # Llama 3.1 frequency divisors; replaces metadata scaling
            factors = tuple(float(x) for x in array)
            continue
        parts = t.name.split(".")
        if t.name in _GGUF_TENSORS:
            hf_name = _GGUF_TENSORS[t.name]
        elif parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
            hf_name = f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
        elif "_exps" in t.name or "_inp" in t.name:  # ffn_gate_exps, ffn_gate_inp: experts, router
            raise ValueError(
                f"{path.name}: tensor {t.name!r} belongs to a mixture-of-experts layer; "
                + _MOE.format(extra="")
            )
        else:
            raise ValueError(f"{path.name}: unexpected GGUF tensor {t.name!r}")
        weights[hf_name] = array
        if t.tensor_type.name.startswith(("Q", "IQ")) and array.ndim == 2:  # quantised block formats
            raw[hf_name] = QuantizedTensor(t.tensor_type.name, np.asarray(t.data).reshape(len(array), -1))
    kv_heads = int(key("attention.head_count_kv", heads))
    if arch == "llama":  # only the llama converter permutes; qwen2 GGUFs keep HF order (NEOX rope)
        for name in list(weights):
            if ".q_proj." in name or ".k_proj." in name:
                n_head = heads if ".q_proj." in name else kv_heads
                weights[name] = unpermute_rope_rows(weights[name], n_head)
                if name in raw:  # whole rows move, so the blocks along each row stay intact
                    raw[name] = QuantizedTensor(raw[name].kind, unpermute_rope_rows(raw[name].blocks, n_head))
    embed = weights.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{path.name}: GGUF has no token_embd.weight")
    config = DecoderConfig(
        arch=arch,
        layers=int(key("block_count")),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ffn=int(key("feed_forward_length")),
        rope_theta=theta,
        rms_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        vocab=int(embed.shape[0]),
        context_length=int(key("context_length")),
        tie_embeddings="lm_head.weight" not in weights,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in weights,
        rope_freq_factors=factors,
    )
    validate(config, weights)

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path.name}: tokenizer model {model!r} is not supported, only byte-level BPE ('gpt2')"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    bos = meta.get("tokenizer.ggml.bos_token_id")
    bos_id = None if bos is None else int(bos)
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    tokenizer = tokenizer_from_vocab(
        tokens,
        meta.get("tokenizer.ggml.merges") or [],
        types,
        pre,
        bos_id=bos_id,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
    eos_ids: list[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{k}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    eos_ids += [i for i, ty in enumerate(types) if ty == 3 and tokens[i] in _EOG_TEXTS and i not in eos_ids]
    if not eos_ids:
        raise ValueError(f"{path.name}: GGUF names no end-of-sequence token")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    template = meta.get("tokenizer.chat_template")
    return DecoderSource(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=template,
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=eos_ids[0] if pad is None else int(pad),
        name=str(meta.get("general.name") or path.stem),
        bos_token=None if bos_id is None else tokens[bos_id],
        eos_token=tokens[eos_ids[0]],
        quantized=raw,
        reasoning_parser=reasoning_parser_for(template, pre),
    )


# ----------------------------------------------------------------------------- HF checkpoints

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32. Parsed by hand because numpy has no
    bfloat16, the usual dtype of published checkpoints."""
    path = Path(path)
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            array = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            array = raw.view(_ST_DTYPES[info["dtype"]]).astype(np.float32)
        else:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = array.reshape(info["shape"])
    return out


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config may store an AddedToken as a dict
        return str(value.get("content"))
    return None if value is None else str(value)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _chat_template(directory: Path, tcfg: Mapping[str, Any]) -> str | None:
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
    return None if template is None else str(template)


def load_hf_checkpoint(directory: str | Path) -> DecoderSource:
    """Read a HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` directory (config.json, safetensors
    shards, tokenizer.json, tokenizer_config.json, optional generation_config.json)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: no config.json, so not a Hugging Face checkpoint folder")
    cfg = json.loads((directory / "config.json").read_text())
    hf_arch = (cfg.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise unsupported_architecture(str(directory), hf_arch, list(ARCHITECTURES))
    if cfg.get("use_sliding_window"):
        raise ValueError(f"{directory}: sliding-window attention is not supported")

    weights: dict[str, np.ndarray] = {}
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{directory}: no *.safetensors files")
    for shard in shards:
        weights.update(read_safetensors(shard))
    for name in [n for n in weights if n.endswith("rotary_emb.inv_freq")]:  # old checkpoints carry these
        del weights[name]

    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    # transformers 5 moved rope settings into "rope_parameters".
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    tie = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in weights
    if tie:
        weights.pop("lm_head.weight", None)
    embed = weights.get("model.embed_tokens.weight")
    config = DecoderConfig(
        arch=ARCHITECTURES[hf_arch],
        layers=int(cfg["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn=int(cfg["intermediate_size"]),
        rope_theta=theta,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        vocab=int(cfg["vocab_size"] if embed is None else embed.shape[0]),
        context_length=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=tie,
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in weights,
        rope_freq_factors=_rope_factors(scaling, head_dim, theta),
    )
    validate(config, weights)

    if not (directory / "tokenizer.json").is_file():
        raise ValueError(
            f"{directory}: no tokenizer.json; the appliance reads the Hugging Face fast tokenizer file "
            "(save it with tokenizer.save_pretrained from transformers)"
        )
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tcfg_path = directory / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    gen_path = directory / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}

    def token_id(text: str | None) -> int | None:
        return None if text is None else tokenizer.token_to_id(text)

    bos_token, eos_token = _token_text(tcfg.get("bos_token")), _token_text(tcfg.get("eos_token"))
    bos_id = token_id(bos_token)
    if bos_id is None:
        bos_id = next(iter(_as_list(gen.get("bos_token_id", cfg.get("bos_token_id")))), None)
    eos_ids: list[int] = []
    for i in [token_id(eos_token), *_as_list(gen.get("eos_token_id")), *_as_list(cfg.get("eos_token_id"))]:
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    if not eos_ids:
        raise ValueError(f"{directory}: no end-of-sequence token in the tokenizer or generation config")
    pad = token_id(_token_text(tcfg.get("pad_token")))
    if pad is None:
        pad = next(iter(_as_list(gen.get("pad_token_id", cfg.get("pad_token_id")))), eos_ids[0])
    template = _chat_template(directory, tcfg)
    return DecoderSource(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=template,
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=int(pad),
        name=directory.name,
        bos_token=bos_token if bos_token else (None if bos_id is None else tokenizer.id_to_token(bos_id)),
        eos_token=eos_token if eos_token else tokenizer.id_to_token(eos_ids[0]),
        reasoning_parser=reasoning_parser_for(template),
    )


def load_source(path: str | Path) -> DecoderSource:
    """A ``.gguf`` file or a HF checkpoint directory."""
    path = Path(path)
    return load_hf_checkpoint(path) if path.is_dir() else load_gguf(path)
