"""Embedding benchmark: the bare engine and the server on both APIs, side by side in one run.

    .venv/bin/python bench/bench_embeddings.py [--rounds 3] [--seconds 6] [--json out.json]

Each round measures, in turn (the order of the two APIs alternates between rounds, and the best of
the rounds is kept, because this machine is shared and noisy):

1. Engine alone (no HTTP, no batcher): the server's ONNX Runtime engine and tokenizer on the same
   sentences: batch-1 p50 with tokenizing (latency), and the best sentences/s over batch sizes.
2. The server (``appliance serve`` in a child process, response cache bypassed with
   ``Cache-Control: no-cache, no-store``), one sentence per request, closed loop, on OpenAI
   ``/v1/embeddings`` and on KServe ``/v2/models/{model}/infer`` (BYTES input ``text``): concurrency
   1 (p50; added latency = server p50 - engine batch-1 p50), 16 and 64 (sentences/s, and the ratio
   to the engine-alone best).

During the concurrency-64 phase it reads the server's per-thread CPU time
(``/proc/<pid>/task/*/stat`` utime+stime) and names each thread: the event loop, Python's named
threads (engine worker, cache), ONNX Runtime's intra-op pool (native threads alive once the model
is loaded) and the tokenizers pool (native threads started later), so that the README can say
where the time goes. The load generator is a minimal keep-alive HTTP/1.1 client on uvloop: on 2
cores every cycle it spends is taken from the server, and it prints its own CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from appliance.settings import REGISTRY  # noqa: E402

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
CONCURRENCY = (1, 16, 64)
ENGINE_BATCHES = (1, 4, 8, 16, 32, 64)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short customer-service style sentences of about 8-14 words (~12-18 tokens)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + "." for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# -- engine alone --------------------------------------------------------------------------------


def engine_phase(folder: Path, texts: list[str], threads: int, seconds: float = 2.0) -> dict[str, Any]:
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
    # Batch-1 latency includes tokenizing, as the server's path does.
    lat = []
    for t in texts[:300]:
        s = time.perf_counter()
        run([np.array(tok.encode(t).ids, dtype=np.int64)])
        lat.append(time.perf_counter() - s)
    per_batch: dict[int, float] = {}
    per_cpu: dict[int, float] = {}
    for bs in ENGINE_BATCHES:
        n = 0
        s, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - s < seconds:
            start = (n * bs) % (len(enc) - bs)
            run(enc[start : start + bs])
            n += 1
        per_batch[bs] = n * bs / (time.perf_counter() - s)
        # Sentences per CPU-second (every thread of this process): what a sentence costs, which
        # other sessions' load on the cores disturbs far less than sentences per second.
        per_cpu[bs] = n * bs / (time.process_time() - cpu)
    engine.close()
    best_bs = max(per_batch, key=lambda b: per_batch[b])
    return {
        "p50_ms": pct(lat, 50) * 1e3,
        "best_per_s": per_batch[best_bs],
        "best_batch": best_bs,
        "per_batch": per_batch,
        "per_cpu_s": per_cpu[best_bs],
        "best_per_cpu_s": max(per_cpu.values()),
    }


# -- load generator ------------------------------------------------------------------------------


def request_bytes(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        # The engine path is measured here, never the response cache (bench_cache.py does that).
        f"Cache-Control: no-cache, no-store\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` keep-alive connections, each sending its next request when the last answers."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    it = iter(requests)
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for req in it:
                if time.perf_counter() > deadline:
                    return
                s = time.perf_counter()
                writer.write(req)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - s)
        finally:
            writer.close()

    cpu0 = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {
        "per_s": ok / elapsed,
        "p50_ms": pct(latencies, 50) * 1e3,
        "p99_ms": pct(latencies, 99) * 1e3,
        "failed": sum(n for s, n in statuses.items() if s != 200),
        "statuses": {s: n for s, n in statuses.items() if s != 200},
        "client_cores": (time.process_time() - cpu0) / elapsed,
    }


# -- aiohttp load (bench_cache.py: response headers, or an open loop at a fixed rate) -----------


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


# -- server and its threads ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(config: Path, port: int, checkout: Path | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(config), "serve", "--port", str(port)],
        cwd=checkout or ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


def thread_times(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def batches(port: int) -> tuple[float, float]:
    """Sentences and batches the server has run so far (``appliance_batch_size`` sum and count)."""
    total = count = 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("appliance_batch_size_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("appliance_batch_size_count"):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from ``py-spy dump`` (empty without py-spy)."""
    try:
        raw = subprocess.run(
            [str(Path(sys.executable).parent / "py-spy"), "dump", "--json", "--pid", str(pid)],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
        return {int(t["os_thread_id"]): str(t.get("thread_name") or "?") for t in json.loads(raw)}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return {}


def classify(pid: int, tid: int, names: dict[int, str], at_ready: set[int]) -> str:
    if tid == pid:
        return "event loop (main thread)"
    name = names.get(tid)
    if name is not None:
        for prefix, label in (("engine-", "engine worker (batch assembly + ORT call)"), ("cache-", "cache")):
            if name.startswith(prefix):
                return label
        return f"python: {name.rstrip('_0123456789')}"
    # Native threads: ONNX Runtime's intra-op pool exists once the model is resident; the
    # tokenizers (rayon) pool is started on first use of encode_batch, after readiness.
    return "ONNX Runtime intra-op pool" if tid in at_ready else "tokenizers pool / other native"


def breakdown(
    pid: int,
    before: dict[int, float],
    after: dict[int, float],
    wall: float,
    names: dict[int, str],
    at_ready: set[int],
) -> dict[str, float]:
    """Cores used per thread group over ``wall`` seconds."""
    groups: dict[str, float] = {}
    for tid, t in after.items():
        label = classify(pid, tid, names, at_ready)
        groups[label] = groups.get(label, 0.0) + (t - before.get(tid, 0.0)) / wall
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


# -- one run -------------------------------------------------------------------------------------


def bodies(texts: list[str]) -> dict[str, tuple[str, list[bytes]]]:
    openai = [json.dumps({"model": MODEL, "input": t, "encoding_format": "base64"}).encode() for t in texts]
    kserve = [
        json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [t]}]}).encode()
        for t in texts
    ]
    return {
        "OpenAI": ("/v1/embeddings", openai),
        "KServe": (f"/v2/models/{MODEL}/infer", kserve),
    }


def check_answers(port: int, apis: dict[str, tuple[str, list[bytes]]]) -> None:
    """One request per API, checked for a 384-dimensional vector: a fast error is not a result."""
    for api, (path, reqs) in apis.items():
        r = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}",
            data=reqs[0],
            headers={"Content-Type": "application/json", "Cache-Control": "no-cache, no-store"},
        )
        with urllib.request.urlopen(r, timeout=30) as resp:
            doc = json.loads(resp.read())
        if api == "OpenAI":
            n = len(base64.b64decode(doc["data"][0]["embedding"])) // 4
        else:
            n = len(doc["outputs"][0]["data"])
        if n != 384:
            raise RuntimeError(f"{api} answered a vector of {n} values, expected 384")


@dataclass
class Variant:
    """One server configuration measured in every round: a label, model settings, and optionally
    another checkout whose ``appliance`` package the server runs (a before/after in one run)."""

    label: str
    settings: dict[str, Any]
    checkout: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``LABEL[@CHECKOUT]:KEY=JSON,KEY=JSON`` e.g. ``b64:batching.max_batch_size=64``."""
        head, _, kvs = spec.partition(":")
        label, _, checkout = head.partition("@")
        settings: dict[str, Any] = {}
        for kv in filter(None, kvs.split(",")):
            key, _, value = kv.partition("=")
            section, _, leaf = key.partition(".")
            settings.setdefault(section, {})[leaf] = json.loads(value)
        return cls(label, settings, Path(checkout).resolve() if checkout else None)


@dataclass
class Server:
    variant: Variant
    proc: subprocess.Popen[bytes]
    port: int
    at_ready: set[int]
    names: dict[int, str]


def launch(variant: Variant, threads: int, tmp: Path) -> Server:
    model: dict[str, Any] = {"engine": {"intra_op_threads": threads}}
    server: dict[str, Any] = {"host": "127.0.0.1", "log_level": "warning", "default_models": [MODEL]}
    defaults: dict[str, Any] = {}
    for section, values in variant.settings.items():
        # server.* keys are the server section's (appliance.yaml); a server-wide tunable
        # (compute.concurrency) goes in `defaults`, the rest are the model's settings.
        if section == "server":
            server.update(values)
            continue
        for key, value in values.items():
            wide = REGISTRY.get(f"{section}.{key}")
            target = defaults if wide is not None and wide.scope == "server" else model
            target.setdefault(section, {})[key] = value
    folder = tmp / (variant.label or "default")
    folder.mkdir()
    cfg = folder / "appliance.yaml"
    cfg.write_text(
        json.dumps(
            {
                "server": server,
                "admin": {"port": -1},
                "model_repository": str(ROOT / "engines"),
                "data_dir": str(folder / "data"),
                "defaults": defaults,
                "models": {MODEL: model},
            }
        )
    )
    port = free_port()
    proc = start_server(cfg, port, variant.checkout)
    return Server(variant, proc, port, set(thread_times(proc.pid)), {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="duration of each loaded server phase")
    ap.add_argument("--engine-seconds", type=float, default=1.5, help="per batch size, engine alone")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL[@CHECKOUT]:KEY=JSON,...",
        help="a server configuration to measure (repeatable; default: the model's own settings), "
        "e.g. --variant fixed16:batching.max_batch_size=16,batching.measure_batch_size=false",
    )
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    folder = ROOT / "engines" / MODEL
    texts = sentences(20000)
    apis = bodies(texts)
    reqs = {api: [request_bytes(path, b) for b in bs] for api, (path, bs) in apis.items()}
    variants = [Variant.parse(v) for v in args.variant] or [Variant("", {})]

    engines: list[dict[str, Any]] = []
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    cpu: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        servers: list[Server] = []
        try:
            for v in variants:
                servers.append(launch(v, args.threads, Path(tmp)))
                check_answers(servers[-1].port, apis)
                servers[-1].names = python_thread_names(servers[-1].proc.pid)
            offset = 0
            for rnd in range(args.rounds):
                engines.append(engine_phase(folder, texts[:600], args.threads, args.engine_seconds))
                order = [(srv, api) for srv in servers for api in reqs]
                for srv, api in order if rnd % 2 == 0 else reversed(order):
                    pid, label = srv.proc.pid, srv.variant.label
                    for c in CONCURRENCY:
                        batch = reqs[api][offset % 10000 :][:400] if c == 1 else reqs[api] * 10
                        offset += 97
                        ran = batches(srv.port)
                        before, t0 = thread_times(pid), time.perf_counter()
                        res = asyncio.run(closed_loop(srv.port, batch, c, 3.0 if c == 1 else args.seconds))
                        wall = time.perf_counter() - t0
                        after = thread_times(pid)
                        sent, runs_ = (a - b for a, b in zip(batches(srv.port), ran, strict=True))
                        res["mean_batch"] = sent / runs_ if runs_ else 0.0
                        server_cpu = sum(after.values()) - sum(before.get(t, 0.0) for t in after)
                        res["per_cpu_s"] = res["per_s"] * wall / server_cpu if server_cpu > 0 else 0.0
                        res["server_cores"] = server_cpu / wall
                        runs.setdefault((label, api, c), []).append(res)
                        if c == CONCURRENCY[-1]:
                            srv.names = srv.names or python_thread_names(pid)
                            cpu.setdefault((label, api), []).append(
                                (res["per_s"], breakdown(pid, before, after, wall, srv.names, srv.at_ready))
                            )
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
            described = {s.variant.label: describe(s.port) for s in servers}
        finally:
            for srv in servers:
                srv.proc.terminate()
                srv.proc.wait(30)
    report(args, variants, engines, runs, cpu, load_avg, described)


def describe(port: int) -> Any:
    """The batch size the server measured at load (``GET /v1/models/{model}``), or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{MODEL}", timeout=10) as r:
            return json.loads(r.read()).get("measured_batch_size")
    except (OSError, ValueError):
        return None


def report(
    args: argparse.Namespace,
    variants: list[Variant],
    engines: list[dict[str, Any]],
    runs: dict[tuple[str, str, int], list[dict[str, Any]]],
    cpu: dict[tuple[str, str], list[tuple[float, dict[str, float]]]],
    load_avg: tuple[float, float, float],
    described: dict[str, Any],
) -> None:
    eng_p50 = min(e["p50_ms"] for e in engines)
    eng_best = max(engines, key=lambda e: e["best_per_s"])
    best = eng_best["best_per_s"]
    eng_cpu = max(e["best_per_cpu_s"] for e in engines)
    result: dict[str, Any] = {
        "engine": {
            "p50_ms": eng_p50,
            "best_per_s": best,
            "best_batch": eng_best["best_batch"],
            "best_per_cpu_s": eng_cpu,
        },
        "engine_per_batch": {str(b): max(e["per_batch"][b] for e in engines) for b in ENGINE_BATCHES},
        "rounds": args.rounds,
        "load_average_at_start": load_avg,
        "cpu_count": os.cpu_count(),
        "servers": {},
    }
    per_b = ", ".join(f"{b}: {v:.0f}" for b, v in result["engine_per_batch"].items())
    print(f"engine alone, sentences/s by batch size (best of {args.rounds}): {per_b}")
    for v in variants:
        m = described.get(v.label)
        if m:
            print(
                f"server {v.label or ''}: batch size measured at load {m['chosen']} (of {m['sentences_per_cpu_s']})"
            )
    print()
    print(
        "| | c=1 p50 ms (added over engine batch-1) | c=16 sent/s (× engine best) | c=64 sent/s (× engine best) "
        "| c=64 sent per CPU-s (× engine best) | c=64 mean batch |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| engine alone (batch-1 tokenize+run; best batch {eng_best['best_batch']}) | {eng_p50:.2f} | "
        f"{best:.0f} (1.00) | {best:.0f} (1.00) | {eng_cpu:.0f} (1.00) | {eng_best['best_batch']} |"
    )
    for v in variants:
        for api in ("OpenAI", "KServe"):
            key = f"{api} {v.label}".strip()
            c1 = min(runs[(v.label, api, 1)], key=lambda r: r["p50_ms"])
            cells = [f"{c1['p50_ms']:.2f} (+{c1['p50_ms'] - eng_p50:.2f})"]
            res: dict[str, Any] = {"c1_p50_ms": c1["p50_ms"], "added_ms": c1["p50_ms"] - eng_p50}
            for c in CONCURRENCY[1:]:
                samples = runs[(v.label, api, c)]
                r = max(samples, key=lambda r: r["per_s"])
                cells.append(f"{r['per_s']:.0f} ({r['per_s'] / best:.2f})")
                res[f"c{c}_per_s"] = r["per_s"]
                res[f"c{c}_ratio"] = r["per_s"] / best
                res[f"c{c}_median_per_s"] = statistics.median(x["per_s"] for x in samples)
                res[f"c{c}_p99_ms"] = r["p99_ms"]
                res[f"c{c}_failed"] = sum(x["failed"] for x in samples)
                res[f"c{c}_client_cores"] = r["client_cores"]
                res[f"c{c}_mean_batch"] = r["mean_batch"]
            eff = max(x["per_cpu_s"] for x in runs[(v.label, api, CONCURRENCY[-1])])
            cells.append(f"{eff:.0f} ({eff / eng_cpu:.2f})")
            cells.append(f"{res[f'c{CONCURRENCY[-1]}_mean_batch']:.1f}")
            res["c64_per_cpu_s"] = eff
            res["c64_cpu_ratio"] = eff / eng_cpu
            result["servers"][key] = res
            print(f"| appliance, {key} | " + " | ".join(cells) + " |")
    print()
    for (label, api), shares in cpu.items():
        key = f"{api} {label}".strip()
        per_s, groups = max(shares, key=lambda s: s[0])
        result["servers"][key]["threads_c64"] = groups
        client = result["servers"][key][f"c{CONCURRENCY[-1]}_client_cores"]
        print(f"{key}, c={CONCURRENCY[-1]} ({per_s:.0f} sent/s): server CPU by thread, in cores")
        for name, cores in groups.items():
            if cores >= 0.005:
                print(f"  {cores:5.2f}  {name}")
        print(f"  {sum(groups.values()):5.2f}  server total; load generator {client:.2f}")
    failed: dict[str, dict[int, int]] = {}
    for (label, api, c), samples in runs.items():
        for x in samples:
            for status, n in x.get("statuses", {}).items():
                row = failed.setdefault(f"{api} {label} c={c}".replace("  ", " "), {})
                row[status] = row.get(status, 0) + n
    if failed:  # 429/503 are the admission control's answers (a stall on a loaded box), not errors
        print(f"non-200 answers by status: {failed}")
    print(
        f"load average at start: {load_avg[0]:.1f} / {load_avg[1]:.1f} / {load_avg[2]:.1f} on {os.cpu_count()} cores"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
