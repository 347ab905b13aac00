"""Embedding benchmark: the server over loopback against the bare engine, side by side in one run.

    .venv/bin/python bench/bench_embeddings.py [--requests 2000] [--concurrency 64] [--rate R]

1. Engine only (no HTTP, no batcher): the same ONNX Runtime engine and tokenizer the server uses,
   on the same sentences, at batch 1 (latency) and at batch sizes up to the model's maximum (best
   throughput).
2. The server (``appliance serve`` in a child process): closed loop at concurrency 1 (added
   latency), then at a saturating concurrency or, with ``--rate``, an open loop at a fixed arrival
   rate; a priority mix; bounded in count and time.

It prints one table and the two ratios the serving core is judged by:
server throughput at saturation / engine-only best throughput, and server p50 - engine p50 at
concurrency 1. Phases alternate (engine, server, engine, server) and the best of each is kept,
because this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402

MODEL = "all-minilm-l6-v2"
WORDS = [
    "the",
    "a",
    "service",
    "customer",
    "order",
    "refund",
    "delivery",
    "account",
    "password",
    "reset",
    "invoice",
    "search",
    "query",
    "engine",
    "model",
    "answer",
    "question",
    "support",
    "ticket",
    "status",
    "update",
    "shipping",
    "address",
    "payment",
    "card",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short customer-service style sentences of about 8-14 words (~12-18 tokens)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + "." for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# -- engine only -------------------------------------------------------------------------------


def engine_phase(folder: Path, texts: list[str], threads: int) -> dict[str, float]:
    engine = OnnxRuntimeEngine(folder / "model.onnx", intra_op_threads=threads)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    enc = [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(texts)]

    def run(batch: list[np.ndarray]) -> None:
        width = max(len(b) for b in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = b
            mask[i, : len(b)] = 1
        engine.run({"input_ids": ids, "attention_mask": mask}, ["sentence_embedding"])

    for b in enc[:20]:
        run([b])
    # Batch 1 latency includes tokenization, as the server's path does.
    lat = []
    for t in texts[:300]:
        s = time.perf_counter()
        run([np.array(tok.encode(t).ids, dtype=np.int64)])
        lat.append(time.perf_counter() - s)
    best, best_bs = 0.0, 1
    for bs in (1, 8, 16, 32):
        n = 0
        s = time.perf_counter()
        while time.perf_counter() - s < 2.0:
            start = (n * bs) % (len(enc) - bs)
            run(enc[start : start + bs])
            n += 1
        rate = n * bs / (time.perf_counter() - s)
        if rate > best:
            best, best_bs = rate, bs
    engine.close()
    return {"p50_ms": pct(lat, 50) * 1e3, "best_per_s": best, "best_batch": best_bs}


# -- server ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def summary(self) -> dict[str, float]:
        return {
            "ok_per_s": self.ok / self.elapsed if self.elapsed else 0.0,
            "p50_ms": pct(self.latencies, 50) * 1e3,
            "p95_ms": pct(self.latencies, 95) * 1e3,
            "p99_ms": pct(self.latencies, 99) * 1e3,
            "rejected": sum(v for k, v in self.statuses.items() if k in (429, 503)),
            "errors": sum(v for k, v in self.statuses.items() if k not in (200, 429, 503)),
        }


async def load(
    url: str,
    bodies: list[bytes],
    *,
    concurrency: int,
    rate: float | None,
    max_seconds: float,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Closed loop at ``concurrency``, or open loop at ``rate`` arrivals/s (bounded in-flight)."""
    res = LoadResult()
    conn = aiohttp.TCPConnector(limit=max(concurrency, 1) * 2)
    # The engine path is what is measured here: never the response cache (bench_cache.py does that).
    headers = {"Content-Type": "application/json", "Cache-Control": "no-cache, no-store", **(headers or {})}
    deadline = time.perf_counter() + max_seconds
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(body: bytes) -> None:
            s = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                res.statuses[r.status] = res.statuses.get(r.status, 0) + 1
                if r.status == 200:
                    res.latencies.append(time.perf_counter() - s)

        started = time.perf_counter()
        if rate is None:
            it = iter(bodies)

            async def worker() -> None:
                for body in it:
                    if time.perf_counter() > deadline:
                        return
                    await one(body)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            tasks = []
            for i, body in enumerate(bodies):
                due = started + i / rate
                now = time.perf_counter()
                if now > deadline:
                    break
                if due > now:
                    await asyncio.sleep(due - now)
                tasks.append(asyncio.create_task(one(body)))
            await asyncio.gather(*tasks)
        res.elapsed = time.perf_counter() - started
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(config: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(config), "serve", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import urllib.request

    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rate", type=float, help="open loop: arrivals per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="bound per server phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--max-batch", type=int, help="override the model's batching.max_batch_size")
    ap.add_argument("--instances", type=int, default=1, help="engine worker threads in the server")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    folder = ROOT / "engines" / MODEL
    texts = sentences(max(args.requests, 600))
    rng = random.Random(1)
    # Priority mix: 10 % level 1, 70 % level 2, 20 % level 3.
    prio = [1 if r < 0.1 else 2 if r < 0.8 else 3 for r in (rng.random() for _ in texts)]
    bodies = [
        json.dumps({"model": MODEL, "input": t, "priority": p, "encoding_format": "base64"}).encode()
        for t, p in zip(texts, prio, strict=True)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "appliance.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "log_level": "warning", "default_models": [MODEL]},
                    "admin": {"port": -1},
                    "model_repository": str(ROOT / "engines"),
                    "data_dir": str(Path(tmp) / "data"),
                    "models": {
                        MODEL: {
                            "engine": {"intra_op_threads": args.threads, "instances": args.instances},
                            **({"batching": {"max_batch_size": args.max_batch}} if args.max_batch else {}),
                        }
                    },
                }
            )
        )
        engines, c1s, sats = [], [], []
        for _ in range(args.rounds):
            engines.append(engine_phase(folder, texts, args.threads))
            port = free_port()
            proc = start_server(cfg, port)
            try:
                url = f"http://127.0.0.1:{port}/v1/embeddings"
                asyncio.run(load(url, bodies[:50], concurrency=1, rate=None, max_seconds=5))
                c1s.append(
                    asyncio.run(
                        load(url, bodies[:400], concurrency=1, rate=None, max_seconds=args.seconds)
                    ).summary()
                )
                # The load generator shares the 2 cores with the server: say how much it used.
                cpu0, wall0 = time.process_time(), time.perf_counter()
                sat_run = asyncio.run(
                    load(url, bodies, concurrency=args.concurrency, rate=args.rate, max_seconds=args.seconds)
                ).summary()
                sat_run["client_cores"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
                sats.append(sat_run)
            finally:
                proc.terminate()
                proc.wait(30)
    eng = {
        "p50_ms": min(e["p50_ms"] for e in engines),
        "best_per_s": max(e["best_per_s"] for e in engines),
        "best_batch": max(engines, key=lambda e: e["best_per_s"])["best_batch"],
    }
    c1 = min(c1s, key=lambda r: r["p50_ms"])
    sat = max(sats, key=lambda r: r["ok_per_s"])
    result = {
        "engine": eng,
        "server_c1": c1,
        "server_saturated": sat,
        "throughput_ratio": sat["ok_per_s"] / eng["best_per_s"],
        "added_latency_ms_c1": c1["p50_ms"] - eng["p50_ms"],
        "cpu_count": os.cpu_count(),
    }
    print(
        f"engine only      : p50 batch-1 {eng['p50_ms']:.2f} ms, best {eng['best_per_s']:.0f} sent/s at batch {eng['best_batch']}"
    )
    print(
        f"server c=1       : p50 {c1['p50_ms']:.2f} ms, p99 {c1['p99_ms']:.2f} ms, {c1['ok_per_s']:.0f} req/s"
    )
    load_desc = f"rate {args.rate}/s" if args.rate else f"c={args.concurrency}"
    print(
        f"server {load_desc:<10}: {sat['ok_per_s']:.0f} req/s, p50 {sat['p50_ms']:.1f} ms, p95 {sat['p95_ms']:.1f} ms, "
        f"p99 {sat['p99_ms']:.1f} ms, rejected {sat['rejected']}, errors {sat['errors']}"
    )
    print(f"load generator's own CPU use during saturation: {sat['client_cores']:.2f} cores")
    print(f"throughput ratio (server / engine best): {result['throughput_ratio']:.3f}")
    print(f"added latency at c=1 (server p50 - engine p50): {result['added_latency_ms_c1']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
