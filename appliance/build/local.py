"""``appliance models add NAME --from PATH``: serve your own decoder checkpoint.

PATH is a Hugging Face checkpoint folder (``LlamaForCausalLM`` / ``Qwen2ForCausalLM``: the
DeepSeek-R1 distills among them) or a GGUF file (``llama`` / ``qwen2``). ``add`` reads it first,
so anything the builder cannot serve is refused before a folder is written; then it writes
``NAME/model.yaml`` with the checkpoint's path as its source and builds it the way ``models
pull`` builds the shipped models. ``models build NAME`` rebuilds from the recorded path.

A GGUF's quantised weights are dequantised exactly to float32 (or float16 with ``--precision
fp16``). Where its blocks allow (every projection Q4_1 and the LM head Q8_0, as in the SmolLM2
GGUF) the exact 4-bit companion for single-stream CPU decoding is built as well.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from appliance.build.sources import DecoderSource, load_source
from appliance.repository import MODEL_FILE, ModelEntry, RepositoryError

BUILDER = "decoder"
PRECISIONS = ("fp32", "fp16")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_Q4_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def read_checkpoint(path: Path) -> DecoderSource:
    """The checkpoint at ``path``, or a RepositoryError that says why it cannot be served."""
    if not path.exists():
        raise RepositoryError(f"{path}: no such file or folder")
    try:
        return load_source(path)
    except (ValueError, OSError) as exc:
        raise RepositoryError(f"cannot serve {path}: {exc}") from None


def q4_companion_possible(source: DecoderSource) -> bool:
    """Whether the GGUF's blocks can be re-encoded exactly as the 4-bit companion build."""
    q = source.quantized
    head = "model.embed_tokens.weight" if source.config.tie_embeddings else "lm_head.weight"
    if head not in q or q[head].kind != "Q8_0":
        return False
    for i in range(source.config.layers):
        for proj in _Q4_WEIGHTS:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            t = q.get(f"model.layers.{i}.{part}.{proj}.weight")
            if t is None or t.kind != "Q4_1":
                return False
    return True


def model_file(name: str, path: Path, source: DecoderSource, precision: str) -> dict[str, Any]:
    c = source.config
    artefacts = {"model": "model.onnx", "tokenizer": "tokenizer.json", "generation": "generation.json"}
    if precision == "fp32" and q4_companion_possible(source):
        artefacts["single_stream"] = "q4/model.onnx"
    kind = "GGUF" if path.is_file() else "Hugging Face checkpoint"
    return {
        "name": name,
        "kind": "generate",
        "description": f"{source.name}: {c.arch}, {c.layers} layers, {c.hidden} hidden ({kind})",
        "backend": "auto",
        "artefacts": artefacts,
        "source": {"path": str(path), "builder": BUILDER, "precision": precision},
        "queue": {
            "priority_levels": 3,
            "default_priority": 2,
            "max_queue_size": 64,
            "default_timeout_ms": 60000,
        },
    }


def build_entry(entry: ModelEntry, source: DecoderSource | None = None) -> dict[str, object]:
    """The ``decoder`` builder: ``source.path`` into the model folder (``models build`` calls it
    with no ``source``, reading the recorded path again)."""
    from appliance.build.decoder import build_decoder

    src = entry.spec.source
    if not src.path:
        raise RepositoryError(f"{entry.name}/{MODEL_FILE}: source.path is required by the {BUILDER} builder")
    if source is None:
        source = read_checkpoint(Path(src.path))
    float16 = src.precision == "fp16"
    info = build_decoder(source, entry.folder, float16=float16)
    extra: dict[str, object] = {"dtype": info.dtype, "nodes": info.nodes, "bytes": info.bytes}
    extra["reasoning_parser"] = source.reasoning_parser
    if "single_stream" in entry.spec.artefacts:
        q4 = build_decoder(source, entry.artefact("single_stream").parent, weights="q4", q8_head=True)
        extra["single_stream_bytes"] = q4.bytes
    return extra


def add(name: str, path: Path, repository: Path, *, precision: str = "fp32", force: bool = False) -> Path:
    """Write ``repository/NAME/model.yaml`` for the checkpoint at ``path`` and build it."""
    from appliance.build.pull import build

    if not NAME_PATTERN.match(name):
        raise RepositoryError(
            f"model name {name!r}: expected lowercase letters, digits, '.', '_' or '-' (at most 64)"
        )
    if precision not in PRECISIONS:
        raise RepositoryError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    folder = repository / name
    if (folder / MODEL_FILE).exists() and not force:
        raise RepositoryError(
            f"{name}: {folder / MODEL_FILE} already exists; `appliance models build {name}` rebuilds it, "
            "--force replaces it"
        )
    path = path.resolve()
    source = read_checkpoint(path)
    if not source.chat_template:
        print(
            f"{name}: {path} has no chat template, so /v1/chat/completions will refuse this model "
            "(/v1/completions works); add chat_template.jinja (or tokenizer_config.json's chat_template) "
            f"and run `appliance models build {name}`",
            file=sys.stderr,
        )
    folder.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Added by `appliance models add {name} --from {path}`; "
        f"`appliance models build {name}` rebuilds it from that path.\n"
    )
    spec = model_file(name, path, source, precision)
    (folder / MODEL_FILE).write_text(header + yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    if source.reasoning_parser != "none":
        print(f"{name}: reasoning format {source.reasoning_parser} (generation.reasoning_parser: auto)")
    return build(folder / MODEL_FILE, source=source)


__all__ = ["BUILDER", "PRECISIONS", "add", "build_entry", "q4_companion_possible", "read_checkpoint"]
