"""Precision benchmark: the float32, INT8 and FP16 MiniLM graphs side by side in one run.

    .venv/bin/python bench/bench_precision.py [--rounds 3] [--threads 2]

Builds what is missing (``appliance models pull all-minilm-l6-v2{,-int8,-fp16}``), then for each
graph: quality against float32 (min and mean cosine over the shipped held-out sentences, which the
INT8 calibration never saw), and the engine alone (ONNX Runtime, no HTTP, no batcher; the same
engine class and tokenizer as the server) at batch 1 (p50 latency, tokenizing included) and at its
best batch size (sentences/s), with bench/bench_embeddings.py's engine phase, and the CPU time
each sentence costs on one thread at batch 1 and 16 (steadier than wall time on a shared machine).
Rounds alternate between the graphs and each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer  # noqa: E402

from appliance.build.bert import encode_batch  # noqa: E402
from appliance.build.precision import (  # noqa: E402
    DEFAULT_CALIBRATION,
    cosines,
    embed,
    held_out_sentences,
    read_sentences,
)
from appliance.build.pull import pull  # noqa: E402
from appliance.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from bench.bench_embeddings import engine_phase, sentences  # noqa: E402

BASE = "all-minilm-l6-v2"
VARIANTS = {"fp32": BASE, "int8": f"{BASE}-int8", "fp16": f"{BASE}-fp16"}


def cpu_ms_per_sentence(folder: Path, texts: list[str], batch: int, seconds: float = 2.0) -> float:
    """CPU time (not wall time) per sentence on one intra-op thread: on a shared machine the
    scheduler stretches wall time, but the work a graph needs per sentence stays put."""
    engine = OnnxRuntimeEngine(folder / "model.onnx", intra_op_threads=1)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    feeds = []
    for i in range(0, len(texts) - batch, batch):
        ids, mask = encode_batch(tokenizer, texts[i : i + batch])
        feeds.append({"input_ids": ids, "attention_mask": mask})
    engine.run(feeds[0], ["sentence_embedding"])
    n, cpu, wall = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        engine.run(feeds[n % len(feeds)], ["sentence_embedding"])
        n += 1
    used = time.process_time() - cpu
    engine.close()
    return float(np.float64(used) * 1e3 / (n * batch))


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
            runs[p][-1]["cpu1"] = cpu_ms_per_sentence(folder, texts, 1)
            runs[p][-1]["cpu16"] = cpu_ms_per_sentence(folder, texts, 16)
            print(f"round {r + 1}/{args.rounds} {p}: {runs[p][-1]}", file=sys.stderr, flush=True)

    base_p50 = statistics.median(x["p50_ms"] for x in runs["fp32"])
    base_best = statistics.median(x["best_per_s"] for x in runs["fp32"])
    base_cpu1 = statistics.median(x["cpu1"] for x in runs["fp32"])
    base_cpu16 = statistics.median(x["cpu16"] for x in runs["fp32"])
    print(f"engine alone, {args.threads} threads, median of {args.rounds} alternating rounds; quality on")
    print(f"{len(held)} held-out sentences against the float32 graph\n")
    print(
        "| graph | min / mean cosine to fp32 | batch-1 p50 ms (× fp32) | best sentences/s (× fp32) "
        "| best batch | CPU ms/sentence, 1 thread, batch 1 / 16 (× fp32) |"
    )
    print("|---|---|---|---|---|---|")
    for p in folders:
        p50 = statistics.median(x["p50_ms"] for x in runs[p])
        best = statistics.median(x["best_per_s"] for x in runs[p])
        batch = statistics.mode(int(x["best_batch"]) for x in runs[p])
        cpu1 = statistics.median(x["cpu1"] for x in runs[p])
        cpu16 = statistics.median(x["cpu16"] for x in runs[p])
        lo, mean = quality[p]
        print(
            f"| {p} | {lo:.5f} / {mean:.5f} | {p50:.2f} ({p50 / base_p50:.2f}) "
            f"| {best:.0f} ({best / base_best:.2f}) | {batch} "
            f"| {cpu1:.2f} / {cpu16:.2f} ({cpu1 / base_cpu1:.2f} / {cpu16 / base_cpu16:.2f}) |"
        )


if __name__ == "__main__":
    main()
