"""Precision benchmark: the float32, INT8 and FP16 MiniLM graphs side by side in one run.

    .venv/bin/python bench/bench_precision.py [--rounds 3] [--threads 2]

Builds what is missing (``appliance models pull all-minilm-l6-v2{,-int8,-fp16}``), then for each
graph: quality against float32 (min and mean cosine over the shipped held-out sentences, which the
INT8 calibration never saw), and the engine alone (ONNX Runtime, no HTTP, no batcher; the same
engine class and tokenizer as the server) at batch 1 (p50 latency, tokenizing included) and at its
best batch size (sentences/s), with bench/bench_embeddings.py's engine phase. Rounds alternate
between the graphs and each figure is the median over rounds, because this machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer  # noqa: E402

from appliance.build.precision import (  # noqa: E402
    DEFAULT_CALIBRATION,
    cosines,
    embed,
    held_out_sentences,
    read_sentences,
)
from appliance.build.pull import pull  # noqa: E402
from bench.bench_embeddings import engine_phase, sentences  # noqa: E402

BASE = "all-minilm-l6-v2"
VARIANTS = {"fp32": BASE, "int8": f"{BASE}-int8", "fp16": f"{BASE}-fp16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (the server's)")
    args = ap.parse_args()
    engines = ROOT / "engines"
    folders = {p: pull(name, engines) for p, name in VARIANTS.items()}

    held = held_out_sentences(read_sentences(DEFAULT_CALIBRATION))
    tokenizer = Tokenizer.from_file(str(folders["fp32"] / "tokenizer.json"))
    reference = embed(folders["fp32"] / "model.onnx", tokenizer, held)
    quality = {}
    for p, folder in folders.items():
        cos = cosines(embed(folder / "model.onnx", tokenizer, held), reference)
        quality[p] = (float(cos.min()), float(cos.mean()))

    texts = sentences(2000)
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in folders}
    for r in range(args.rounds):
        for p, folder in folders.items():
            runs[p].append(engine_phase(folder, texts, args.threads))
            print(f"round {r + 1}/{args.rounds} {p}: {runs[p][-1]}", file=sys.stderr, flush=True)

    base_p50 = statistics.median(x["p50_ms"] for x in runs["fp32"])
    base_best = statistics.median(x["best_per_s"] for x in runs["fp32"])
    print(f"engine alone, {args.threads} threads, median of {args.rounds} alternating rounds; quality on")
    print(f"{len(held)} held-out sentences against the float32 graph\n")
    print(
        "| graph | min / mean cosine to fp32 | batch-1 p50 ms (× fp32) | best sentences/s (× fp32) | best batch |"
    )
    print("|---|---|---|---|---|")
    for p in folders:
        p50 = statistics.median(x["p50_ms"] for x in runs[p])
        best = statistics.median(x["best_per_s"] for x in runs[p])
        batch = statistics.mode(int(x["best_batch"]) for x in runs[p])
        lo, mean = quality[p]
        print(
            f"| {p} | {lo:.4f} / {mean:.4f} | {p50:.2f} ({p50 / base_p50:.2f}) "
            f"| {best:.0f} ({best / base_best:.2f}) | {batch} |"
        )


if __name__ == "__main__":
    main()
