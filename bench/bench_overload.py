"""Overload benchmark (issues 15 and 10): priority under 3x overload with chat, refusal cost, gauges
back to zero, a memory soak, and the event loop under a ~4 MB input.

    .venv/bin/python bench/bench_overload.py [--seconds 60] [--capacity-seconds 15] [--soak-minutes 0]
                                             [--json results.json]
    .venv/bin/python bench/bench_overload.py --only refusal [--refusal-seconds 8] [--rounds 3]
                                             [--baseline ../older-checkout]

``appliance serve`` runs in a child process with both default models (all-minilm-l6-v2 and
smollm2-135m-instruct) from a temporary repository linking the built models, queues of 32 per level.

1. Solo capacity: embeddings closed loop at 16 clients (unique inputs, cache off); chat tokens/s
   with 16 streams (2x the 8 running slots), 64 tokens each, greedy, EOS ignored.
2. Long input: a ~4 MB embedding input with ``truncate: true`` while small requests keep arriving:
   their p99 during it, and the server's event-loop lag (histogram delta from /metrics, and the
   admin plane's last-minute quantiles).
3. Overload: open-loop embedding arrivals at 3x solo capacity (10 % priority 1, 60 % 2, 30 % 3,
   ``X-Timeout-Ms: 2000``) plus 16 chat streams; per priority answered / shed / p50 / p99; every
   refusal must carry Retry-After; nothing may outlive its deadline + 1 s. The mix's priority 1 is
   0.3x capacity, the load the goal speaks of. ``--probe-fraction F`` adds a separate client
   sending priority-1-only requests at F x capacity (default 0: priority 1 above 0.3x is beyond
   the goal) and reports its sheds and p99.
   Goodput = embeddings answered/s / solo capacity + chat tokens/s / solo chat tokens/s.
4. Gauges: queue depth, in-flight, running sequences and compute grants are all 0 soon after.
5. Refusal cost: a second server with a 1-slot queue and batch 1 is flooded (priority 3); server CPU
   time (utime + stime from /proc) over refusals, as an upper bound (answered work's CPU included)
   and net of the answered requests' CPU measured on the same server beforehand (the event-loop
   thread's too). ``--only refusal`` runs this phase alone, ``--rounds N`` times, each beside the
   bare aiohttp server; ``--baseline DIR`` floods another checkout's server (say, a
   ``git worktree`` of an older commit) alternately with this one's, so that the box's load hits
   both alike; medians are reported.
6. ``--soak-minutes M``: the overload of 3 for M minutes, resident memory at minute 2 and at the end.

Latency is measured from each request's scheduled arrival (open loop), so a client-side backlog
counts against the server rather than hiding. Chat tokens are counted as streamed content chunks
(one per decode step here). Latency percentiles are of answered requests only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_embeddings import free_port, pct, sentences  # noqa: E402
from bench.lean_http import LeanClient  # noqa: E402

EMBED = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
QUEUE = 32
DEADLINE_MS = 2000
MIX = ((1, 0.10), (2, 0.60), (3, 0.30))
CHAT_STREAMS = 16
CHAT_TOKENS = 64
ADMIN_TOKEN = "bench-admin-token"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
GAUGES = (
    "appliance_queue_depth",
    "appliance_inflight_requests",
    "appliance_running_sequences",
    "appliance_compute_running",
    "appliance_compute_waiting",
)
TEXTS = sentences(5000, seed=7)


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    admin_url: str
    proc: subprocess.Popen[bytes]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process, all its threads."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def loop_cpu_s(self) -> float:
        """CPU seconds of the main thread alone: the event loop, where refusals are handled."""
        return thread_cpu_s(self.proc.pid, self.proc.pid)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def thread_cpu_s(pid: int, tid: int) -> float:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def link_repository(tmp: Path, models: list[str]) -> Path:
    """A repository whose model folders link to the built artefacts (as tests/conftest.py does),
    so that only these models are scanned; settings go in the config's ``models`` section."""
    repo = tmp / "engines"
    repo.mkdir()
    for name in models:
        (repo / name).mkdir()
        for f in (ROOT / "engines" / name).iterdir():
            (repo / name / f.name).symlink_to(f)
    return repo


@contextmanager
def serve(
    tmp: Path, models: dict[str, dict[str, Any]], root: Path = ROOT, defaults: dict[str, Any] | None = None
) -> Iterator[Server]:
    """``appliance serve`` from the checkout at ``root`` (another commit's, to compare), with
    ``defaults`` as the config's tunable defaults."""
    tmp.mkdir()
    port, admin_port = free_port(), free_port()
    cfg = tmp / "appliance.yaml"
    defaults = dict(defaults or {})
    server = defaults.pop("server", {})  # server.* keys are the server section's, not tunables
    config = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "log_level": "warning",
            "default_models": list(models),
            **server,
        },
        "admin": {"port": admin_port, "token": ADMIN_TOKEN, "socket": ""},
        "model_repository": str(link_repository(tmp, list(models))),
        "data_dir": str(tmp / "data"),
        "models": models,
        "defaults": defaults,
    }
    cfg.write_text(yaml.safe_dump(config))
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(cfg), "serve"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", proc)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}; log:\n{(tmp / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(server.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def queue_settings(**extra: Any) -> dict[str, Any]:
    return {"queue": {"max_queue_size": QUEUE}, **extra}


# -- load -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    priority: int
    status: int  # 0: the client gave up (no answer within deadline + 5 s) or the connection failed
    latency_s: float
    retry_after: bool
    arrival: float = 0.0  # perf_counter() of the request's (scheduled) arrival
    service_s: float = 0.0  # from the client actually sending it to the answer
    kind: str = ""  # status and error code, e.g. "429 queue_full"

    @property
    def hung(self) -> bool:
        # No answer at all, or one later than the deadline + 1 s after it was sent (a late client
        # on a busy box delays sending; that is not the server's hang).
        return self.status == 0 or self.service_s > DEADLINE_MS / 1000 + 1


@dataclass
class Series:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0

    def of(self, priority: int | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if priority is None or o.priority == priority]

    def summary(self, priority: int | None = None) -> dict[str, Any]:
        mine = self.of(priority)
        ok = [o.latency_s for o in mine if o.status == 200]
        shed = [o for o in mine if o.status in (429, 503)]
        return {
            "sent": len(mine),
            "answered": len(ok),
            "answered_per_s": len(ok) / self.elapsed_s if self.elapsed_s else 0.0,
            "shed": len(shed),
            "shed_without_retry_after": sum(1 for o in shed if not o.retry_after),
            "other_status": sorted({o.status for o in mine if o.status not in (200, 429, 503)}),
            "kinds": dict(sorted(Counter(o.kind for o in mine).items())),
            "hung": sum(1 for o in mine if o.hung),
            # Which answers came late: a late 429/503 means the refusal itself waited (CPU-starved
            # loop), a late 200 means the deadline was not enforced.
            "hung_by_status": {k: v for k, v in sorted(Counter(o.kind for o in mine if o.hung).items())},
            "p50_ms": pct(ok, 50) * 1e3,
            "p99_ms": pct(ok, 99) * 1e3,
        }


class Unique:
    """Embedding inputs never seen before in this run, so no layer can answer from memory."""

    def __init__(self) -> None:
        self.n = 0

    def body(self, **extra: Any) -> bytes:
        self.n += 1
        text = f"{TEXTS[self.n % len(TEXTS)]} ({self.n})"
        return json.dumps({"model": EMBED, "input": text, "encoding_format": "base64", **extra}).encode()


UNIQUE = Unique()
# One body per kind of refusal ("503 unavailable"), so that the report says which check refused.
REFUSALS: dict[str, str] = {}


# 503s that share the code "unavailable", told apart by their message: refused on arrival for a
# predicted wait past the deadline, or admitted and timed out in the queue (what early refusal
# should spare).
_WHY = (("predicted wait", "would miss deadline"), ("timed out after", "timed out in queue"))


def kind_of(status: int, body: bytes) -> str:
    if status == 200:
        return "200"
    message = ""
    try:
        error = json.loads(body).get("error")
        code = error.get("code") if isinstance(error, dict) else None
        message = str(error.get("message", "")) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        code = None
    why = next((f" ({label})" for prefix, label in _WHY if message.startswith(prefix)), "")
    kind = f"{status} {code or '?'}{why}"
    REFUSALS.setdefault(kind, body.decode(errors="replace")[:300])
    return kind


def session(url: str, limit: int = 512) -> LeanClient:
    # The client's own bound: past deadline + 5 s a request counts as hung instead of waiting forever.
    host, _, port = url.removeprefix("http://").partition(":")
    return LeanClient(host, int(port), limit=limit, timeout_s=DEADLINE_MS / 1000 + 5)


async def embed(http: LeanClient, priority: int, started: float, body: bytes | None = None) -> Outcome:
    headers = {
        "Content-Type": "application/json",
        "X-Priority": str(priority),
        "X-Timeout-Ms": str(DEADLINE_MS),
        **NO_CACHE,
    }
    sent = time.perf_counter()
    try:
        r = await http.post("/v1/embeddings", body or UNIQUE.body(), headers)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        end = time.perf_counter()  # TimeoutError is an OSError: the client's bound
        return Outcome(priority, 0, end - started, False, started, end - sent, "no answer")
    end = time.perf_counter()
    retry = r.has_header(b"retry-after")
    return Outcome(priority, r.status, end - started, retry, started, end - sent, kind_of(r.status, r.body))


async def closed_loop(url: str, clients: int, seconds: float, priority: int = 2) -> Series:
    series = Series()
    async with session(url) as http:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                series.outcomes.append(await embed(http, priority, time.perf_counter()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        series.elapsed_s = time.perf_counter() - t0
    return series


async def open_loop(
    url: str,
    rate: float,
    seconds: float,
    mix: tuple[tuple[int, float], ...],
    seed: int = 0,
    stop: asyncio.Event | None = None,
) -> Series:
    """Poisson arrivals at ``rate``/s for ``seconds`` (or until ``stop`` is set); each request's
    latency counts from its scheduled arrival."""
    rng = random.Random(seed)
    levels, weights = zip(*mix, strict=True)
    series = Series()
    if rate <= 0:
        return series
    async with session(url) as http:
        t0 = time.perf_counter()
        due = t0
        tasks: list[asyncio.Task[None]] = []

        async def one(priority: int, at: float) -> None:
            series.outcomes.append(await embed(http, priority, at))

        while True:
            due += rng.expovariate(rate)
            if due - t0 > seconds or (stop is not None and stop.is_set()):
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rng.choices(levels, weights)[0], due)))
        series.elapsed_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
    return series


@dataclass
class ChatLoad:
    tokens: int = 0
    streams: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0


async def chat_streams(url: str, streams: int, seconds: float) -> ChatLoad:
    """``streams`` clients each streaming one answer after another; tokens counted as they arrive
    within the window, which ends after ``seconds`` (streams still running are abandoned)."""
    load = ChatLoad()
    end = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def worker(i: int) -> None:
            n = 0
            while time.perf_counter() < end:
                n += 1
                body = {
                    "model": CHAT,
                    "messages": [{"role": "user", "content": f"Tell story {i}-{n} about a lighthouse."}],
                    "max_tokens": CHAT_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                async with http.post(url + "/v1/chat/completions", json=body, headers=NO_CACHE) as r:
                    load.statuses[r.status] = load.statuses.get(r.status, 0) + 1
                    if r.status != 200:
                        await r.read()
                        await asyncio.sleep(0.5)
                        continue
                    async for raw in r.content:
                        if time.perf_counter() >= end:
                            return
                        line = raw.decode().strip()
                        if line.startswith("data: {"):
                            for choice in json.loads(line[6:]).get("choices") or []:
                                if (choice.get("delta") or {}).get("content"):
                                    load.tokens += 1
                    load.streams += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(streams)))
        load.elapsed_s = time.perf_counter() - t0
    return load


class ClientLag:
    """The load generator's own event-loop lag: on a shared box a late client inflates every
    latency it measures, so the figures say how late it ran."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + 0.05
            await asyncio.sleep(0.05)
            self.samples.append(max(0.0, loop.time() - due))

    async def __aenter__(self) -> ClientLag:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def summary(self) -> dict[str, float]:
        return {"p99_ms": pct(self.samples, 99) * 1e3, "max_ms": max(self.samples, default=0.0) * 1e3}


# -- metrics ----------------------------------------------------------------------------------------


async def scrape(url: str) -> dict[str, float]:
    """Every sample on /metrics, summed over labels, keyed by sample name."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def lag_from_histogram(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Event-loop lag over an interval from the histogram's bucket deltas: p99 as the upper bound of
    the bucket it falls in, and the count of probes later than 100 ms."""
    name = "appliance_event_loop_lag_seconds_bucket"
    buckets = sorted(
        (float(k[len(name) + 4 : -1]), after[k] - before.get(k, 0.0))
        for k in after
        if k.startswith(name + "{")
    )
    total = buckets[-1][1] if buckets else 0.0
    p99 = next((le for le, n in buckets if total and n >= 0.99 * total), float("nan"))
    over = total - next((n for le, n in buckets if le >= 0.1), total)
    return {"probes": total, "p99_bucket_s": p99, "probes_over_100ms": over}


async def admin_stats(server: Server) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.admin_url + "/admin/stats", headers=headers) as r,
    ):
        return dict(await r.json())


async def gauges_settle(url: str, within_s: float = 10.0) -> dict[str, Any]:
    t0 = time.perf_counter()
    while True:
        values = await scrape(url)
        gauges = {g: values.get(g, 0.0) for g in GAUGES}
        waited = time.perf_counter() - t0
        if all(v == 0 for v in gauges.values()) or waited > within_s:
            return {"zero": all(v == 0 for v in gauges.values()), "after_s": waited, "values": gauges}
        await asyncio.sleep(0.25)


# -- phases -----------------------------------------------------------------------------------------


async def capacity(server: Server, seconds: float) -> dict[str, float]:
    await closed_loop(server.url, 16, min(2.0, seconds))  # warm-up
    emb = await closed_loop(server.url, 16, seconds)
    await chat_streams(server.url, 2, 2.0)  # warm-up
    chat = await chat_streams(server.url, CHAT_STREAMS, seconds)
    return {"embeddings_per_s": emb.summary()["answered_per_s"], "chat_tok_s": chat.tok_s}


async def long_input(server: Server, rate: float) -> dict[str, Any]:
    """Small requests at ``rate``/s before, during and after one ~4 MB input."""
    big = json.dumps({"model": EMBED, "input": "lighthouse " * 380_000, "truncate": True}).encode()
    window: list[float] = []
    stop = asyncio.Event()
    before = await scrape(server.url)

    async def big_one() -> dict[str, Any]:
        await asyncio.sleep(1.0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            t = time.perf_counter()
            window.append(t)
            async with http.post(
                server.url + "/v1/embeddings",
                data=big,
                headers={"Content-Type": "application/json", **NO_CACHE},
            ) as r:
                await r.read()
                window.append(time.perf_counter())
                await asyncio.sleep(0.5)
                stop.set()
                return {"status": r.status, "latency_ms": (window[1] - t) * 1e3, "bytes": len(big)}

    async with ClientLag() as client_lag:
        big_result, small = await asyncio.gather(
            big_one(), open_loop(server.url, rate, 300, ((2, 1.0),), stop=stop)
        )
    after = await scrape(server.url)
    loop = (await admin_stats(server)).get("loop", {})
    return {
        "big": big_result,
        "small_rate_per_s": rate,
        "small_all": small.summary(),
        "loop_lag_histogram": lag_from_histogram(before, after),
        "loop_lag_admin_last_minute": loop,
        "client_loop_lag": client_lag.summary(),
        "window_s": window[1] - window[0],
        "_window": window,
        "_small": small,
    }


def arrived_during(series: Series, window: list[float]) -> Series:
    """The requests that arrived while the big input was in progress."""
    out = Series(elapsed_s=window[1] - window[0])
    out.outcomes = [o for o in series.outcomes if window[0] <= o.arrival <= window[1]]
    return out


async def overload(
    server: Server, cap: dict[str, float], seconds: float, probe_fraction: float
) -> dict[str, Any]:
    rate = 3 * cap["embeddings_per_s"]
    REFUSALS.clear()
    before = await scrape(server.url)
    busy0 = before.get("appliance_engine_busy_seconds_total", 0.0)
    window = [time.perf_counter()]
    cpu0, client0 = server.cpu_s(), time.process_time()
    async with ClientLag() as client_lag:
        mixed, probe, chat = await asyncio.gather(
            open_loop(server.url, rate, seconds, MIX, seed=1),
            open_loop(server.url, probe_fraction * cap["embeddings_per_s"], seconds, ((1, 1.0),), seed=2),
            chat_streams(server.url, CHAT_STREAMS, seconds),
        )
    cpu, client_cpu = server.cpu_s() - cpu0, time.process_time() - client0
    window.append(time.perf_counter())
    after = await scrape(server.url)
    # Engine time (timed on the workers, all models): what is left of 1 was lost between calls.
    busy = after.get("appliance_engine_busy_seconds_total", 0.0) - busy0
    gauges = await gauges_settle(server.url)
    answered_per_s = (mixed.summary()["answered"] + probe.summary()["answered"]) / seconds
    return {
        "offered_per_s": rate,
        "probe_per_s": probe_fraction * cap["embeddings_per_s"],
        "by_priority": {str(p): mixed.summary(p) for p, _ in MIX},
        "all": mixed.summary(),
        "probe_p1": probe.summary(),
        "chat_tok_s": chat.tok_s,
        "chat_statuses": chat.statuses,
        "embeddings_answered_per_s": answered_per_s,
        "goodput": answered_per_s / cap["embeddings_per_s"] + chat.tok_s / cap["chat_tok_s"],
        "server_cores": cpu / seconds,
        "engine_busy": busy / seconds,
        "client_cores": client_cpu / seconds,
        "client_loop_lag": client_lag.summary(),
        "server_loop_lag": lag_from_histogram(before, after),
        "window": window,
        "p1_latencies_ms": sorted(o.latency_s * 1e3 for o in mixed.of(1) if o.status == 200),
        "refusal_bodies": dict(REFUSALS),
        "gauges": gauges,
    }


async def refusal_cost(tmp: Path, seconds: float, root: Path = ROOT, bare: bool = True) -> dict[str, Any]:
    """A 1-slot queue and batch 1, flooded by 64 clients: almost every request is refused."""
    models = {
        EMBED: {
            "queue": {"max_queue_size": 1},
            "batching": {"max_batch_size": 1},
            "engine": {"intra_op_threads": 1},
        }
    }
    with serve(tmp, models, root) as server:
        await closed_loop(server.url, 1, 1.0)  # warm-up
        cpu0, loop0 = server.cpu_s(), server.loop_cpu_s()
        solo = await closed_loop(server.url, 1, max(2.0, seconds / 2))
        cpu_per_answer = (server.cpu_s() - cpu0) / max(1, solo.summary()["answered"])
        loop_per_answer = (server.loop_cpu_s() - loop0) / max(1, solo.summary()["answered"])
        REFUSALS.clear()
        cpu0, loop0 = server.cpu_s(), server.loop_cpu_s()
        flood = await closed_loop(server.url, 64, seconds, priority=3)
        cpu, loop_cpu = server.cpu_s() - cpu0, server.loop_cpu_s() - loop0
    s = flood.summary()
    refused = max(1, s["shed"])
    return {
        "ms_per_refusal_loop_thread": loop_cpu / refused * 1e3,
        # The answered requests' share of the loop thread taken out, as measured solo.
        "ms_per_refusal_loop_thread_net": max(0.0, loop_cpu - s["answered"] * loop_per_answer)
        / refused
        * 1e3,
        "bare_aiohttp_ms_per_refusal": await bare_refusal_cost(seconds) if bare else None,
        "refused": s["shed"],
        "answered": s["answered"],
        "refused_per_s": s["shed"] / flood.elapsed_s,
        "refused_without_retry_after": s["shed_without_retry_after"],
        "server_cpu_s": cpu,
        "cpu_per_answer_ms": cpu_per_answer * 1e3,
        "ms_per_refusal_upper_bound": cpu / refused * 1e3,
        "ms_per_refusal_net": max(0.0, cpu - s["answered"] * cpu_per_answer) / refused * 1e3,
        "refusal_bodies": dict(REFUSALS),
    }


async def refusal_rounds(tmp: Path, seconds: float, rounds: int, baseline: Path | None) -> dict[str, Any]:
    """The refusal phase alone, ``rounds`` times; with a baseline checkout, its server and this
    one alternate (then the bare aiohttp server), so that the box's load hits each alike."""
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "bare": []}
    if baseline is not None:
        runs["baseline"] = []
    for i in range(rounds):
        if baseline is not None:
            print(f"  round {i + 1}: baseline ({baseline}) ...", flush=True)
            runs["baseline"].append(await refusal_cost(tmp / f"baseline{i}", seconds, baseline, bare=False))
        print(f"  round {i + 1}: this checkout ...", flush=True)
        runs["this"].append(await refusal_cost(tmp / f"this{i}", seconds, bare=False))
        runs["bare"].append({"ms_per_refusal_loop_thread": await bare_refusal_cost(seconds)})
        for name, got in runs.items():
            print(f"    {name}: {_cost_line(got[-1])}", flush=True)
    med = {name: _medians(got) for name, got in runs.items()}
    result = dict(runs["this"][-1])
    result.update(med["this"])
    result["bare_aiohttp_ms_per_refusal"] = med["bare"]["ms_per_refusal_loop_thread"]
    result["rounds"] = runs
    result["medians"] = med
    return result


def _cost_line(r: dict[str, Any]) -> str:
    if "ms_per_refusal_net" not in r:
        return f"loop thread {r['ms_per_refusal_loop_thread']:.3f} ms"
    return (
        f"net {r['ms_per_refusal_net']:.3f} / loop thread {r['ms_per_refusal_loop_thread']:.3f} "
        f"(net {r['ms_per_refusal_loop_thread_net']:.3f}) ms "
        f"({r['refused']} refused, {r['refused_per_s']:.0f}/s, {r['answered']} answered)"
    )


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "ms_per_refusal_net",
        "ms_per_refusal_upper_bound",
        "ms_per_refusal_loop_thread",
        "ms_per_refusal_loop_thread_net",
    )
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in keys if k in runs[0]}


async def bare_refusal_cost(seconds: float) -> float:
    """CPU ms per request of a bare aiohttp server answering every POST with a 429 (see
    bench/bare_refusal_server.py), flooded the same way: the floor aiohttp itself sets here."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_refusal_server.py"), str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                with urllib.request.urlopen(urllib.request.Request(url + "/v1/embeddings", b"{}"), timeout=1):
                    pass
            except urllib.error.HTTPError:
                break  # the 429: it is up
            except OSError:
                time.sleep(0.1)
        await closed_loop(url, 64, 1.0, priority=3)  # warm-up
        cpu0 = thread_cpu_s(proc.pid, proc.pid)
        flood = await closed_loop(url, 64, seconds, priority=3)
        cpu = thread_cpu_s(proc.pid, proc.pid) - cpu0
        return cpu / max(1, flood.summary()["shed"]) * 1e3
    finally:
        proc.terminate()
        proc.wait(10)


async def soak(server: Server, cap: dict[str, float], minutes: float) -> dict[str, Any]:
    # The baseline is taken at minute 2 (warm: arenas, caches and pools grown); a soak shorter than
    # 4 minutes (a smoke run of this script) takes it half-way instead.
    mark_s = min(120.0, minutes * 30)
    t0 = time.perf_counter()
    rss: dict[str, float] = {}
    shed = answered = 0
    while (elapsed := time.perf_counter() - t0) < minutes * 60:
        if elapsed >= mark_s and "baseline" not in rss:
            rss["baseline"] = server.rss_mb()
        chunk = min(
            30.0, minutes * 60 - elapsed, max(1.0, mark_s - elapsed) if "baseline" not in rss else 30.0
        )
        mixed, _ = await asyncio.gather(
            open_loop(server.url, 3 * cap["embeddings_per_s"], chunk, MIX, seed=int(elapsed)),
            chat_streams(server.url, CHAT_STREAMS, chunk),
        )
        s = mixed.summary()
        shed, answered = shed + s["shed"], answered + s["answered"]
    rss["end"] = server.rss_mb()
    growth = rss["end"] - rss.get("baseline", float("nan"))
    return {
        "minutes": minutes,
        "baseline_at_s": mark_s,
        "rss_mb": rss,
        "growth_mb": growth,
        "answered": answered,
        "shed": shed,
    }


# -- report -----------------------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    cap, ov, lg = r["capacity"], r["overload"], r["long_input"]
    rows.append(("solo embedding capacity (16 clients)", f"{cap['embeddings_per_s']:.0f} req/s", ""))
    rows.append(("solo chat (16 streams, 8 slots)", f"{cap['chat_tok_s']:.1f} tok/s", ""))
    rows.append(("overload: embeddings offered", f"{ov['offered_per_s']:.0f} req/s (3x)", ""))
    for p, s in ov["by_priority"].items():
        rows.append(
            (
                f"overload: priority {p} answered / shed / p50 / p99",
                f"{s['answered']} / {s['shed']} / {s['p50_ms']:.0f} ms / {s['p99_ms']:.0f} ms",
                "priority 1 (0.3x capacity): 0 shed, p99 <= 250 ms" if p == "1" else "",
            )
        )
    for p, s in ov["by_priority"].items():
        refused = ", ".join(f"{n} x {k}" for k, n in s["kinds"].items() if k != "200") or "none"
        rows.append((f"overload: priority {p} refusals by kind", refused, ""))
    pr = ov["probe_p1"]
    if ov["probe_per_s"] > 0:
        rows.append((f"extra priority-1 probe at {ov['probe_per_s']:.0f} req/s: shed", str(pr["shed"]), ""))
        rows.append(("extra priority-1 probe: p99", f"{pr['p99_ms']:.0f} ms", ""))
    rows.append(("chat during overload", f"{ov['chat_tok_s']:.1f} tok/s", ""))
    rows.append(("server CPU during overload", f"{ov['server_cores']:.2f} cores", ""))
    rows.append(("engine busy during overload (all models, worker-timed)", f"{ov['engine_busy']:.2f}", ""))
    rows.append(("load generator CPU during overload", f"{ov['client_cores']:.2f} cores", ""))
    cl = ov["client_loop_lag"]
    rows.append(
        ("load generator's own loop lag: p99 / max", f"{cl['p99_ms']:.0f} / {cl['max_ms']:.0f} ms", "small")
    )
    rows.append(("goodput (embeddings + chat, shares of solo)", f"{ov['goodput']:.2f}", ">= 0.8"))
    no_ra = ov["all"]["shed_without_retry_after"] + pr["shed_without_retry_after"]
    rows.append(("refusals without Retry-After", str(no_ra), "0"))
    hung = ov["all"]["hung"] + pr["hung"]
    late = Counter(ov["all"]["hung_by_status"]) + Counter(pr["hung_by_status"])
    detail = ", ".join(f"{n} x {k}" for k, n in sorted(late.items())) or "none"
    rows.append(("hung (answered > deadline + 1 s after sending, by kind)", f"{hung} ({detail})", "0"))
    others = sorted(set(ov["all"]["other_status"]) | set(pr["other_status"]))
    rows.append(("other statuses seen", ", ".join(map(str, others)) or "none", "none"))
    g = ov["gauges"]
    rows.append(("gauges back to zero", f"{'yes' if g['zero'] else 'NO'} after {g['after_s']:.1f} s", "yes"))
    rc = r["refusal_cost"]
    rows.append(
        (
            "server CPU per refusal (net / upper bound / event-loop thread)",
            f"{rc['ms_per_refusal_net']:.3f} / {rc['ms_per_refusal_upper_bound']:.3f} / "
            f"{rc['ms_per_refusal_loop_thread']:.3f} ms ({rc['refused']} refused, {rc['answered']} answered)",
            "<= 0.25 ms",
        )
    )
    rows.append(
        (
            "bare aiohttp 429, same flood (the floor here)",
            f"{rc['bare_aiohttp_ms_per_refusal']:.3f} ms "
            f"(appliance loop thread = {rc['ms_per_refusal_loop_thread'] / rc['bare_aiohttp_ms_per_refusal']:.2f}x)",
            "",
        )
    )
    if "soak" in r:
        sk = r["soak"]
        rows.append(
            (
                f"RSS growth, {sk['baseline_at_s']:g} s to {sk['minutes']:g} min",
                f"{sk['growth_mb']:.1f} MB ({sk['rss_mb']['end']:.0f} MB at the end)",
                "<= 50 MB",
            )
        )
    b = lg["big"]
    rows.append(("~4 MB input, truncate: true", f"{b['status']} in {b['latency_ms']:.0f} ms", "200"))
    rows.append(
        (
            "small requests during it: answered / p99",
            f"{lg['small_during']['answered']} / {lg['small_during']['p99_ms']:.0f} ms",
            "",
        )
    )
    rows.append(
        ("small requests finished while it was in progress", str(lg["small_finished_before_big"]), "> 0")
    )
    h = lg["loop_lag_histogram"]
    rows.append(
        (
            "event-loop lag during long-input phase: p99 bucket / probes > 100 ms",
            f"<= {h['p99_bucket_s'] * 1e3:.0f} ms / {h['probes_over_100ms']:.0f}",
            "",
        )
    )
    adm = lg["loop_lag_admin_last_minute"]
    if adm:
        rows.append(
            (
                "event-loop lag, admin last minute: p99 / max",
                f"{adm['p99_ms']:.0f} / {adm['max_ms']:.0f} ms",
                "",
            )
        )
    lines = ["| figure | measured | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b_} | {c} |" for a, b_, c in rows]
    return "\n".join(lines)


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"args": vars(args), "cpu_count": os.cpu_count()}
    models = {EMBED: queue_settings(), CHAT: queue_settings()}
    defaults: dict[str, Any] = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        section, _, leaf = key.partition(".")
        defaults.setdefault(section, {})[leaf] = json.loads(value)
    with serve(tmp / "main", models, defaults=defaults) as server:
        print("capacity ...", flush=True)
        cap = result["capacity"] = await capacity(server, args.capacity_seconds)
        print(f"  {cap}", flush=True)
        print("long input ...", flush=True)
        lg = await long_input(server, 0.3 * cap["embeddings_per_s"])
        window, small = lg.pop("_window"), lg.pop("_small")
        lg["small_during"] = arrived_during(small, window).summary()
        # Ordering, not timing: small requests that finished while the big one was still running.
        lg["small_finished_before_big"] = sum(
            1 for o in small.outcomes if o.status == 200 and window[0] < o.arrival + o.latency_s < window[1]
        )
        result["long_input"] = lg
        print(f"  big {lg['big']}, small during {lg['small_during']['answered']}", flush=True)
        print(f"overload {args.seconds:g} s ...", flush=True)
        result["overload"] = await overload(server, cap, args.seconds, args.probe_fraction)
        if args.soak_minutes:
            print(f"soak {args.soak_minutes:g} min ...", flush=True)
            result["soak"] = await soak(server, cap, args.soak_minutes)
    print("refusal cost ...", flush=True)
    result["refusal_cost"] = await refusal_cost(tmp / "refusal", args.refusal_seconds)
    return result


async def overload_rounds(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The overload phase alone, ``--rounds`` times on this checkout's server and, with
    ``--baseline DIR``, on that checkout's too, alternating (ABBA...) so that the shared box's load
    hits both alike. Both servers stay up; capacity is measured once, on this one, so that both are
    offered the same load and their goodputs share one denominator."""
    models = {EMBED: queue_settings(), CHAT: queue_settings()}
    servers: dict[str, Server] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        servers["this"] = stack.enter_context(serve(tmp / "this", models, defaults=_defaults(args.set)))
        if args.baseline is not None:
            base = _defaults(args.baseline_set)
            servers["baseline"] = stack.enter_context(serve(tmp / "baseline", models, args.baseline, base))
        if args.assume_capacity:
            emb, tok = args.assume_capacity
            cap = {"embeddings_per_s": emb, "chat_tok_s": tok}
        else:
            print("capacity ...", flush=True)
            cap = await capacity(servers["this"], args.capacity_seconds)
        print(f"  capacity {cap}", flush=True)
        for server in servers.values():  # warm both alike (first-call costs, lazy imports)
            await closed_loop(server.url, 16, 2.0)
            await chat_streams(server.url, 2, 2.0)
        names = list(servers)
        for i in range(args.rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                ov = await overload(servers[name], cap, args.seconds, args.probe_fraction)
                runs.setdefault(name, []).append(ov)
                print(f"  round {i + 1} {name}: {_overload_line(ov)}", flush=True)
    return {"capacity": cap, "runs": runs}


def _overload_line(ov: dict[str, Any]) -> str:
    p = ov["by_priority"]
    lag = ov["server_loop_lag"]
    return (
        f"p1 {p['1']['answered']} ok / {p['1']['shed']} shed / p50 {p['1']['p50_ms']:.0f} / "
        f"p99 {p['1']['p99_ms']:.0f} ms; p2 {p['2']['answered']} p3 {p['3']['answered']} ok; "
        f"chat {ov['chat_tok_s']:.1f} tok/s; goodput {ov['goodput']:.2f}; "
        f"loop lag p99 <= {lag['p99_bucket_s'] * 1e3:.0f} ms, {lag['probes_over_100ms']:.0f} > 100 ms"
    )


def _defaults(pairs: list[str]) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for kv in pairs:
        key, _, value = kv.partition("=")
        section, _, leaf = key.partition(".")
        defaults.setdefault(section, {})[leaf] = json.loads(value)
    return defaults


def refusal_table(rc: dict[str, Any]) -> str:
    med = rc["medians"]
    bare = med["bare"]["ms_per_refusal_loop_thread"]
    lines = [
        f"| median of {len(rc['rounds']['this'])} rounds | net ms | event-loop thread ms (net) | loop thread / bare |",
        "|---|---|---|---|",
    ]
    for name in ("baseline", "this"):
        if name in med:
            m = med[name]
            lines.append(
                f"| {name} | {m['ms_per_refusal_net']:.3f} | {m['ms_per_refusal_loop_thread']:.3f} "
                f"({m['ms_per_refusal_loop_thread_net']:.3f}) | {m['ms_per_refusal_loop_thread'] / bare:.2f}x |"
            )
    lines.append(f"| bare aiohttp 429 | | {bare:.3f} | 1.00x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="overload phase length")
    ap.add_argument("--capacity-seconds", type=float, default=15.0, help="each solo capacity phase")
    ap.add_argument("--refusal-seconds", type=float, default=10.0, help="refusal-only flood length")
    ap.add_argument("--probe-fraction", type=float, default=0.0, help="extra priority-1 rate, x capacity")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="soak length (0: no soak)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a tunable for the main server's defaults, e.g. compute.urgent_lane=1 (repeatable)",
    )
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--only", choices=["refusal", "overload"], help="run only this phase")
    ap.add_argument("--rounds", type=int, default=1, help="with --only: rounds (medians reported)")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="with --only: another checkout (say, a `git worktree` of an older commit) whose "
        "server is flooded alternately with this one's",
    )
    ap.add_argument(
        "--baseline-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="with --only overload --baseline: a tunable for the baseline server (repeatable); "
        "`--baseline . --baseline-set ...` compares settings on one checkout",
    )
    ap.add_argument(
        "--assume-capacity",
        type=float,
        nargs=2,
        metavar=("EMB_PER_S", "CHAT_TOK_S"),
        help="with --only overload: solo capacities taken as given, not measured (on a box other "
        "sessions load on and off, a capacity measured in a quiet minute overloads every round)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # uvloop for the load generator too: every cycle it spends is taken from the server.
        uvloop.install()
        if args.only == "overload":
            result = {
                "args": vars(args),
                "cpu_count": os.cpu_count(),
                **asyncio.run(overload_rounds(args, Path(tmp))),
            }
        elif args.only == "refusal":
            rc = asyncio.run(refusal_rounds(Path(tmp), args.refusal_seconds, args.rounds, args.baseline))
            result: dict[str, Any] = {"args": vars(args), "cpu_count": os.cpu_count(), "refusal_cost": rc}
            print()
            print(refusal_table(rc))
        else:
            result = asyncio.run(run(args, Path(tmp)))
            print()
            print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
