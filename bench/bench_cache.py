"""Response-cache benchmark: cache hits against the engine path, side by side in one run.

    .venv/bin/python bench/bench_cache.py [--requests 1500] [--concurrency 16]

The same server (a child process) answers the same sentences twice: first with
``Cache-Control: no-cache, no-store`` (the engine path: batcher + ONNX Runtime), then plainly after
the entries were stored (every answer a fresh cache hit, ``X-Appliance-Source: cache``). Reported:
p50 at concurrency 1 and throughput at a higher concurrency, for both, and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_embeddings import MODEL, free_port, load, sentences, start_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    texts = sentences(args.requests, seed=7)
    bodies = [json.dumps({"model": MODEL, "input": t}).encode() for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "appliance.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "server": {"log_level": "warning", "default_models": [MODEL]},
                    "admin": {"port": -1},
                    "model_repository": str(ROOT / "engines"),
                    "data_dir": str(Path(tmp) / "data"),
                }
            )
        )
        port = free_port()
        proc = start_server(cfg, port)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        try:
            nocache = {"Cache-Control": "no-cache, no-store"}
            usecache = {"Cache-Control": "max-age=3600"}

            def run(items: list[bytes], concurrency: int, headers: dict[str, str]) -> dict[str, float]:
                done = load(
                    url, items, concurrency=concurrency, rate=None, max_seconds=args.seconds, headers=headers
                )
                return asyncio.run(done).summary()

            engine_c1 = run(bodies[:300], 1, nocache)
            engine_cn = run(bodies, args.concurrency, nocache)
            # Store every entry (plain requests), then give the writer a moment to commit them.
            asyncio.run(
                load(url, bodies, concurrency=args.concurrency, rate=None, max_seconds=60, headers=usecache)
            )
            time.sleep(1.0)
            req = urllib.request.Request(url, data=bodies[0], headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                assert r.headers["X-Appliance-Source"] == "cache", r.headers["X-Appliance-Source"]
            cache_c1 = run(bodies[:300], 1, usecache)
            cache_cn = run(bodies, args.concurrency, usecache)
        finally:
            proc.terminate()
            proc.wait(30)
    print(
        f"engine path c=1 : p50 {engine_c1['p50_ms']:.2f} ms   c={args.concurrency}: {engine_cn['ok_per_s']:.0f} req/s"
    )
    print(
        f"cache hits  c=1 : p50 {cache_c1['p50_ms']:.2f} ms   c={args.concurrency}: {cache_cn['ok_per_s']:.0f} req/s"
    )
    print(
        f"cache vs engine : latency {engine_c1['p50_ms'] / cache_c1['p50_ms']:.1f}x lower, "
        f"throughput {cache_cn['ok_per_s'] / engine_cn['ok_per_s']:.1f}x higher"
    )


if __name__ == "__main__":
    main()
