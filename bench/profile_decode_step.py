"""One decode step of the CPU chat engine, without HTTP: graph variants x intra-op threads x rows.

    .venv/bin/python bench/profile_decode_step.py [--rows 1 8] [--threads 1 2] [--rounds 4]
        [--variants plain head8 gqa] [--ops]

Prefills the greedy fixture's first prompt (repeated to ``rows`` rows) on the float graph, then
times ``DecoderSession.decode`` steps on the int8 4-bit companion, as served: ``plain`` is the
companion as built, ``head8`` with the 8-bit LM head, ``layout`` with the one-token layout too (as
served by default), ``gqa`` with the 8-bit head and the fused attention
(``generation.fused_attention``), ``rotary-inside`` with GroupQueryAttention's own
rotary embedding (flips a near-tie fixture token; for comparison only). Variants and thread counts
alternate within each round, so a shared machine's load falls on all alike; prints the median wall
and CPU milliseconds per step of each round (CPU time counts every thread of this process, so with
2 threads CPU > wall means both worked). ``--ops``: one extra profiled run per variant at the first
rows/threads setting, with ONNX Runtime's per-node times summed by operator (profiling adds a few
microseconds per node, so only the shares are meaningful).
"""

from __future__ import annotations

import argparse
import collections
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
        "gqa": lambda m: eight_bit_head(fuse_attention(m, *dims)),
        "rotary-inside": lambda m: eight_bit_head(fuse_attention(m, *dims, rotary_inside=True)),
    }
    out = {}
    for name in names:
        model = int8_model(path)
        rewrites[name](model)
        out[name] = model.SerializeToString()
    return out


def open_session(graph: bytes, threads: int, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as served
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def steps(session: DecoderSession, prompt: list[int], rows: int, n: int) -> tuple[float, float]:
    """Median wall and CPU ms of ``n`` decode steps after prefilling ``rows`` copies of ``prompt``."""
    logits, state = session.prefill([prompt] * rows)
    tokens = logits.argmax(-1)
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        logits = session.decode(tokens, state)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        tokens = logits.argmax(-1)
    return float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3)


def op_shares(session: DecoderSession, graph: bytes, threads: int, prompt: list[int], rows: int) -> None:
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
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
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
        results: dict[tuple[str, int], list[tuple[float, float]]] = collections.defaultdict(list)
        for _ in range(args.rounds):
            for key, single in runs.items():
                session.single = single
                results[key].append(steps(session, prompt, rows, args.steps))
        for (variant, threads), rs in results.items():
            wall = ", ".join(f"{w:.1f}" for w, _ in rs)
            cpu = ", ".join(f"{c:.1f}" for _, c in rs)
            med = np.median([w for w, _ in rs]), np.median([c for _, c in rs])
            print(
                f"{rows} rows, {variant:13s} {threads} threads: wall ms {wall} (median {med[0]:.1f}); cpu ms {cpu} (median {med[1]:.1f})"
            )
    if args.ops:
        for variant in args.variants:
            print(f"{variant}, {args.rows[0]} rows, {args.threads[0]} threads:")
            op_shares(session, graphs[variant], args.threads[0], prompt, args.rows[0])


if __name__ == "__main__":
    main()
