"""CPU-only decode graphs rewritten at load time from a built decoder's 4-bit companion.

The decoder graphs of ``appliance.build.decoder`` spell attention in standard ONNX ops (so that
TensorRT parses the float graph), and the 4-bit companion's LM head (49152 x 576 for SmolLM2) is a
4-bit pair over the input repeated twice plus an offset term. At one row a decode step is ~1860
small kernels, and the head alone took about a fifth of it. Three rewrites, for ONNX Runtime's CPU
provider and decode steps only (one new token per row); the float graph is never touched:

- ``eight_bit_head`` (``generation.fused_decode``, on): the Q8_0 head as one 8-bit
  ``MatMulNBits`` holding the same weights, one node instead of five.
- ``one_token_layout`` (``generation.fused_decode``, on, unless the fused attention is): the
  rotary embedding and the attention's head layout spelled for one token per row, ~19 fewer
  nodes per layer (2220 -> 1672 in the file, ~1850 -> ~1300 kernels per step after ONNX Runtime's
  own fusions) and the same arithmetic: logits and presents equal bit for bit.
- ``fuse_attention`` (``generation.fused_attention``, off): each layer's attention from the
  rotated Q/K and V to the merged context as one ``GroupQueryAttention`` contrib node (KV append
  and masked softmax inside; the padding of left-padded rows as an additive attention bias). The
  KV layout ([batch, kv_heads, tokens, head_dim], rows right-aligned) and the graph's inputs and
  outputs stay as they were. Off by default: with int8 activations its different summation order
  makes a row's greedy tokens depend on its batch near ties ("What is 2 + 2?" alone and batched
  in tests/test_api_chat.py), which the plain graph does not.

ONNX Runtime already fuses the builder's RMSNorm (``SimplifiedLayerNormalization``) and SiLU
(``QuickGelu``) by itself. Tried and left out, because they change the int8 logits (by up to 1.4)
enough to flip near ties: residual Add + norm as ``SkipSimplifiedLayerNormalization``
(``onnxruntime.transformers``' fusion; "What is 2 + 2?" then answers differently alone and
batched), and one [group, head_dim] matrix product per KV head instead of one per query head
(another summation order in MLAS). What is left per layer is mostly the four projections and
their Q4_1 offset terms (block sums x offsets: Reshape, ReduceSum, MatMul, Add each), which no
exact rewrite shortens.

Measured on 2 shared AVX2 cores, one intra-op thread, CPU ms per decode step (medians of 4-6
interleaved rounds, ``bench/profile_decode_step.py``): 1 row 22.6 as built, 22.5 with the 8-bit
head, 21.2 with head and fused attention; 8 rows ~66, ~55, ~55. In a later run (6 rounds, a
busier box): 1 row 19.8 with the 8-bit head, 18.4 with the one-token layout too; 8 rows 66.8 and
67.2. The rewrites rely on the node and value names the builder writes (``l{i}.qkv``,
``l{i}.q_rope.out``, ``present.{i}.key``, ``lm_head.nbits`` ...) and raise ``ValueError`` on a
graph without them; ``fused_decode_graph`` then leaves that part as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

_PREFIX = "gqa."


def fused_decode_graph(
    model: onnx.ModelProto, layers: int, kv_heads: int, head_dim: int, *, attention: bool = False
) -> onnx.ModelProto:
    """The 8-bit head, and with ``attention`` the fused attention (otherwise the one-token layout),
    on a 4-bit companion with int8 activations (edited in place and returned); a rewrite that does
    not apply to this graph is skipped with a warning."""
    rewrites: list[tuple[str, Callable[[onnx.ModelProto], object]]] = [("8-bit LM head", eight_bit_head)]
    if attention:
        rewrites.insert(0, ("fused attention", lambda m: fuse_attention(m, layers, kv_heads, head_dim)))
    else:
        rewrites.insert(0, ("one-token layout", lambda m: one_token_layout(m, layers, kv_heads, head_dim)))
    for name, rewrite in rewrites:
        try:
            rewrite(model)
        except ValueError as exc:
            log.warning("decode graph: %s left out: %s", name, exc)
    return model


def fuse_attention(
    model: onnx.ModelProto, layers: int, kv_heads: int, head_dim: int, *, rotary_inside: bool = False
) -> onnx.ModelProto:
    """``model`` (edited in place and returned) with each layer's attention as one
    ``GroupQueryAttention`` node; for decode steps only (see the module docstring).

    By default the graph's own rotary-embedding nodes stay and feed the node rotated Q and K: with
    int8 activations, GroupQueryAttention's fused rotary (``rotary_inside``: 16 fewer nodes per
    layer) flips a near-tie token of a greedy fixture (top-2 gap 0.106 in the float graph); these
    nodes do not."""
    graph = model.graph
    produced = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    missing = [n for n in ("mask_zero", "mask_neg") if n not in inits]
    missing += [n for n in ("cos_table", "sin_table") if rotary_inside and n not in inits]
    for i in range(layers):
        names = [f"l{i}.qkv", f"l{i}.ctx_merged", f"present.{i}.key", f"present.{i}.value"]
        names += [] if rotary_inside else [f"l{i}.q_rope.out", f"l{i}.k_rope.out", f"l{i}.v"]
        missing += [v for v in names if v not in produced]
    if missing:
        raise ValueError(f"not a graph of appliance.build.decoder: no {', '.join(missing[:4])}")
    heads = _query_heads(produced, kv_heads, head_dim)
    p = _PREFIX
    # Shared by every layer: the batch's total length (past + this token; rows are left-padded to
    # the same width, so every row's "sequence length" is the width), and the padding as a bias.
    nodes = [
        helper.make_node("Shape", ["attention_mask"], [p + "t_shape"], start=1, end=2),
        helper.make_node("Cast", [p + "t_shape"], [p + "t_1d"], to=TensorProto.INT32),
        helper.make_node("Squeeze", [p + "t_1d"], [p + "total"]),
        helper.make_node("Sub", [p + "t_1d", p + "one_i32"], [p + "last_1d"]),
        helper.make_node("Shape", ["input_ids"], [p + "b_shape"], start=0, end=1),
        helper.make_node("Expand", [p + "last_1d", p + "b_shape"], [p + "seqlens_k"]),
        helper.make_node("Cast", ["attention_mask"], [p + "keep"], to=TensorProto.BOOL),
        helper.make_node("Where", [p + "keep", "mask_zero", "mask_neg"], [p + "bias2"]),
        helper.make_node("Unsqueeze", [p + "bias2", p + "axes_12"], [p + "bias"]),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int32), p + "one_i32"),
            numpy_helper.from_array(np.array([1, 2], np.int64), p + "axes_12"),
            numpy_helper.from_array(np.array([0, 0, heads * head_dim], np.int64), p + "q_shape"),
            numpy_helper.from_array(np.array([0, 0, kv_heads * head_dim], np.int64), p + "kv_shape"),
        ]
    )
    replaced: set[int] = set()
    for i in range(layers):
        outs = [f"l{i}.ctx_merged", f"present.{i}.key", f"present.{i}.value"]
        replaced.update(id(produced[o]) for o in outs)
        if rotary_inside:
            qkv = [f"l{i}.qkv", "", ""]  # packed [q | k | v], as the builder's one fused projection
            tables = ["cos_table", "sin_table"]
        else:  # [B, S, heads, D] as the graph rotated them -> [B, S, heads * D]
            qkv, tables = [f"l{i}.gqa_q", f"l{i}.gqa_k", f"l{i}.v"], ["", ""]
            nodes += [
                helper.make_node("Reshape", [f"l{i}.q_rope.out", p + "q_shape"], [qkv[0]]),
                helper.make_node("Reshape", [f"l{i}.k_rope.out", p + "kv_shape"], [qkv[1]]),
            ]
        inputs = [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", p + "seqlens_k"]
        inputs += [p + "total", *tables, "position_ids", p + "bias"]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                inputs,
                outs,
                name=f"l{i}.gqa",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=int(rotary_inside),
                rotary_interleaved=0,
                scale=1.0,  # the builder folds 1/sqrt(head_dim) into the Q rows
            )
        )
    _replace_nodes(graph, [n for n in graph.node if id(n) not in replaced] + nodes)
    return model


def one_token_layout(model: onnx.ModelProto, layers: int, kv_heads: int, head_dim: int) -> onnx.ModelProto:
    """``model`` (edited in place and returned) with each layer's rotary embedding and attention
    layout spelled in fewer nodes, valid when every row feeds one new token (a decode step); the
    same arithmetic, so the same logits and presents bit for bit.

    The builder spells these for any sequence length: Q and K each rotated by their own 9 nodes
    (Split, four Mul, Sub, Add, Concat, after a Reshape), heads transposed in and out of
    ``[batch, heads, tokens, head_dim]``, and a causal mask built from ranges. With one token, a
    transpose that moves the length-1 token axis is a reshape, the causal mask is all true (the
    padding mask alone is left), and the last position is the only one. The rotation becomes
    ``x * cos2 + rotate_half(x) * sin2`` over all heads at once (``cos2 = [cos, cos]``,
    ``sin2 = [-sin, sin]``; ``rotate_half`` one Gather): ``a - b * s`` and ``a + b * (-s)`` are the
    same IEEE operation. V rides along with ``cos 1, sin 0`` (``v + u * 0 == v`` for any finite
    ``u``, except the sign of an exact -0.0, which no product or sum downstream can tell). About
    19 fewer nodes per layer."""
    graph = model.graph
    produced = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    missing = [n for n in ("cos_table", "sin_table", "mask_zero", "mask_neg") if n not in inits]
    missing += [v for v in ("mask.keep5", "mask.bias", "last_position") if v not in produced]
    for i in range(layers):
        names = [f"l{i}.qkv", f"l{i}.q5", f"l{i}.ctx", f"l{i}.ctx_merged"]
        names += [f"present.{i}.key", f"present.{i}.value"]
        missing += [v for v in names if v not in produced]
    if missing:
        raise ValueError(f"not a graph of appliance.build.decoder: no {', '.join(missing[:4])}")
    cos = numpy_helper.to_array(inits["cos_table"])
    sin = numpy_helper.to_array(inits["sin_table"])
    half = head_dim // 2
    if cos.shape[-1] != half or sin.shape != cos.shape:
        raise ValueError(f"rotary tables of {cos.shape[-1]} columns, not half of head_dim {head_dim}")
    heads = _query_heads(produced, kv_heads, head_dim)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} KV heads evenly")
    total = heads + 2 * kv_heads
    rotated = np.zeros((total, 1, 1), np.float32)  # 1 for Q and K heads, 0 for V heads
    rotated[: heads + kv_heads] = 1
    p = "one."
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.concatenate([cos, cos], axis=-1), p + "cos2_table"),
            numpy_helper.from_array(np.concatenate([-sin, sin], axis=-1), p + "sin2_table"),
            numpy_helper.from_array(rotated, p + "rotated"),
            numpy_helper.from_array(1 - rotated, p + "kept"),
            numpy_helper.from_array(
                np.r_[np.arange(half, head_dim), np.arange(half)].astype(np.int64), p + "swap"
            ),
            numpy_helper.from_array(np.array([0, total, 1, head_dim], np.int64), p + "heads_shape"),
            numpy_helper.from_array(np.array([heads, kv_heads, kv_heads], np.int64), p + "split"),
            numpy_helper.from_array(
                np.array([0, kv_heads, heads // kv_heads, 1, head_dim], np.int64), p + "groups_shape"
            ),
            numpy_helper.from_array(np.array([0, 1, heads * head_dim], np.int64), p + "merge_shape"),
            numpy_helper.from_array(np.array([1], np.int64), p + "axis_1"),
        ]
    )
    # Once per step: [batch, heads, 1, head_dim] tables at each row's position.
    nodes = [
        helper.make_node("Gather", [p + "cos2_table", "position_ids"], [p + "cos_rows"]),
        helper.make_node("Unsqueeze", [p + "cos_rows", p + "axis_1"], [p + "cos4"]),
        helper.make_node("Mul", [p + "cos4", p + "rotated"], [p + "cos_qk"]),
        helper.make_node("Add", [p + "cos_qk", p + "kept"], [p + "cos"]),
        helper.make_node("Gather", [p + "sin2_table", "position_ids"], [p + "sin_rows"]),
        helper.make_node("Unsqueeze", [p + "sin_rows", p + "axis_1"], [p + "sin4"]),
        helper.make_node("Mul", [p + "sin4", p + "rotated"], [p + "sin"]),
    ]
    replace: dict[str, onnx.NodeProto] = {}
    for i in range(layers):
        q = f"l{i}."
        heads_x, swapped = p + q + "heads", p + q + "swapped"
        nodes += [
            helper.make_node("Reshape", [f"l{i}.qkv", p + "heads_shape"], [heads_x]),
            helper.make_node("Gather", [heads_x, p + "swap"], [swapped], axis=-1),
            helper.make_node("Mul", [heads_x, p + "cos"], [p + q + "xc"]),
            helper.make_node("Mul", [swapped, p + "sin"], [p + q + "ys"]),
            helper.make_node("Add", [p + q + "xc", p + q + "ys"], [p + q + "rotated"]),
            helper.make_node(
                "Split", [p + q + "rotated", p + "split"], [p + q + "q", p + q + "k", p + q + "v"], axis=1
            ),
        ]
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        replace[f"present.{i}.key"] = helper.make_node(
            "Concat", [past_k, p + q + "k"], [f"present.{i}.key"], name=f"present.{i}.key", axis=2
        )
        replace[f"present.{i}.value"] = helper.make_node(
            "Concat", [past_v, p + q + "v"], [f"present.{i}.value"], name=f"present.{i}.value", axis=2
        )
        replace[f"l{i}.q5"] = helper.make_node(
            "Reshape", [p + q + "q", p + "groups_shape"], [f"l{i}.q5"], name=f"l{i}.q5"
        )
        replace[f"l{i}.ctx_merged"] = helper.make_node(
            "Reshape", [f"l{i}.ctx", p + "merge_shape"], [f"l{i}.ctx_merged"], name=f"l{i}.ctx_merged"
        )
    bias = produced["mask.bias"]
    replace["mask.bias"] = helper.make_node(
        "Where", ["mask.keep5", *bias.input[1:]], ["mask.bias"], name="mask.bias"
    )
    last = produced["last_position"]
    replace["last_position"] = helper.make_node("Identity", [last.input[0]], ["last_position"])
    kept = [replace.get(n.output[0], n) for n in graph.node]
    _replace_nodes(graph, kept + nodes)
    return model


def _query_heads(produced: dict[str, onnx.NodeProto], kv_heads: int, head_dim: int) -> int:
    """The query heads, from the width ``N`` of the fused Q/K/V projection ``l0.qkv``."""
    projection = produced["l0.qkv"]
    if projection.op_type == "Add":  # MatMulNBits + block offsets: the 4-bit projection's N
        projection = produced.get(projection.input[0], projection)
    width = {a.name: helper.get_attribute_value(a) for a in projection.attribute}.get("N")
    if not isinstance(width, int) or width % head_dim or width // head_dim <= 2 * kv_heads:
        raise ValueError(f"cannot tell the query heads from l0.qkv ({projection.op_type}, N={width})")
    return width // head_dim - 2 * kv_heads


def eight_bit_head(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (edited in place and returned) with its Q8_0 LM head as one 8-bit ``MatMulNBits``
    (``u = q + 128``, scale ``d``, the implicit zero point 128: the same weights exactly) instead of
    the builder's 4-bit pair over the input repeated twice plus a block-offset term. Only for int8
    activations (``accuracy_level`` 4), the 8-bit kernel's fast path: measured on 2 AVX2 cores, the
    head of 49152 x 576 takes 0.55-0.7x the time at 8 rows and about the same at one, in one node
    instead of five."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    node = next((n for n in graph.node if n.name == "lm_head.nbits"), None)
    add = next((n for n in graph.node if n.output and n.output[0] == "lm_head.q8_logits"), None)
    if node is None or add is None or "lm_head.q8" not in inits or "lm_head.q8_scales" not in inits:
        raise ValueError("no split Q8_0 head (lm_head.nbits) in this graph")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k2 = int(attrs["N"]), int(attrs["K"])
    packed = numpy_helper.to_array(inits["lm_head.q8"])  # [N, 2K/32, 16]: hi blocks, then lo blocks
    scales = numpy_helper.to_array(inits["lm_head.q8_scales"]).reshape(n, k2 // 32)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k2 // 32, 32)
    half = k2 // 64
    u = (nibbles[:, :half].astype(np.uint16) * 16 + nibbles[:, half:]).astype(np.uint8)
    x = _input_of(graph, "lm_head.twice")
    head = helper.make_node(
        "MatMulNBits",
        [x, "lm_head.q8_u8", "lm_head.q8_d"],
        ["lm_head.q8_logits"],
        name="lm_head.nbits8",
        domain="com.microsoft",
        K=k2 // 2,
        N=n,
        bits=8,
        block_size=32,
        accuracy_level=4,
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(u), "lm_head.q8_u8"),
            numpy_helper.from_array(np.ascontiguousarray(scales[:, half:]).reshape(-1), "lm_head.q8_d"),
        ]
    )
    _replace_nodes(graph, [head if nd is add else nd for nd in graph.node])
    return model


def _input_of(graph: onnx.GraphProto, concat: str) -> str:
    """The tensor that the builder's ``Concat([x, x])`` named ``concat`` repeats."""
    node = next((n for n in graph.node if n.name == concat), None)
    if node is None or len(set(node.input)) != 1:
        raise ValueError(f"no {concat} node repeating one input")
    return str(node.input[0])


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` the graph's nodes: only those some output depends on, each after the nodes
    that produce its inputs; then drop the initializers that no node reads any more."""
    producer = {o: n for n in nodes for o in n.output}
    order: list[onnx.NodeProto] = []
    seen: set[int] = set()
    for out in graph.output:  # iterative depth-first: the graph is thousands of nodes deep
        stack = [(producer[out.name], False)] if out.name in producer else []
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
            elif id(node) not in seen:
                seen.add(id(node))
                stack.append((node, True))
                stack.extend((producer[i], False) for i in reversed(node.input) if i in producer)
    del graph.node[:]
    graph.node.extend(order)
    _drop_unused_initializers(graph)
