"""Chat benchmark: the appliance against llama.cpp's llama-server, side by side in one run.

    sh bench/build-llama-server.sh                      # once, ~15-20 min on 2 cores
    .venv/bin/python bench/bench_chat.py [--llama-server PATH] [--rounds 3] [--exact] [--model NAME]

Both serve SmolLM2-135M-Instruct from the same GGUF (the appliance's ONNX graph is built from it),
with the same prompts, 128 new tokens each (EOS ignored, greedy), streamed, at concurrency 1 and 8.
Only one server runs at a time (2 cores); servers alternate within each round, and the table gives
the median over rounds of each figure and of each round's appliance / llama-server ratio, because
this machine is shared and noisy. llama-server runs with 8 slots and continuous batching
(``-np 8 -cb``) and 2 threads, the appliance with its default settings (2 ONNX Runtime threads);
(``generation.q4_int8_decode`` on: decode with int8 activations, as llama.cpp does);
``--exact`` adds the appliance with it off (float accumulation); ``--before`` adds it with
``generation.fused_decode`` off and ``generation.decode_steps_per_call`` 1 (the defaults before
those), ``--variant NAME=JSON`` with any settings, so a change is measured side by side in one run.
``--model smollm2-135m-instruct-q4`` benchmarks the CPU-only 4-bit build instead (pull it first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.build.decoder import locate_gguf  # noqa: E402
from bench.bench_embeddings import free_port  # noqa: E402

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 128
TOPICS = ["robots", "the sea", "a lighthouse", "trains", "a garden", "the moon", "a library", "winter"]


async def one(session: aiohttp.ClientSession, url: str, model: str, i: int) -> tuple[float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    first = 0.0
    chunks = 0
    usage = 0
    headers = {"Cache-Control": "no-cache, no-store"}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                usage = int(doc["usage"].get("completion_tokens") or 0)
            for choice in doc.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if not first:
                        first = time.perf_counter() - started
    return first, usage or chunks


async def phase(url: str, model: str, concurrency: int, requests: int) -> dict[str, float]:
    # llama-server closes a connection after a stream; a fresh connection per request is fair to both.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        await one(session, url, model, 99)  # warm-up
        sem = asyncio.Semaphore(concurrency)
        results: list[tuple[float, int]] = []

        async def guarded(i: int) -> None:
            async with sem:
                results.append(await one(session, url, model, i))

        started = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(requests)))
        wall = time.perf_counter() - started
    ttft = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {
        "tok_s": tokens / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
        "tokens": tokens,
    }


def wait_ready(url: str, proc: subprocess.Popen[bytes], path: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def start_appliance(
    tmp: Path, port: int, model: str = MODEL, settings: dict[str, Any] | None = None
) -> subprocess.Popen[bytes]:
    cfg = tmp / "appliance.yaml"
    # "server.*" keys are the server section's (appliance.yaml), the rest model settings.
    server = {k.partition(".")[2]: v for k, v in (settings or {}).items() if k.startswith("server.")}
    defaults = {k: v for k, v in (settings or {}).items() if not k.startswith("server.")}
    cfg.write_text(
        json.dumps(
            {
                "server": {"port": port, "log_level": "warning", "default_models": [model], **server},
                "admin": {"port": -1, "socket": ""},
                "model_repository": str(ROOT / "engines"),
                "data_dir": str(tmp / "data"),
                **({"defaults": defaults} if defaults else {}),
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}", proc, "/readyz")
    return proc


def start_llama(binary: str, port: int) -> subprocess.Popen[bytes]:
    cmd = [binary, "-m", str(locate_gguf()), "--port", str(port), "--host", "127.0.0.1"]
    cmd += ["-np", "8", "-cb", "-t", "2", "-c", str(8 * 1024), "--jinja", "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}", proc, "/health")
    return proc


# The appliance's variants: its defaults (decoding on the 4-bit companion with int8 activations,
# as llama.cpp does), and (--exact) with float accumulation (generation.q4_int8_decode off).
EXACT = ("appliance exact", {"generation.q4_int8_decode": False}, (1, 8))
# --before: the defaults before the load-time decode graph and several decode steps per hand-off.
BEFORE = {"generation.fused_decode": False, "generation.decode_steps_per_call": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=str(ROOT.parent / "llama-build" / "bin" / "llama-server"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--model", default=MODEL, help="the appliance model to serve (a built SmolLM2 folder)")
    ap.add_argument(
        "--exact", action="store_true", help="also run the appliance with generation.q4_int8_decode off"
    )
    ap.add_argument(
        "--before",
        action="store_true",
        help="also run the appliance with generation.fused_decode off and decode_steps_per_call 1",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="also run the appliance with these settings, e.g. steps1='{\"generation.decode_steps_per_call\": 1}'",
    )
    args = ap.parse_args()
    if not os.access(args.llama_server, os.X_OK):
        sys.exit(f"no llama-server at {args.llama_server}: run `sh bench/build-llama-server.sh` first")
    servers: list[tuple[str, dict[str, Any] | None, tuple[int, ...]]] = [("appliance", {}, (1, 8))]
    if args.before:
        servers.append(("appliance before", BEFORE, (1, 8)))
    for spec in args.variant:
        name, _, settings = spec.partition("=")
        servers.append((f"appliance {name}", json.loads(settings), (1, 8)))
    if args.exact:
        servers.append(EXACT)
    servers.append(("llama-server", None, (1, 8)))
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, settings, levels in servers:
                port = free_port()
                proc = (
                    start_appliance(Path(tmp), port, args.model, settings)
                    if settings is not None
                    else start_llama(args.llama_server, port)
                )
                try:
                    for conc in levels:
                        model = args.model if settings is not None else MODEL
                        r = asyncio.run(
                            phase(f"http://127.0.0.1:{port}", model, conc, 4 if conc == 1 else 16)
                        )
                        runs.setdefault((name, conc), []).append(r)
                        print(
                            f"{name:14s} c={conc}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms",
                            flush=True,
                        )
                finally:
                    proc.terminate()
                    proc.wait(60)
    # Each round ran every server back to back, so a round's ratio compares like with like on a
    # shared machine; the table gives medians over rounds of the figures and of those ratios.
    print()
    print(
        "| concurrency | server | tok/s | llama-server tok/s | ratio | TTFT p50 / p99 ms | "
        "llama-server TTFT p50 / p99 ms | TTFT p50 ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    for conc in (1, 8):
        peer = runs[("llama-server", conc)]
        for name, _, levels in servers[:-1]:
            if conc not in levels:
                continue
            mine = runs[(name, conc)]
            pairs = list(zip(mine, peer, strict=True))
            ratio = float(np.median([a["tok_s"] / b["tok_s"] for a, b in pairs]))
            ttft_ratio = float(np.median([a["ttft_p50_ms"] / b["ttft_p50_ms"] for a, b in pairs]))

            def med(rs: list[dict[str, float]], key: str) -> float:
                return float(np.median([r[key] for r in rs]))

            print(
                f"| {conc} | {name} | {med(mine, 'tok_s'):.1f} | {med(peer, 'tok_s'):.1f} | **{ratio:.2f}** | "
                f"{med(mine, 'ttft_p50_ms'):.0f} / {med(mine, 'ttft_p99_ms'):.0f} | "
                f"{med(peer, 'ttft_p50_ms'):.0f} / {med(peer, 'ttft_p99_ms'):.0f} | {ttft_ratio:.2f} |"
            )
            out[f"{conc}:{name}"] = {
                "appliance": mine,
                "llama_server": peer,
                "ratio": ratio,
                "ttft_ratio": ttft_ratio,
            }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
