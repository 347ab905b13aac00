"""Breaker and response cache in front of a real engine, through the real server over loopback.

Engine failures cannot be produced on demand from a healthy ONNX model, so these tests use the
test-only fault hook ``faulty`` (conftest.FaultyEngine) that makes the real engine raise, hang or
run out of memory when told to. Everything else is real: the model, the batcher, SQLite, HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance.cache import cache_key
from appliance.repository import load_model_file
from tests.conftest import ROOT, ServerThread, make_repository, metric

MODEL = "all-minilm-l6-v2"


BREAKER = {"min_requests": 4, "failure_rate_threshold": 0.5, "open_duration_s": 0.5, "half_open_probes": 2}


def start(
    start_server: Any, folder: Path, breaker: dict[str, Any] | None = None, **extra: Any
) -> ServerThread:
    overrides = {MODEL: {"breaker": {**BREAKER, **(breaker or {})}, **extra}}
    return start_server({MODEL: folder}, overrides=overrides)


def embed(
    srv: ServerThread, text: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    return srv.post("/v1/embeddings", {"model": MODEL, "input": text}, headers)


def flush(srv: ServerThread) -> None:
    """Cache writes are asynchronous (one writer thread); wait for them to land."""
    from appliance.api.common import RESILIENCE

    srv.call(lambda: srv.app[RESILIENCE].cache.flush())


def breaker_state(srv: ServerThread) -> dict[str, Any]:
    from appliance.api.common import RESILIENCE

    return srv.call(lambda: srv.app[RESILIENCE].breakers[MODEL].snapshot())  # type: ignore[no-any-return]


def test_trips_at_the_threshold_then_answers_503_with_retry_after(
    start_server, minilm_folder, faulty
) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder)
    engine = faulty[0]
    engine.mode = "raise"
    for i in range(4):
        status, body, headers = embed(srv, f"failing request {i}")
        assert status == 503 and "failed" in body["error"]["message"]
    rows = engine.rows
    status, body, headers = embed(srv, "after the trip")
    assert status == 503 and "circuit breaker is open" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 1
    assert engine.rows == rows, "an open breaker must not call the engine"
    assert breaker_state(srv)["state"] == "open"
    _, metrics = srv.get("/metrics")
    assert 'appliance_breaker_state{model="all-minilm-l6-v2"} 1.0' in metrics.decode()
    assert 'appliance_fallbacks_total{kind="unavailable",model="all-minilm-l6-v2"}' in metrics.decode()


def test_below_min_requests_the_breaker_stays_closed(start_server, minilm_folder, faulty) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder)
    faulty[0].mode = "raise"
    for i in range(3):
        embed(srv, f"one of three {i}")
    faulty[0].mode = None
    assert breaker_state(srv)["state"] == "closed"
    assert embed(srv, "healthy again")[0] == 200


def test_open_breaker_serves_cache_then_stale_then_default(
    start_server, minilm_folder, faulty, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder, default_response=[0.0] * 384, breaker={"open_duration_s": 30})
    status, fresh, headers = embed(srv, "remember me")
    assert status == 200 and headers["X-Appliance-Source"] == "engine"
    flush(srv)
    # An identical request is answered from the cache without touching the engine.
    rows = faulty[0].rows
    status, again, headers = embed(srv, "remember me")
    assert headers["X-Appliance-Source"] == "cache" and again == fresh and faulty[0].rows == rows
    faulty[0].mode = "raise"
    for i in range(4):
        embed(srv, f"trip {i}", {"Cache-Control": "no-store"})
    assert breaker_state(srv)["state"] == "open"
    status, cached, headers = embed(srv, "remember me")
    assert (status, headers["X-Appliance-Source"], cached) == (200, "cache", fresh)
    # Age the entry past its TTL: it is stale now, still a fallback while the engine is down.
    from appliance.api.common import RESILIENCE

    srv.call(lambda: setattr(srv.app[RESILIENCE].cache, "ttl_s", 1e-3))
    status, stale, headers = embed(srv, "remember me")
    assert (status, headers["X-Appliance-Source"], stale) == (200, "stale-cache", fresh)
    # Never seen before: the model's configured default answers.
    status, default, headers = embed(srv, "never seen")
    assert status == 200 and headers["X-Appliance-Source"] == "default"
    assert default["data"][0]["embedding"] == [0.0] * 384


def test_half_open_admits_exactly_the_probes_under_a_burst_then_recovers(
    start_server, minilm_folder, faulty
) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder)
    engine = faulty[0]
    engine.mode = "raise"
    for i in range(4):
        embed(srv, f"trip {i}")
    assert breaker_state(srv)["state"] == "open"
    engine.mode = None
    engine.delay_s = 1.0  # probes stay in flight while the whole burst arrives, even on a slow machine
    time.sleep(0.6)
    rows = engine.rows
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda i: embed(srv, f"burst {i}")[0], range(30)))
    assert results.count(200) == 2, results
    assert results.count(503) == 28
    assert engine.rows - rows == 2
    assert breaker_state(srv)["state"] == "closed"
    engine.delay_s = 0
    assert embed(srv, "after recovery")[0] == 200


def test_an_engine_whose_fault_outlasts_the_probes_is_replaced_and_serves_again(
    start_server, minilm_folder, faulty
) -> None:  # type: ignore[no-untyped-def]
    """A fault stuck in one engine instance (a CUDA error that poisons its context, a corrupted
    session) fails every probe, and the breaker alone would wait ever longer. After
    ``breaker.restart_engine_after`` failed probes in a row the engine is replaced: its next
    request (the next probe) loads a fresh one, and the model serves again without a process
    restart."""
    srv = start(start_server, minilm_folder, {"restart_engine_after": 2})
    sick = faulty[0]
    sick.mode = "raise"  # stays with this instance; a freshly opened engine is healthy
    for i in range(4):
        embed(srv, f"trip {i}")
    assert breaker_state(srv)["state"] == "open"
    deadline = time.monotonic() + 60
    i = 0
    while embed(srv, f"probe {i}")[0] != 200:
        assert time.monotonic() < deadline, f"no recovery: {breaker_state(srv)}, {len(faulty)} engines"
        i += 1
        time.sleep(0.1)
    assert len(faulty) == 2 and faulty[1] is not sick  # replaced once, and the fresh one served
    assert sick.mode == "raise"
    assert metric(srv, 'appliance_engine_restarts_total{model="all-minilm-l6-v2"}') == 1.0
    assert embed(srv, "the second probe")[0] == 200  # two probes (BREAKER) close it
    assert breaker_state(srv)["state"] == "closed"


def test_an_engine_with_a_call_still_running_is_not_replaced_under_it(
    start_server, minilm_folder, faulty, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A probe that never came back leaves its call running on the worker (a hung engine).
    Replacing the engine then would wait on that call and put a fresh engine beside the hung one,
    so the replacement declines: a hang is the watchdog's case (its pings stop)."""
    from appliance.api.common import MANAGER

    srv = start(start_server, minilm_folder)
    faulty[0].delay_s = 3.0
    hung = threading.Thread(target=embed, args=(srv, "hangs"))
    hung.start()
    mgr = srv.app[MANAGER]
    deadline = time.monotonic() + 10
    while not mgr.slots[MODEL].runtime.batcher.snapshot()["running_batches"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    runtime = mgr.slots[MODEL].runtime
    asyncio.run_coroutine_threadsafe(mgr.restart(MODEL), srv.loop).result(10)
    assert mgr.slots[MODEL].runtime is runtime and len(faulty) == 1
    assert "an engine call is still running" in caplog.text
    hung.join(10)


def test_an_engine_hung_past_its_timeout_is_not_replaced_under_its_call(
    start_server, minilm_folder, faulty, caplog
) -> None:  # type: ignore[no-untyped-def]
    """A hung call that ran past ``engine.timeout_ms`` has been answered (503) and left the
    batcher, but its thread is still in the engine. The failed probes that follow must not
    replace the engine: before, the replacement's unload waited on that thread, and every request
    meanwhile waited ~2 s for a 503 "being unloaded" for as long as the engine hung (the model
    stuck unloading, not even probed); a fresh engine would have opened beside the hung one."""
    srv = start(start_server, minilm_folder, {"restart_engine_after": 2}, engine={"timeout_ms": 300})
    engine = faulty[0]
    engine.mode = "hang"
    try:
        deadline = time.monotonic() + 30
        i = 0
        while "an engine call is still running" not in caplog.text:
            assert time.monotonic() < deadline, f"no replacement asked for: {breaker_state(srv)}"
            status, body, headers = embed(srv, f"hung {i}")
            assert status == 503 and headers["Retry-After"], body
            assert "unloaded" not in body["error"]["message"], body
            i += 1
        status, body, _ = embed(srv, "still probed, not unloading")
        assert status == 503 and "unloaded" not in body["error"]["message"], body
        assert metric(srv, 'appliance_engine_restarts_total{model="all-minilm-l6-v2"}') == 0.0
    finally:
        engine.release.set()
    engine.mode = None
    deadline = time.monotonic() + 30
    while embed(srv, f"after the hang {i}")[0] != 200:  # the next probes find the engine healthy
        assert time.monotonic() < deadline, breaker_state(srv)
        i += 1
        time.sleep(0.1)
    assert len(faulty) == 1, "a fresh engine was opened beside the hung one"


def test_with_restarts_off_a_stuck_engine_is_only_probed(start_server, minilm_folder, faulty) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder, {"restart_engine_after": 0, "open_duration_s": 0.1})
    faulty[0].mode = "raise"
    deadline = time.monotonic() + 3
    i = 0
    while time.monotonic() < deadline:
        assert embed(srv, f"x {i}")[0] == 503
        i += 1
        time.sleep(0.05)
    assert len(faulty) == 1
    assert metric(srv, 'appliance_engine_restarts_total{model="all-minilm-l6-v2"}') == 0.0


def test_client_disconnects_are_not_failures(start_server, minilm_folder, faulty) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder)
    faulty[0].delay_s = 0.3
    for i in range(8):
        req = urllib.request.Request(
            srv.url + "/v1/embeddings",
            data=json.dumps({"model": MODEL, "input": f"impatient {i}"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(OSError):
            urllib.request.urlopen(req, timeout=0.05)
    time.sleep(0.5)
    snap = breaker_state(srv)
    assert snap["state"] == "closed" and snap["failures_in_window"] == 0


def test_hung_and_out_of_memory_engines_count_as_failures(start_server, minilm_folder, faulty) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder, engine={"timeout_ms": 150})
    faulty[0].delay_s = 2.0
    started = time.monotonic()
    status, body, _ = embed(srv, "hangs")
    assert status == 503 and "timeout" in body["error"]["message"]
    assert time.monotonic() - started < 1.5, "answered at the engine timeout, not when the engine ends"
    time.sleep(2.2)  # the hung batch sleeps out its 2 s on the worker
    faulty[0].delay_s = 0
    faulty[0].mode = "oom"
    status, body, _ = embed(srv, "too big")
    assert status == 503 and "oom" in body["error"]["message"]
    snap = breaker_state(srv)
    assert snap["totals"]["timeout"] == 1 and snap["totals"]["oom"] == 1
    assert snap["failures_in_window"] == 2


def test_cache_control_opts_out(start_server, minilm_folder, faulty) -> None:  # type: ignore[no-untyped-def]
    srv = start(start_server, minilm_folder)
    embed(srv, "opt out")
    flush(srv)
    rows = faulty[0].rows
    assert embed(srv, "opt out", {"Cache-Control": "no-cache"})[2]["X-Appliance-Source"] == "engine"
    assert faulty[0].rows == rows + 1
    embed(srv, "never stored", {"Cache-Control": "no-store"})
    flush(srv)
    assert embed(srv, "never stored")[2]["X-Appliance-Source"] == "engine"


# -- durability: a real server process killed with SIGKILL ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    tmp: Path, synchronous: str = "FULL", fsize: int | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    repo = tmp / "engines"
    if not repo.exists():
        make_repository(tmp, {MODEL: ROOT / "engines" / MODEL})
    port = free_port()
    cfg = tmp / "appliance.yaml"
    cfg.write_text(
        json.dumps(
            {
                "server": {"port": port, "log_level": "warning"},
                "admin": {"port": -1},
                "model_repository": str(repo),
                "data_dir": str(tmp / "data"),
                "defaults": {"cache": {"synchronous": synchronous}},
            }
        )
    )

    def limit() -> None:
        if fsize is not None:
            # A full disk, simulated: writes past this size fail with EFBIG instead of a signal.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "--config", str(cfg), "serve"],
        cwd=ROOT,
        stdout=subprocess.PIPE,  # JSON logs (level warning: only what matters)
        stderr=subprocess.STDOUT,
        preexec_fn=limit,
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stdout.read().decode() if proc.stdout else "server did not start")


def post(port: int, text: str) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps({"model": MODEL, "input": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_sigkill_during_cache_writes_loses_no_acknowledged_entry(tmp_path: Path, minilm_folder: Path) -> None:
    proc, port = spawn(tmp_path, "FULL")
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            text = f"durable entry {i}"
            try:
                status, _ = post(port, text)
            except OSError:
                return
            if status == 200:
                acknowledged.append(text)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(2.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    t.join()
    assert len(acknowledged) > 5
    db = sqlite3.connect(tmp_path / "data" / "cache.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in db.execute("SELECT key FROM entries")}
    identity = f"{MODEL}@{load_model_file(tmp_path / 'engines' / MODEL / 'model.yaml').digest()}"
    for text in acknowledged:
        canonical = {
            "api": "openai.embeddings",
            "input": [text],
            "encoding_format": "float",
            "truncate": None,
        }
        key = cache_key(identity, canonical)
        assert key in stored, f"acknowledged entry {text!r} lost"
    # And the restarted server answers them from the cache.
    proc, port = spawn(tmp_path, "FULL")
    try:
        assert post(port, acknowledged[-1])[1]["X-Appliance-Source"] == "cache"
    finally:
        proc.terminate()
        proc.wait(30)


def test_corrupt_cache_file_is_moved_aside_and_serving_continues(tmp_path: Path, minilm_folder: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cache.db").write_bytes(b"this is not a database" * 500)
    proc, port = spawn(tmp_path, "NORMAL")
    try:
        assert post(port, "still serving")[0] == 200
        # The fresh cache works: the entry lands (asynchronously) and then answers.
        sources = []
        for _ in range(20):
            sources.append(post(port, "still serving")[1]["X-Appliance-Source"])
            if sources[-1] == "cache":
                break
            time.sleep(0.1)
        assert sources[-1] == "cache", sources
        assert list((tmp_path / "data").glob("cache.db.corrupt-*"))
    finally:
        proc.terminate()
        proc.wait(30)


def test_full_disk_turns_the_cache_off_and_serving_continues(tmp_path: Path, minilm_folder: Path) -> None:
    proc, port = spawn(tmp_path, "NORMAL", fsize=256 * 1024)
    try:
        statuses = [post(port, f"filling the disk {i} " + "x" * 200)[0] for i in range(120)]
        assert statuses == [200] * 120
        assert post(port, "filling the disk 0 " + "x" * 200)[0] == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "cache" in out.lower() and ("disabled" in out.lower() or "off" in out.lower()), out[-2000:]
