"""What the event loop's share of a core costs the engine beside it, on this machine.

    .venv/bin/python bench/profile_interference.py [--batch 16] [--share 0.15] [--rounds 6]

At saturation the server's event loop uses 0.13-0.2 of a core (``bench/bench_embeddings.py``'s
per-thread CPU at 64 clients), and on 2 cores it shares them with ONNX Runtime's two intra-op
threads. This measures the engine alone (the server's ``OnnxRuntimeEngine`` with the server's
default settings, the benchmark's sentences, one batch size) in alternating rounds: quiet, and
beside a Python thread of the same process that works in 0.3-ms bursts for ``--share`` of one core
(what the loop does: short bursts, the GIL held, between sleeps). The ratio of the two throughputs
is a ceiling for the served/engine ratio that ``bench/bench_embeddings.py`` reports, whatever the
server does with the rest of its time: the loop has to run. CPU per sentence is the process's
(the busy thread's own share included, as the server's would be).

``--instances`` adds, in the same rounds, the throughput layout: two one-thread engines each
running half the batches on a thread of its own at once (``engine.instances: 2``,
``engine.intra_op_threads: 1``, ``compute.concurrency: 2``): no kernel is split between threads,
so a preempted thread holds up only its own run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from appliance.settings import defaults  # noqa: E402
from bench.bench_embeddings import sentences  # noqa: E402

BURST_S = 0.0003


class Busy:
    """A thread that keeps ``share`` of one core busy in BURST_S bursts until stopped."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.running = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._main, name="busy", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        pause = BURST_S * (1 - self.share) / self.share
        while not self.stopped:
            self.running.wait()
            began = time.perf_counter()
            while time.perf_counter() - began < BURST_S:
                pass
            time.sleep(pause)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--share", type=float, default=0.15, help="of one core, for the busy thread")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=15, help="batches per measurement")
    ap.add_argument(
        "--instances",
        action="store_true",
        help="also two one-thread engines, half the batches each on its own thread, at once "
        "(engine.instances 2, intra_op_threads 1), quiet and beside the busy thread",
    )
    args = ap.parse_args()
    if not 0 < args.share < 1:
        raise SystemExit("--share must be between 0 and 1")
    folder = ROOT / "engines" / args.model
    values = defaults()
    engine = OnnxRuntimeEngine(
        folder / "model.onnx",
        intra_op_threads=int(values["engine.intra_op_threads"]),
        spin_us=int(values["engine.spin_us"]),
    )
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    enc = [e.ids for e in tok.encode_batch(sentences(args.batch * args.runs))]
    batches = []
    for i in range(args.runs):
        part = enc[i * args.batch : (i + 1) * args.batch]
        ids = np.zeros((len(part), max(map(len, part))), dtype=np.int64)
        for j, seq in enumerate(part):
            ids[j, : len(seq)] = seq
        batches.append({"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})
    singles = [
        OnnxRuntimeEngine(folder / "model.onnx", intra_op_threads=1, spin_us=0)
        for _ in range(2 if args.instances else 0)
    ]

    def one_engine() -> None:
        for feeds in batches:
            engine.run(feeds)

    def two_engines() -> None:
        # What the batcher does with two instances: each batch on a worker thread of its own.
        workers = [
            threading.Thread(target=lambda e=e, part=batches[k::2]: [e.run(f) for f in part])
            for k, e in enumerate(singles)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    busy = Busy(args.share)
    layouts = {"": one_engine, "two 1-thread engines, ": two_engines} if args.instances else {"": one_engine}
    rates: dict[str, list[float]] = {
        f"{layout}{place}": [] for layout in layouts for place in ("quiet", "beside the busy thread")
    }
    cpu: dict[str, list[float]] = {k: [] for k in rates}
    for r in range(args.rounds):
        order = list(rates) if r % 2 == 0 else list(reversed(rates))
        for label in order:
            if label.endswith("quiet"):
                busy.running.clear()
            else:
                busy.running.set()
            layout = label.rpartition(", ")[0] + ", " if ", " in label else ""
            engine.run(batches[0])  # settle
            for e in singles:
                e.run(batches[0])
            began, began_cpu = time.perf_counter(), time.process_time()
            layouts[layout]()
            n = args.batch * args.runs
            rates[label].append(n / (time.perf_counter() - began))
            cpu[label].append((time.process_time() - began_cpu) / n * 1e3)
    busy.stopped = True
    busy.running.set()
    quiet = statistics.median(rates["quiet"])
    print(
        f"{args.model}, batch {args.batch}, {args.rounds} alternating rounds of {args.runs} batches; "
        f"busy thread at {args.share:g} of a core; medians:"
    )
    for label in rates:
        rate = statistics.median(rates[label])
        print(
            f"  {label:46s} {rate:7.1f} sentences/s ({rate / quiet:.2f}x quiet), "
            f"{statistics.median(cpu[label]):5.2f} ms CPU a sentence"
        )
    per_round = [b / q for q, b in zip(rates["quiet"], rates["beside the busy thread"], strict=True)]
    print(f"  ratio per round: {', '.join(f'{x:.2f}' for x in per_round)}")
    engine.close()
    for e in singles:
        e.close()


if __name__ == "__main__":
    main()
