"""Where the time of one chat stream goes: stage timestamps inside the real server, at concurrency 1.

    .venv/bin/python bench/profile_chat.py [--requests 8] [--model NAME] [--max-tokens 128]

The server runs in this process (its own event loop in a thread, as ``tests/conftest.py`` does),
so client and server share one clock. Chosen functions are wrapped to stamp ``time.perf_counter``
(the wrapping costs ~1 µs a call): the handler's entry, templating, tokenizing, the scheduler's
submit, each engine call (``_engine_call``: grant + hand-off to the worker), the engine's own
``prefill`` / ``decode``, sampling and detokenizing (``_advance``), the first SSE data write, and the
client's first content chunk. Prints the median of each stage over the requests, time to first
token first, then the split of one decode step (engine vs Python around it).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.api import chat as chat_api  # noqa: E402
from appliance.config import parse  # noqa: E402
from appliance.llm import runtime, scheduler, service  # noqa: E402
from appliance.server import Server, new_event_loop  # noqa: E402

MODEL = "smollm2-135m-instruct"
STAMPS: dict[str, list[float]] = defaultdict(list)  # stage -> perf_counter of each event
SPANS: dict[str, list[float]] = defaultdict(list)  # stage -> durations in seconds


def stamp(name: str) -> None:
    STAMPS[name].append(time.perf_counter())


def timed(owner: Any, attr: str, name: str) -> None:
    """Wrap ``owner.attr`` (sync or async) to record its start stamp and its duration."""
    fn: Callable[..., Any] = getattr(owner, attr)
    static = isinstance(vars(owner).get(attr), staticmethod)
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrap(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            STAMPS[name].append(t)
            try:
                return await fn(*a, **k)
            finally:
                SPANS[name].append(time.perf_counter() - t)

        setattr(owner, attr, staticmethod(awrap) if static else awrap)
    else:

        @functools.wraps(fn)
        def wrap(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            STAMPS[name].append(t)
            try:
                return fn(*a, **k)
            finally:
                SPANS[name].append(time.perf_counter() - t)

        setattr(owner, attr, staticmethod(wrap) if static else wrap)


def instrument() -> None:
    timed(chat_api, "_generate", "handler")
    timed(service.LLMRuntime, "render", "template")
    timed(service.ChatService, "_encode", "tokenize")
    timed(scheduler.Scheduler, "submit", "submit")
    timed(scheduler.Scheduler, "_engine_call", "engine_call")
    timed(scheduler.Scheduler, "_in_worker", "worker")
    timed(runtime.DecoderSession, "prefill", "prefill")
    timed(runtime.DecoderSession, "decode", "decode")
    timed(runtime.DecoderSession, "_run", "ort_run")
    timed(scheduler.Scheduler, "_advance", "advance")
    timed(scheduler.Scheduler, "_deliver", "deliver")
    original = chat_api.Wire.chunk

    def chunk(self: Any, text: Any, *a: Any, **k: Any) -> Any:
        if text:
            stamp("sse_chunk")
        return original(self, text, *a, **k)

    chat_api.Wire.chunk = chunk  # type: ignore[method-assign]


class InProcessServer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = parse(config, None, env={})
        self.loop = new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        threading.Thread(target=self._main, daemon=True).start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = Server(self.cfg, env={})
        await server.start()
        self.port = server.port
        self.ready.set()
        await asyncio.Event().wait()


async def one(url: str, model: str, max_tokens: int, topic: str) -> dict[str, float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Cache-Control": "no-cache, no-store"}
    times: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        sent = time.perf_counter()
        async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    times.append(time.perf_counter())
    return {"sent": sent, "first": times[0], "last": times[-1], "chunks": len(times)}


def after(name: str, t: float) -> float:
    """The first stamp of ``name`` at or after ``t``."""
    return min(x for x in STAMPS[name] if x >= t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--set", action="append", default=[], help="a setting, NAME=VALUE (JSON value)")
    args = ap.parse_args()
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        settings = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        config = {
            "server": {"port": 0, "log_level": "warning", "default_models": [args.model]},
            "admin": {"port": -1, "socket": ""},
            "model_repository": str(ROOT / "engines"),
            "data_dir": str(Path(tmp) / "data"),
            **({"defaults": settings} if settings else {}),
        }
        srv = InProcessServer(config)
        srv.ready.wait(300)
        url = f"http://127.0.0.1:{srv.port}"
        asyncio.run(one(url, args.model, 8, "warm-up"))
        rows: list[dict[str, float]] = []
        topics = [
            "robots",
            "the sea",
            "a lighthouse",
            "trains",
            "a garden",
            "the moon",
            "a library",
            "winter",
        ]
        for i in range(args.requests):
            STAMPS.clear()
            SPANS.clear()
            r = asyncio.run(one(url, args.model, args.max_tokens, topics[i % len(topics)]))
            t0 = r["sent"]
            pre = after("prefill", t0)
            pre_end = pre + SPANS["prefill"][0]
            row = {
                "client -> handler": after("handler", t0) - t0,
                "handler -> template": after("template", t0) - after("handler", t0),
                "template": SPANS["template"][0],
                "tokenize": SPANS["tokenize"][0],
                "tokenize -> submit": after("submit", t0) - (after("tokenize", t0) + SPANS["tokenize"][0]),
                "submit -> engine call": after("engine_call", t0) - after("submit", t0),
                "grant + hand-off to worker": after("worker", t0) - after("engine_call", t0),
                "worker -> prefill": pre - after("worker", t0),
                "prefill (engine)": SPANS["prefill"][0],
                "sample + detokenize": SPANS["advance"][0],
                "-> first SSE chunk": after("sse_chunk", pre_end) - pre_end - SPANS["advance"][0],
                "SSE chunk -> client": r["first"] - after("sse_chunk", pre_end),
                "TTFT (client)": r["first"] - t0,
            }
            # Decode steps: from one decode's start to the next; the engine's share is _run.
            decodes = STAMPS["decode"]
            gaps = [b - a for a, b in itertools.pairwise(decodes)]
            row["decode step interval"] = statistics.median(gaps)
            row["decode (DecoderSession.decode)"] = statistics.median(SPANS["decode"])
            row["  of which ORT run"] = statistics.median(SPANS["ort_run"][1:])
            row["sample + detokenize / token"] = statistics.median(SPANS["advance"][1:])
            row["client tok/s"] = (r["chunks"] - 1) / (r["last"] - r["first"])
            rows.append(row)
        print(f"{args.requests} requests, {args.max_tokens} tokens, medians (ms):")
        for key in rows[0]:
            values = [row[key] for row in rows]
            med = statistics.median(values)
            unit = "" if key == "client tok/s" else " ms"
            print(f"  {key:34s} {med if key == 'client tok/s' else med * 1e3:8.2f}{unit}")


if __name__ == "__main__":
    main()
