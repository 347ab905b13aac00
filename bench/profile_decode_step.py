"""One decode step of the CPU chat engine, without HTTP: graph variants x thread modes x rows.

    .venv/bin/python bench/profile_decode_step.py [--rows 1 8] [--threads 1 2 2s1000 2p] [--rounds 4]
        [--variants plain head8 layout split gqa] [--ops]

Prefills the greedy fixture's first prompt (repeated to ``rows`` rows) on the float graph, then
times ``DecoderSession.decode`` steps on the int8 4-bit companion, as served: ``plain`` is the
companion as built, ``head8`` with the 8-bit LM head, ``layout`` with the one-token layout too (as
served by default), ``gqa`` with the 8-bit head and the fused attention
(``generation.fused_attention``), ``rotary-inside`` with GroupQueryAttention's own
rotary embedding (flips a near-tie fixture token; for comparison only), ``split`` the served graph
with each layer's four 4-bit projections split along N into two ``MatMulNBits`` halves and a
Concat (the same logits bit for bit, checked here; only a gain if the halves run at once, i.e.
with ``p`` below). Thread modes: ``N`` intra-op threads that sleep when idle (as served), ``NsUS``
the same spinning up to US microseconds before sleeping (``generation.decode_spin_us``), ``Np``
ONNX Runtime's parallel executor (N inter-op threads, 1 intra-op thread each), which runs
independent nodes (the split halves, a projection and its offset term) at once. Variants and
thread modes alternate within each round, so a shared machine's load falls on all alike; prints the median wall
and CPU milliseconds per step of each round (CPU time counts every thread of this process, so with
2 threads CPU > wall means both worked). ``--ops``: one extra profiled run per variant at the first
rows/threads setting, with ONNX Runtime's per-node times summed by operator (profiling adds a few
microseconds per node, so only the shares are meaningful).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.engines.onnxruntime import spinning  # noqa: E402
from appliance.llm.fused_decode import eight_bit_head, fuse_attention, one_token_layout  # noqa: E402
from appliance.llm.runtime import DecoderSession, int8_model  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_reference.json"


def variants(session: DecoderSession, names: list[str]) -> dict[str, bytes]:
    dims = (session.layers, session.kv_heads, session.head_dim)
    path = Path(session.model_dir) / "q4" / "model.onnx"
    rewrites: dict[str, Callable[[onnx.ModelProto], object]] = {
        "plain": lambda m: m,
        "head8": eight_bit_head,
        "layout": lambda m: one_token_layout(eight_bit_head(m), *dims),
        "split": lambda m: split_projections(one_token_layout(eight_bit_head(m), *dims)),
        "gqa": lambda m: eight_bit_head(fuse_attention(m, *dims)),
        "rotary-inside": lambda m: eight_bit_head(fuse_attention(m, *dims, rotary_inside=True)),
    }
    out = {}
    for name in names:
        model = int8_model(path)
        rewrites[name](model)
        out[name] = model.SerializeToString()
    return out


def split_projections(model: onnx.ModelProto, parts: int = 2) -> onnx.ModelProto:
    """``model`` (edited in place) with every 4-bit ``l{i}.*.nbits`` projection computed as
    ``parts`` MatMulNBits over consecutive output columns, concatenated: each column's arithmetic
    is unchanged, so the result is the same bit for bit."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or not node.name.startswith("l") or attrs.get("bits") != 4:
            nodes.append(node)
            continue
        n = int(attrs["N"])
        weights = onnx.numpy_helper.to_array(inits[node.input[1]])  # [N, blocks, 16]
        scales = onnx.numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
        cut = np.linspace(0, n, parts + 1).astype(int)
        halves = []
        for j, (a, b) in enumerate(itertools.pairwise(cut)):
            w, sc, out = f"{node.name}.w{j}", f"{node.name}.s{j}", f"{node.name}.y{j}"
            model.graph.initializer.extend(
                [
                    onnx.numpy_helper.from_array(np.ascontiguousarray(weights[a:b]), w),
                    onnx.numpy_helper.from_array(np.ascontiguousarray(scales[a:b]).reshape(-1), sc),
                ]
            )
            part = onnx.helper.make_node(
                "MatMulNBits", [node.input[0], w, sc], [out], name=f"{node.name}.{j}", domain="com.microsoft"
            )
            part.attribute.extend(node.attribute)
            for attr in part.attribute:
                if attr.name == "N":
                    attr.i = int(b - a)
            nodes.append(part)
            halves.append(out)
        nodes.append(
            onnx.helper.make_node("Concat", halves, list(node.output), name=f"{node.name}.cat", axis=-1)
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    return model


def open_session(graph: bytes, mode: str, profile: str | None = None) -> ort.InferenceSession:
    """A session in thread ``mode``: "2" (2 intra-op threads, sleeping when idle, as served),
    "2s1000" (spinning up to 1000 us first), "2p" (the parallel executor, 2 inter-op threads)."""
    match = re.fullmatch(r"(\d+)(?:s(\d+)|(p))?", mode)
    if not match:
        raise SystemExit(f"--threads: {mode!r} is not N, NsUS or Np")
    threads, spin_us, parallel = int(match[1]), int(match[2] or 0), bool(match[3])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1 if parallel else threads
    spinning(options, False, spin_us)  # as served: sleep when idle unless a bounded spin is asked
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = threads
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def steps(
    session: DecoderSession, prompt: list[int], rows: int, n: int, seen: list[np.ndarray] | None = None
) -> tuple[float, float]:
    """Median wall and CPU ms of ``n`` decode steps after prefilling ``rows`` copies of ``prompt``
    (each step's logits appended to ``seen`` if given)."""
    logits, state = session.prefill([prompt] * rows)
    tokens = logits.argmax(-1)
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        logits = session.decode(tokens, state)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        tokens = logits.argmax(-1)
        if seen is not None:
            seen.append(logits)
    return float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3)


def op_shares(session: DecoderSession, graph: bytes, threads: str, prompt: list[int], rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        session.single = open_session(graph, threads, profile=str(Path(tmp) / "decode"))
        steps(session, prompt, rows, 24)
        events = json.loads(Path(session.single.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, float] = collections.defaultdict(float)
    kernels = 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[re.sub(r"^l\d+\.", "l*.", e["name"][: -len("_kernel_time")])] += e["dur"]
            kernels += 1
    runs = sum(1 for e in events if e.get("name") == "model_run")
    total = sum(by_op.values())
    print(f"  {kernels / max(runs, 1):.0f} kernels per decode step")
    print(
        "  by operator:",
        ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(by_op.items(), key=lambda x: -x[1])[:8]),
    )
    top = sorted(by_node.items(), key=lambda x: -x[1])[:6]
    print("  by node (all layers):", ", ".join(f"{k} {v / total:.0%}" for k, v in top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "engines" / "smollm2-135m-instruct"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", nargs="+", default=["1", "2"], help="thread modes: N, NsUS, Np (see above)")
    ap.add_argument("--variants", nargs="+", default=["plain", "head8", "layout", "gqa"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ops", action="store_true", help="also print ONNX Runtime's per-operator shares")
    args = ap.parse_args()
    prompt = json.loads(FIXTURE.read_text())["cases"][0]["prompt_ids"]
    session = DecoderSession(
        args.model_dir, intra_op_threads=2, single_stream=Path(args.model_dir) / "q4", q4_int8_decode=True
    )
    session.single_max_batch = max(args.rows)
    graphs = variants(session, args.variants)
    runs = {(v, t): open_session(graphs[v], t) for v in args.variants for t in args.threads}
    for rows in args.rows:
        results: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
        for i in range(args.rounds):
            # Alternate the order between rounds, so no setting always runs right after another.
            for key, single in list(runs.items())[:: 1 if i % 2 == 0 else -1]:
                session.single = single
                results[key].append(steps(session, prompt, rows, args.steps))
        first = np.array([w for w, _ in results[next(iter(runs))]])
        for (variant, threads), rs in results.items():
            wall = ", ".join(f"{w:.1f}" for w, _ in rs)
            cpu = ", ".join(f"{c:.1f}" for _, c in rs)
            med = np.median([w for w, _ in rs]), np.median([c for _, c in rs])
            ratio = float(np.median(np.array([w for w, _ in rs]) / first))
            print(
                f"{rows} rows, {variant:13s} {threads:>7s} threads: wall ms {wall} (median {med[0]:.1f}; "
                f"x{ratio:.2f} the first setting, median of rounds); cpu ms {cpu} (median {med[1]:.1f})"
            )
    if "split" in graphs and "layout" in graphs:
        same = []
        for name in ("layout", "split"):
            session.single, same = open_session(graphs[name], args.threads[0]), [*same, []]
            steps(session, prompt, max(args.rows), 8, same[-1])
        exact = all(np.array_equal(a, b) for a, b in zip(*same, strict=True))
        print(
            f"split vs layout, {max(args.rows)} rows, 8 steps: logits {'equal bit for bit' if exact else 'DIFFER'}"
        )
    if args.ops:
        for variant in args.variants:
            print(f"{variant}, {args.rows[0]} rows, {args.threads[0]} threads:")
            op_shares(session, graphs[variant], args.threads[0], prompt, args.rows[0])


if __name__ == "__main__":
    main()
