"""Where one embedding request's time goes at concurrency 1: stage timestamps inside the real server.

    .venv/bin/python bench/profile_embeddings.py [--requests 400] [--api openai|kserve] [--set NAME=JSON]

The server runs in this process (its own event loop in a thread, as ``tests/conftest.py`` does) and
the client is a blocking keep-alive socket on another thread, so both share one clock. Chosen
functions are wrapped to stamp ``time.perf_counter`` (~1 µs a call): the handler's entry, the
batcher's submit, the model's batch on its worker thread (tokenizing, ONNX Runtime's run, the rest),
the answer's rendering back on the loop. Requests go one at a time with a 2-ms pause between them,
as one client's do; the engine alone is then timed the same way (tokenize + run, batch 1, the same
pause), so the table says what the server adds around the engine and where. Prints the median of
each stage.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance import batcher, inference  # noqa: E402
from appliance.api import kserve, openai  # noqa: E402
from appliance.engines import onnxruntime as ort_engine  # noqa: E402
from bench.profile_chat import InProcessServer  # noqa: E402  (the same in-process server)

MODEL = "all-minilm-l6-v2"
STARTS: dict[str, list[float]] = defaultdict(list)  # stage -> perf_counter at each call's start
ENDS: dict[str, list[float]] = defaultdict(list)  # stage -> perf_counter at each call's end


def timed(owner: Any, attr: str, name: str) -> None:
    """Wrap ``owner.attr`` (sync or async) to record when each call starts and ends."""
    fn: Callable[..., Any] = getattr(owner, attr)
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrap(*a: Any, **k: Any) -> Any:
            STARTS[name].append(time.perf_counter())
            try:
                return await fn(*a, **k)
            finally:
                ENDS[name].append(time.perf_counter())

        setattr(owner, attr, awrap)
    else:

        @functools.wraps(fn)
        def wrap(*a: Any, **k: Any) -> Any:
            STARTS[name].append(time.perf_counter())
            try:
                return fn(*a, **k)
            finally:
                ENDS[name].append(time.perf_counter())

        setattr(owner, attr, wrap)


def instrument(api: str) -> None:
    if api == "openai":
        timed(openai._Embeddings, "render", "render")
    else:
        timed(kserve, "encode_response", "render")
    timed(batcher.Batcher, "submit", "submit")
    timed(batcher.Batcher, "_launch", "launch")
    timed(batcher.Batcher, "_complete", "complete")
    timed(inference.EmbeddingRuntime, "run_batch", "worker")
    timed(inference.EmbeddingRuntime, "encode", "tokenize")
    timed(ort_engine.OnnxRuntimeEngine, "run", "ort")


def request_bytes(api: str, text: str) -> bytes:
    if api == "openai":
        path, body = "/v1/embeddings", {"model": MODEL, "input": text, "encoding_format": "base64"}
    else:
        path = f"/v2/models/{MODEL}/infer"
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Cache-Control: no-cache, no-store\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    return head.encode() + raw


def _more(sock: socket.socket) -> bytes:
    data = sock.recv(65536)  # bounded by the socket's timeout
    if not data:
        raise RuntimeError("the server closed the connection")
    return data


def read_answer(sock: socket.socket, buf: bytearray) -> None:
    """One HTTP/1.1 answer with a Content-Length, read whole (status checked)."""
    while b"\r\n\r\n" not in buf:
        buf += _more(sock)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if head[9:12] != b"200":
        raise RuntimeError(f"the server answered {head[:12]!r}")
    length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
    body = bytearray(rest)
    while len(body) < length:
        body += _more(sock)
    buf[:] = body[length:]


def sentences(n: int) -> list[str]:
    subjects = ["My order", "The invoice", "Your courier", "The refund", "My account", "The app"]
    verbs = ["has not arrived", "shows the wrong amount", "was charged twice", "cannot be opened"]
    tails = ["since Monday", "after the update", "for the third time", "and I need it today"]
    return [f"{subjects[i % 6]} {verbs[(i // 6) % 4]} {tails[(i // 24) % 4]} (ticket {i})." for i in range(n)]


def after(name: str, t: float, ends: bool = False) -> float:
    """The first start (or end) of ``name`` at or after ``t``."""
    return min(x for x in (ENDS if ends else STARTS)[name] if x >= t)


def engine_alone(folder: Path, texts: list[str], pause_s: float) -> float:
    """Median ms of tokenize + run at batch 1 through the server's own runtime, paused as served."""
    from tokenizers import Tokenizer

    from appliance.settings import defaults

    values = defaults()
    engine = ort_engine.OnnxRuntimeEngine(
        folder / "model.onnx",
        intra_op_threads=int(values["engine.intra_op_threads"]),
        spin_us=int(values["engine.spin_us"]),
    )
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    import numpy as np

    times = []
    for i, text in enumerate(texts):
        t = time.perf_counter()
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        engine.run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        if i >= 20:
            times.append(time.perf_counter() - t)
        time.sleep(pause_s)
    engine.close()
    return statistics.median(times) * 1e3


def thread_wakeups(work_s: float, pause_s: float, n: int = 300) -> tuple[float, float]:
    """Median ms of the server's two hand-offs with nothing else in them: the event loop (the
    server's) hands a job to a one-thread pool, the job keeps its thread busy for ``work_s`` (as
    the engine's run does) and the result goes back; one job every ``pause_s``, as one client's
    requests come. What a sleeping thread's wake-up costs on this machine, for the stages above."""
    from appliance.server import new_event_loop

    there: list[float] = []
    back: list[float] = []
    pool = ThreadPoolExecutor(1)

    def job(sent: float) -> tuple[float, float]:
        began = time.perf_counter()
        while time.perf_counter() - began < work_s:
            pass
        return sent, began

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for i in range(n + 20):
            await asyncio.sleep(pause_s)
            sent = time.perf_counter()
            _, began = await loop.run_in_executor(pool, job, sent)
            got = time.perf_counter()
            if i >= 20:
                there.append(began - sent)
                back.append(got - began - work_s)

    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
        pool.shutdown()
    return statistics.median(there) * 1e3, statistics.median(back) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--api", choices=["openai", "kserve"], default="openai")
    ap.add_argument("--pause-ms", type=float, default=2.0, help="between one answer and the next request")
    ap.add_argument("--set", action="append", default=[], help="a setting, NAME=VALUE (JSON value)")
    args = ap.parse_args()
    instrument(args.api)
    texts = sentences(args.requests + 20)
    with tempfile.TemporaryDirectory() as tmp:
        model: dict[str, Any] = {}
        for key, value in (s.split("=", 1) for s in args.set):
            section, _, leaf = key.partition(".")
            model.setdefault(section, {})[leaf] = json.loads(value)
        config = {
            "server": {"port": 0, "log_level": "warning", "default_models": [MODEL]},
            "admin": {"port": -1},
            "model_repository": str(ROOT / "engines"),
            "data_dir": tmp,
            "models": {MODEL: model},
        }
        server = InProcessServer(config)
        if not server.ready.wait(120):
            raise SystemExit("the server did not start")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        rows: dict[str, list[float]] = defaultdict(list)
        for i, text in enumerate(texts):
            req = request_bytes(args.api, text)
            sent = time.perf_counter()
            sock.sendall(req)
            read_answer(sock, buf)
            got = time.perf_counter()
            time.sleep(args.pause_ms / 1e3)
            if i < 20:
                continue  # warm-up
            submit = after("submit", sent)
            launch = after("launch", submit)
            worker = after("worker", submit)
            worker_end = after("worker", worker, ends=True)
            tokenize, tokenize_end = after("tokenize", worker), after("tokenize", worker, ends=True)
            ort, ort_end = after("ort", worker), after("ort", worker, ends=True)
            render, render_end = after("render", worker_end), after("render", worker_end, ends=True)
            complete = after("complete", worker_end)
            answered = after("submit", complete, ends=True)
            for stage, ms in (
                ("client send -> batcher submit (HTTP in, parse, pipeline)", submit - sent),
                ("submit -> batch starts on the worker (grant, hand-off)", worker - submit),
                ("  of which submit -> batch launched (loop)", launch - submit),
                ("tokenize (worker)", tokenize_end - tokenize),
                ("ONNX Runtime run (worker)", ort_end - ort),
                (
                    "rest of the batch on the worker",
                    (worker_end - worker) - (tokenize_end - tokenize) - (ort_end - ort),
                ),
                ("worker done -> render starts (hand-back to the loop)", render - worker_end),
                ("  of which worker done -> batch completes (loop wake, futures)", complete - worker_end),
                ("  of which batch completes -> submit returns", answered - complete),
                ("  of which submit returns -> render (pipeline, handler)", render - answered),
                ("render", render_end - render),
                ("render done -> client has the answer (HTTP out)", got - render_end),
                ("total at the client", got - sent),
            ):
                rows[stage].append(ms * 1e3)
        sock.close()
        # The server thread lives on until exit: quiet its complaint that the data folder went.
        logging.getLogger("appliance").setLevel(logging.CRITICAL)
    alone = engine_alone(ROOT / "engines" / MODEL, texts, args.pause_ms / 1e3)
    # The pause a sleeping thread sees between jobs: the worker's is the client's round trip plus
    # the pause, the loop's is the engine's run.
    there, back = thread_wakeups(
        statistics.median(rows["ONNX Runtime run (worker)"]) / 1e3, args.pause_ms / 1e3
    )
    print(f"{args.requests} requests, {args.api}, one at a time, {args.pause_ms:g} ms apart; medians (ms):")
    for stage, values in rows.items():
        print(f"  {stage:58s} {statistics.median(values):7.3f}")
    total = statistics.median(rows["total at the client"])
    print(f"  {'engine alone: tokenize + run, batch 1, same pauses':58s} {alone:7.3f}")
    print(f"  {'added by the server (total - engine alone)':58s} {total - alone:7.3f}")
    print("the same two hand-offs with nothing in them (a one-thread pool busy for the ORT run's median):")
    print(f"  {'loop -> a sleeping worker thread':58s} {there:7.3f}")
    print(f"  {'worker done -> the sleeping loop has the result':58s} {back:7.3f}")


if __name__ == "__main__":
    main()
