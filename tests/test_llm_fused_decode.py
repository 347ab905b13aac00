"""The CPU decode graph rewritten at load (``appliance.llm.fused_decode``): ``generation.fused_decode``
(the 8-bit LM head and the one-token layout, on) and ``generation.fused_attention`` (off).

The 4-bit companion with int8 activations is rewritten in memory: the split Q8_0 LM head becomes one
8-bit ``MatMulNBits``; the rotary embedding and attention layout are spelled for one token per row
in ~19 fewer nodes per layer; or, optionally, each layer's attention becomes one
``GroupQueryAttention`` node (KV append and masked softmax inside; Q and K rotated by the graph's
own rotary nodes). Promised: the same inputs, outputs and KV layout; the same weights bit for bit;
the one-token layout the same logits and presents bit for bit; with float accumulation the fused
attention within 1e-3 of the unfused graph (measured 1e-4, left-padded batch included); with int8
activations the greedy fixtures, alone and batched; a graph without the builder's names is left as
it was."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.llm.fused_decode import eight_bit_head, fuse_attention, fused_decode_graph, one_token_layout
from appliance.llm.kv import KVState
from appliance.llm.runtime import DecoderSession, greedy_generate, int8_model

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.json"
MAX_ATTENTION_DIFF = 1e-3  # measured 1.0e-4 on a left-padded batch of 3, 20 steps


@pytest.fixture(scope="module")
def folder(smollm_folder: Path) -> Path:
    if not (smollm_folder / "q4" / "model.onnx").exists():
        pytest.skip("the SmolLM2 build has no 4-bit companion")
    return smollm_folder


@pytest.fixture(scope="module", params=[False, True], ids=["head", "head+attention"])
def fused(folder: Path, request: pytest.FixtureRequest) -> DecoderSession:
    return DecoderSession(
        folder,
        intra_op_threads=2,
        single_stream=folder / "q4",
        q4_int8_decode=True,
        fused_decode=True,
        fused_attention=request.param,
    )


def _cases() -> tuple[list[list[int]], list[list[int]]]:
    cases = json.loads(FIXTURE.read_text())["cases"]
    return [c["prompt_ids"] for c in cases], [c["greedy_new_ids"] for c in cases]


def test_the_rewrite_keeps_the_interface_and_fuses_each_layer(folder: Path, fused: DecoderSession) -> None:
    before = int8_model(folder / "q4" / "model.onnx")
    names = ([i.name for i in before.graph.input], [o.name for o in before.graph.output])
    count = len(before.graph.node)
    after = fused_decode_graph(before, fused.layers, fused.kv_heads, fused.head_dim, attention=True)
    assert ([i.name for i in after.graph.input], [o.name for o in after.graph.output]) == names
    ops = [(n.domain, n.op_type) for n in after.graph.node]
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == fused.layers
    assert not any(n.op_type == "Concat" and n.output[0].startswith("present.") for n in after.graph.node)
    heads = [n for n in after.graph.node if n.output[0] == "lm_head.q8_logits"]
    assert len(heads) == 1 and {a.name: a.i for a in heads[0].attribute}["bits"] == 8
    assert len(after.graph.node) < 0.85 * count  # 2225 -> 1827 nodes for SmolLM2-135M
    used = {i for n in after.graph.node for i in n.input}
    assert all(t.name in used for t in after.graph.initializer), "no dead weights left in memory"


def test_the_8bit_head_holds_the_same_weights(folder: Path) -> None:
    model = int8_model(folder / "q4" / "model.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed, scales = inits["lm_head.q8"], inits["lm_head.q8_scales"]
    offsets = inits["lm_head.q8_offsets_t"].T.astype(np.float64)  # [N, K/32]: 8d
    n, half = packed.shape[0], packed.shape[1] // 2
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, 2 * half, 32).astype(np.float64)
    s = scales.reshape(n, 2 * half, 1).astype(np.float64)
    split = s[:, :half] * (nibbles[:, :half] - 8) + s[:, half:] * (nibbles[:, half:] - 8) + offsets[..., None]
    eight_bit_head(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    u, d = inits["lm_head.q8_u8"].astype(np.float64), inits["lm_head.q8_d"].astype(np.float64)
    assert np.array_equal(d.reshape(n, half, 1) * (u - 128), split)  # 128: 8-bit's implicit zero point


def test_the_one_token_layout_is_the_same_arithmetic_in_fewer_nodes(folder: Path) -> None:
    """The decode layout (one Gather-Mul-Mul-Add rotation over all heads, reshapes for the
    transposes of a length-1 axis, no causal mask) gives the same logits and presents bit for bit
    as the graph as built, with int8 activations, alone and in a left-padded batch; ~19 fewer
    nodes per layer."""
    prompts, _ = _cases()
    session = DecoderSession(folder, intra_op_threads=2, single_stream=folder / "q4", q4_int8_decode=True)
    dims = (session.layers, session.kv_heads, session.head_dim)
    built = eight_bit_head(int8_model(folder / "q4" / "model.onnx"))
    count = len(built.graph.node)
    names = ([i.name for i in built.graph.input], [o.name for o in built.graph.output])
    plain = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    compact = one_token_layout(built, *dims)
    assert ([i.name for i in compact.graph.input], [o.name for o in compact.graph.output]) == names
    assert len(compact.graph.node) <= count - 18 * session.layers  # 2220 -> 1672 for SmolLM2-135M
    assert not any(n.op_type == "Transpose" and n.name.endswith("_bhsd") for n in compact.graph.node)
    laid_out = ort.InferenceSession(compact.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in ([prompts[1]], [prompts[0], prompts[1][:20], prompts[1]]):
        (before, old), (after, new) = (_greedy(session, single, batch, 8) for single in (plain, laid_out))
        assert np.array_equal(before, after)
        pairs = zip(old.keys + old.values, new.keys + new.values, strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("rotary_inside", [False, True])
def test_fused_attention_matches_the_unfused_graph_with_float_accumulation(
    folder: Path, rotary_inside: bool
) -> None:
    """Without int8 activations (which amplify tiny differences) the fused attention is the same
    computation: logits within 1e-3 on a left-padded batch whose rows have different lengths,
    with the graph's rotary nodes (the default) or GroupQueryAttention's own."""
    prompts, _ = _cases()
    batch = [prompts[0], prompts[1][:20], prompts[1]]
    path = folder / "q4" / "model.onnx"
    session = DecoderSession(folder, intra_op_threads=2, single_stream=folder / "q4")
    session.single_max_batch = len(batch)  # decode the whole batch on the companion
    plain = session.single
    layers, kv_heads, head_dim = session.layers, session.kv_heads, session.head_dim
    model = fuse_attention(onnx.load(str(path)), layers, kv_heads, head_dim, rotary_inside=rotary_inside)
    fused_graph = model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    fused_session = ort.InferenceSession(fused_graph, options, providers=["CPUExecutionProvider"])
    runs = [_greedy(session, single, batch, 12) for single in (plain, fused_session)]
    assert float(np.abs(runs[0][0] - runs[1][0]).max()) < MAX_ATTENTION_DIFF
    for a, b in zip(runs[0][1].keys + runs[0][1].values, runs[1][1].keys + runs[1][1].values, strict=True):
        assert a.shape == b.shape  # [rows, kv_heads, tokens, head_dim], rows right-aligned as before
        assert float(np.abs(a - b).max()) < MAX_ATTENTION_DIFF


def test_fused_decode_keeps_the_greedy_fixtures(fused: DecoderSession) -> None:
    prompts, expected = _cases()
    assert fused.single is not None
    real = fused.single
    calls: list[int] = []

    class Spy:  # counts the decode steps that run on the rewritten companion
        def run(self, *args: object) -> object:
            calls.append(1)
            return real.run(*args)  # type: ignore[arg-type]

    fused.single = Spy()  # type: ignore[assignment]
    try:
        assert [greedy_generate(fused, [p], 20)[0] for p in prompts] == expected
        assert greedy_generate(fused, prompts, 20) == expected  # a left-padded batch of 2
    finally:
        fused.single = real
    assert len(calls) == 3 * 19, "every decode step (19 per greedy run) on the fused graph"


def test_a_graph_without_the_builders_names_is_left_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    with caplog.at_level(logging.WARNING, logger="appliance.llm.fused_decode"):
        fused_decode_graph(model, layers=2, kv_heads=1, head_dim=4, attention=True)
        fused_decode_graph(model, layers=2, kv_heads=1, head_dim=4)
    assert [n.op_type for n in model.graph.node] == ["Identity"]
    assert "fused attention left out" in caplog.text and "8-bit LM head left out" in caplog.text
    assert "one-token layout left out: not a graph of appliance.build.decoder" in caplog.text


def _greedy(
    session: DecoderSession, single: ort.InferenceSession, batch: list[list[int]], steps: int
) -> tuple[np.ndarray, KVState]:
    """Prefill ``batch``, then ``steps`` greedy decode steps on ``single`` (the one-row graph the
    session decodes with): every step's logits, stacked, and the KV state after them."""
    session.single = single
    logits, state = session.prefill(batch)
    tokens, out = logits.argmax(-1), []
    for _ in range(steps):
        logits = session.decode(tokens, state)
        out.append(logits)
        tokens = logits.argmax(-1)
    return np.stack(out), state
