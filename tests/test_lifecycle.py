"""The process under systemd: readiness and watchdog through NOTIFY_SOCKET, drain on SIGTERM,
configuration reload on SIGHUP, structured logs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.api.common import DRAINING, RESILIENCE, STOP_GRACE_S
from tests.conftest import ROOT, make_repository, self_signed

MODEL = "all-minilm-l6-v2"


class NotifyListener:
    """Plays systemd: a datagram socket that records what the service says, with timestamps."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[float]:
        return [t for t, m in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_ready_watchdog_pings_stop_when_an_engine_hangs_and_stopping(
    start_server,
    minilm_folder: Path,
    faulty: Any,
    tmp_path: Path,
) -> None:  # type: ignore[no-untyped-def]
    listener = NotifyListener(tmp_path / "notify.sock")
    # systemd's timeout is 1 s: the service pings every 0.5 s while healthy.
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000"}
    srv = start_server({MODEL: minilm_folder}, overrides={MODEL: {"engine": {"timeout_ms": 100}}}, env=env)
    time.sleep(2.0)
    assert listener.lines("READY=1"), listener.messages
    pings = listener.lines("WATCHDOG=1")
    assert len(pings) >= 3
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0, "never late for systemd"
    # A hung engine: the batch overruns twice its 100 ms timeout, so the worker is stalled.
    faulty[0].delay_s = 4.0
    hung = threading.Thread(target=lambda: srv.post("/v1/embeddings", {"model": MODEL, "input": "hang"}))
    hung.start()
    time.sleep(1.6)
    recent = [t for t in listener.lines("WATCHDOG=1") if t > time.monotonic() - 1.2]
    assert not recent, "pings must stop while an engine worker is stuck"
    assert any("stalled" in m for _, m in listener.messages if m.startswith("STATUS="))
    hung.join()
    time.sleep(3.5)  # the engine thread itself sleeps out its 4 s, then beats again
    assert [t for t in listener.lines("WATCHDOG=1") if t > time.monotonic() - 1.2], "pings resume"
    srv.stop()
    assert listener.lines("STOPPING=1")
    listener.close()


def test_a_client_that_stops_reading_does_not_hold_the_shutdown_past_the_drain_timeout(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """Found by a slow-read probe: answers a client stopped reading, more than the sockets hold,
    left their connection's handler waiting on the socket's drain when the server stopped, and
    aiohttp's own shutdown then waited for it the drain timeout twice more (for the handler, then
    again after cancelling its request): a stop took 2 x ``server.drain_timeout_s`` (3 x with a
    stream running through the drain), past systemd's TimeoutStopSec (60 s for 30 s), which then
    kills the process. What is still being sent when the drain's time is up is cut."""
    srv = start_server({MODEL: minilm_folder})
    drain = srv.cfg.server.drain_timeout_s
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    try:
        # ~19 KB each, read by nobody: several times what the two sockets' buffers hold.
        s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 400)

        def sending_stalled() -> bool:
            connections = srv.server._runners[0].server.connections  # type: ignore[union-attr]
            return any(getattr(h, "writing_paused", False) for h in connections)

        assert eventually(lambda: srv.call(sending_stalled)), "the server's output never backed up"
        started = time.monotonic()
        srv.stop()
        took = time.monotonic() - started
    finally:
        s.close()
    assert not srv._thread.is_alive()
    assert took < drain + 2.0, f"the stop took {took:.1f} s with server.drain_timeout_s {drain}"


# -- a real process: SIGTERM and SIGHUP ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    tmp: Path, extra: dict[str, Any] | None = None, models: tuple[str, ...] = (MODEL,)
) -> tuple[subprocess.Popen[bytes], int, Path]:
    repo = tmp / "engines"
    if not repo.exists():
        make_repository(tmp, {m: ROOT / "engines" / m for m in models})
    port = free_port()
    cfg = tmp / "appliance.yaml"
    raw = {
        "server": {"port": port, "log_level": "info", "drain_timeout_s": 20},
        "admin": {"port": -1},
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        **(extra or {}),
    }
    cfg.write_text(yaml.safe_dump(raw))
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--config", str(cfg)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, port, cfg
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError((tmp / "server.log").read_text())


def serve_process(
    tmp: Path,
    server: dict[str, Any],
    *,
    extra: dict[str, Any] | None = None,
    argv: Sequence[str] = ("-m", "appliance"),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    """``python <argv> serve`` in a child process on ``tmp``'s repository, with these ``server``
    settings and no admin plane; not waited for. Returns it and the file its output goes to."""
    cfg, out = tmp / "appliance.yaml", tmp / "server.log"
    raw = {
        "server": server,
        "admin": {"port": -1, "socket": ""},
        "model_repository": str(tmp / "engines"),
        "data_dir": str(tmp / "data"),
        **(extra or {}),
    }
    cfg.write_text(yaml.safe_dump(raw))
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv, "serve", "--config", str(cfg)],
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, out


def post(port: int, body: dict[str, Any], timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Cache-Control": "no-store, no-cache"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


CHAT = "smollm2-135m-instruct"


def stream(port: int, i: int, max_tokens: int = 160) -> tuple[int, list[Any]]:
    """A chat stream read to its end: (status, events); events end with "[DONE]" when whole."""
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": f"Count to {i + 20}."}],
        "max_tokens": max_tokens,  # 160: still streaming when SIGTERM arrives, well within the drain timeout
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Cache-Control": "no-store, no-cache"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            events = [
                line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                for line in (raw.decode().strip() for raw in r)
                if line.startswith("data: ")
            ]
            return r.status, events
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read())]


def test_sigterm_drains_every_accepted_request_and_exits_zero(
    tmp_path: Path, minilm_folder: Path, smollm_folder: Path
) -> None:
    proc, port, _ = spawn(tmp_path, models=(MODEL, CHAT))
    texts = [f"request number {i} " + "words " * 40 for i in range(160)]
    with concurrent.futures.ThreadPoolExecutor(80) as pool:
        streams = [pool.submit(stream, port, i) for i in range(6)]
        time.sleep(1.0)  # the streams are running
        futures = [pool.submit(post, port, {"model": MODEL, "input": t}) for t in texts]
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        results = [f.result() for f in futures]  # a connection error would raise here: none may
        streamed = [s.result() for s in streams]
    assert proc.wait(30) == 0
    for status, events in streamed:
        if status == 200:
            # Running streams finish within the drain timeout: whole, no error event, [DONE].
            assert events[-1] == "[DONE]", events[-3:]
            assert not [e for e in events if isinstance(e, dict) and "error" in e], events
            assert any(isinstance(e, dict) and e.get("choices") for e in events)
        else:
            assert status == 503 and events[0]["error"]["message"]
    assert any(status == 200 for status, _ in streamed), "streams in flight were completed"
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 0
    for status, headers, body in results:
        if status == 503:
            assert "Retry-After" in headers and json.loads(body)["error"]["message"]
        else:
            assert len(json.loads(body)["data"][0]["embedding"]) == 384
    lines = [
        json.loads(line)
        for line in (tmp_path / "server.log").read_text().splitlines()
        if line.startswith("{")
    ]
    access = [entry for entry in lines if entry["logger"] == "appliance.access"]
    assert access and {"request_id", "model", "status", "duration_ms"} <= set(access[0])
    assert not any("words words" in line for line in (tmp_path / "server.log").read_text().splitlines()), (
        "request bodies never reach the logs"
    )


def test_a_request_arriving_while_draining_gets_503_with_connection_close(
    start_server, minilm_folder: Path, faulty: Any
) -> None:  # type: ignore[no-untyped-def]
    """While the server drains, a keep-alive client's next request is answered 503 with
    Retry-After and ``Connection: close``, so that it retries on a new connection (another
    replica, or this one restarted) rather than down the draining one, which answered the same
    503 again and again; the request already running is answered whole."""
    srv = start_server({MODEL: minilm_folder})
    no_cache = {"Content-Type": "application/json", "Cache-Control": "no-store, no-cache"}
    keep_alive = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    keep_alive.request("POST", "/v1/embeddings", json.dumps({"model": MODEL, "input": "first"}), no_cache)
    first = keep_alive.getresponse()
    assert first.status == 200 and not first.will_close
    first.read()
    engine = faulty[0]
    engine.delay_s = 1.0
    rows = engine.rows
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, srv.port, {"model": MODEL, "input": "running"})
        while engine.rows == rows:  # the engine has it
            time.sleep(0.01)
        assert srv.server is not None
        drained = asyncio.run_coroutine_threadsafe(srv.server.drain(), srv.loop)
        while not srv.app[DRAINING][0]:
            time.sleep(0.01)
        keep_alive.request("POST", "/v1/embeddings", json.dumps({"model": MODEL, "input": "late"}), no_cache)
        late = keep_alive.getresponse()
        body = json.loads(late.read())
        assert late.status == 503 and late.getheader("Retry-After") and body["error"]["message"]
        assert late.getheader("Connection") == "close" and late.will_close
        assert running.result()[0] == 200
    drained.result(10)
    keep_alive.close()


def test_clients_still_sending_a_body_do_not_hold_the_exit_past_the_drain_timeout(
    start_server, minilm_folder: Path, faulty: Any
) -> None:  # type: ignore[no-untyped-def]
    """A request running for most of server.drain_timeout_s (5 s here) is answered, and clients
    still trickling a body on the data plane and on the admin socket are cut when the bound is
    spent: the stop ends within it (give or take a second). Each plane's connections used to get a bound of their own
    after the drain (the whole drain_timeout_s, the admin plane's 60 s), so the trickling bodies
    held the exit until their read timed out (server.read_timeout_s, 30 s)."""
    srv = start_server({MODEL: minilm_folder})
    assert srv.server is not None and srv.server.admin_socket is not None
    bound = srv.cfg.server.drain_timeout_s
    engine = faulty[0]
    engine.delay_s = 3.0
    rows = engine.rows
    head = "{} {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    data = socket.create_connection(("127.0.0.1", srv.port))
    admin = socket.socket(socket.AF_UNIX)
    admin.connect(str(srv.server.admin_socket))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, srv.port, {"model": MODEL, "input": "running"})
        while engine.rows == rows:  # the engine has it
            time.sleep(0.01)
        data.sendall(head.format("POST", "/v1/embeddings").encode())
        admin.sendall(head.format("PATCH", "/admin/settings").encode())
        started = time.monotonic()
        stopped = asyncio.run_coroutine_threadsafe(srv.server.stop(), srv.loop)
        stopped.result(60)
        took = time.monotonic() - started
        assert running.result()[0] == 200
    # The bound, and a second each plane's cleanup is left at the least for answers being written.
    assert took < bound + 3, f"the stop took {took:.1f} s"
    data.close()
    admin.close()


def test_a_hung_engine_and_a_stuck_cache_writer_do_not_hold_the_stop_past_its_bound(
    start_server, minilm_folder: Path, faulty: Any, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Found by a stop-time probe: with an engine that never returns and the response cache's
    file locked by another process, closing the models and closing the cache each got
    drain_timeout_s + 1 of their own after the drain, and a stop took three times
    server.drain_timeout_s. Every stage draws from one deadline: the drain's end and a fixed grace."""
    srv = start_server({MODEL: minilm_folder})
    bound = srv.cfg.server.drain_timeout_s + STOP_GRACE_S
    engine = faulty[0]
    # A cached answer queued for a writer that finds the file locked (as an admin's sqlite3 shell
    # in a transaction would hold it).
    locker = sqlite3.connect(tmp_path / "data" / "cache.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert srv.post("/v1/embeddings", {"model": MODEL, "input": "cached"})[0] == 200
        engine.mode = "hang"
        rows = engine.rows
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(post, srv.port, {"model": MODEL, "input": "hung"}, 30)
            while engine.rows == rows:  # the engine has it
                time.sleep(0.01)
            started = time.monotonic()
            srv.stop()
            took = time.monotonic() - started
            assert not srv._thread.is_alive()
            engine.release.set()
    finally:
        engine.release.set()
        locker.close()
    assert took < bound + 1.0, f"the stop took {took:.1f} s for a bound of {bound:.0f} s"


def test_a_request_whose_engine_hangs_is_answered_503_when_the_drain_time_is_up(
    start_server, minilm_folder: Path, faulty: Any
) -> None:  # type: ignore[no-untyped-def]
    """Found by a stop-time probe: a request whose batch was in an engine that never returns got
    no answer at all when the drain's time was up; its connection was cut by the stop (curl:
    "Empty reply from server"). It is answered 503 with Retry-After, as every other request
    still running then is, so that its client retries elsewhere."""
    srv = start_server({MODEL: minilm_folder})
    engine = faulty[0]
    engine.mode = "hang"
    rows = engine.rows
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hung = pool.submit(post, srv.port, {"model": MODEL, "input": "hung"}, 30)
            while engine.rows == rows:  # the engine has it
                time.sleep(0.01)
            srv.stop()
            status, headers, body = hung.result()
    finally:
        engine.release.set()
    assert status == 503 and headers.get("Retry-After"), (status, headers)
    assert json.loads(body)["error"]["message"]


def test_a_hung_engine_still_leaves_the_response_cache_time_to_close(
    start_server, minilm_folder: Path, faulty: Any
) -> None:  # type: ignore[no-untyped-def]
    """Within the stop's bound, the response cache is still closed (its queued writes committed,
    its writer thread ended) when a hung engine holds the models' close to the deadline: failing
    the hung request and the models' close had spent all of the grace, and the cache's close,
    waiting behind them, was given up before it began."""
    srv = start_server({MODEL: minilm_folder})
    cache = srv.app[RESILIENCE].cache
    assert cache is not None and cache._writer is not None
    writer = cache._writer
    engine = faulty[0]
    engine.mode = "hang"
    rows = engine.rows
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(post, srv.port, {"model": MODEL, "input": "hung"}, 30)
            while engine.rows == rows:  # the engine has it
                time.sleep(0.01)
            srv.stop()
            assert not srv._thread.is_alive()
    finally:
        engine.release.set()
    assert not writer.is_alive(), "the cache was not closed"


def test_a_second_signal_while_the_cache_closes_cuts_that_stage_too(
    start_server, minilm_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A second signal cuts the stop in whatever stage it is, not only in the drain: one that came
    while the response cache was closing (its file locked by another process, the drain long
    over) was not heard, and the close went on to its own bound, drain_timeout_s + 1."""
    srv = start_server({MODEL: minilm_folder})
    assert srv.server is not None
    cache = srv.app[RESILIENCE].cache
    assert cache is not None
    locker = sqlite3.connect(tmp_path / "data" / "cache.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert srv.post("/v1/embeddings", {"model": MODEL, "input": "cached"})[0] == 200
        stopped = asyncio.run_coroutine_threadsafe(srv.server.stop(), srv.loop)
        assert eventually(lambda: cache._closed), "the cache never started closing"
        srv.call(lambda: srv.server.cut(signal.SIGTERM))  # type: ignore[union-attr]
        cut = time.monotonic()
        stopped.result(30)
        took = time.monotonic() - cut
    finally:
        locker.close()
    assert took < 1.0, f"the stop went on {took:.1f} s after the second signal"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_draining_cuts_the_drain(
    tmp_path: Path, smollm_folder: Path, sig: signal.Signals
) -> None:
    """A second Ctrl-C stops the process at once (found by a new user: it waited for the streams
    to end, up to drain_timeout_s, 20 s here). What still runs ends as at the drain timeout: the
    stream gets an error event and [DONE]. The exit status is 128 + the second signal's number."""
    proc, port, _ = spawn(tmp_path, models=(CHAT,))
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(stream, port, 0, 4000)  # minutes of tokens on this CPU
            time.sleep(1.0)  # the stream is running
            os.kill(proc.pid, sig)
            time.sleep(0.5)  # draining: the stream goes on
            assert proc.poll() is None and not long.done()
            os.kill(proc.pid, sig)
            cut = time.monotonic()
            assert proc.wait(10) == 128 + sig
            assert time.monotonic() - cut < 5
            status, events = long.result()
    finally:
        proc.kill()  # only if it is still running (a failed assertion)
    assert status == 200 and events[-1] == "[DONE]", events[-3:]
    assert "error" in events[-2], events[-3:]
    assert f"{sig.name} while draining: cutting the drain" in (tmp_path / "server.log").read_text()


# `appliance serve` whose engine never returns once the file HANG names exists (a hung driver).
HUNG_SERVE = """
import os, sys, threading
from pathlib import Path
from appliance.models import ModelManager
from tests.conftest import FaultyEngine

hang, opened = Path(os.environ["HANG"]), ModelManager._open_engine

class Hung(FaultyEngine):
    def run(self, feeds, output_names=None):
        if hang.exists():
            threading.Event().wait()
        return super().run(feeds, output_names)

ModelManager._open_engine = staticmethod(lambda entry, values: Hung(opened(entry, values)))
from appliance.cli import main
sys.exit(main(sys.argv[1:]))
"""


def engine_calls(port: int) -> float:
    """Engine calls running (appliance_compute_running), as /metrics says."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("appliance_compute_running")
    )


def test_a_hung_engine_does_not_hold_the_process_exit_after_the_stop(
    tmp_path: Path, minilm_folder: Path
) -> None:
    """Found by a stop-time probe: the stop itself ended within its bound, but the engine's worker
    thread, stuck in a call that never returns, was joined by Python's exit (as every executor's
    thread is), and the process never exited: systemd killed it at TimeoutStopSec. It exits once
    the stop is over, saying which threads it did not wait for."""
    make_repository(tmp_path, {MODEL: minilm_folder})
    port, drain = free_port(), 2
    hang = tmp_path / "hang"
    proc, _ = serve_process(
        tmp_path,
        {"port": port, "log_level": "info", "drain_timeout_s": drain},
        argv=("-c", HUNG_SERVE),
        env={"HANG": str(hang), "PYTHONPATH": str(ROOT)},
    )
    try:
        assert eventually(lambda: serves(port), 60), (tmp_path / "server.log").read_text()
        hang.touch()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hung = pool.submit(post, port, {"model": MODEL, "input": "hung"}, 30)
            assert eventually(lambda: engine_calls(port) == 1), "the engine never got it"
            stopped = time.monotonic()
            proc.terminate()
            assert proc.wait(drain + STOP_GRACE_S + 5) == 0
            took = time.monotonic() - stopped
            with contextlib.suppress(OSError):
                hung.result()
    finally:
        proc.kill()  # only if it is still running (a failed assertion)
    assert took < drain + STOP_GRACE_S + 2.5, f"the process exited {took:.1f} s after SIGTERM"
    assert "not waiting for them" in (tmp_path / "server.log").read_text()


def test_the_start_up_banner_names_https_when_tls_is_on(tmp_path: Path, minilm_folder: Path) -> None:
    """``appliance serve`` printed ``serving on http://...`` with TLS on: the URL a user pasted
    was answered with a reset by the port, which speaks only TLS."""
    make_repository(tmp_path, {MODEL: minilm_folder})
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key)
    port = free_port()
    tls = {"tls": {"certificate": str(cert), "key": str(key)}}
    proc, out = serve_process(tmp_path, {"port": port, "log_level": "info"}, extra=tls)
    try:
        assert eventually(lambda: "appliance: serving on" in out.read_text(), 60), out.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    banner = next(line for line in out.read_text().splitlines() if line.startswith("appliance: serving on"))
    assert banner == f"appliance: serving on https://127.0.0.1:{port}", banner


def test_the_url_the_server_announces_writes_an_ipv6_host_in_brackets(
    start_server, minilm_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """The banner and the log line said ``http://::1:8000`` for server.host ``::1``: no client
    parses that; ``http://[::1]:8000`` is the URL."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    caplog.set_level("INFO", logger="appliance.server")
    try:
        srv = start_server({MODEL: minilm_folder}, config={"server": {"host": "::1"}}, wait_ready=False)
    except OSError as exc:  # no ::1 on this host
        pytest.skip(str(exc))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving on")]
    assert said and said[0].startswith(f"serving on http://[::1]:{srv.port};"), said


def sighup_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (its default action is to end the process)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & 1 << (signal.SIGHUP - 1))


def serves(port: int) -> bool:
    try:
        return post(port, {"model": MODEL, "input": "x"})[0] == 200
    except OSError:  # not listening yet
        return False


def test_a_sighup_during_start_up_is_applied_once_started_and_never_fatal(
    tmp_path: Path, minilm_folder: Path
) -> None:
    """Found by a new user: a SIGHUP in serve's first second (imports, model scan, bind) ended the
    process (exit 129), its handler being installed only once the server had started. It is held
    off from the start of `serve`, before the server listens, and the reload runs once started."""
    make_repository(tmp_path, {MODEL: minilm_folder})
    port = free_port()
    proc, log = serve_process(tmp_path, {"port": port})
    try:
        assert eventually(lambda: proc.poll() is not None or sighup_caught(proc.pid), timeout=60)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "still starting: not listening yet"
        os.kill(proc.pid, signal.SIGHUP)
        assert eventually(lambda: proc.poll() is not None or serves(port), timeout=60)
        assert proc.poll() is None, log.read_text()[-2000:]
        text = log.read_text()
        assert "SIGHUP during start-up: reloading the configuration now" in text
        assert "configuration reloaded" in text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_a_stdout_closed_under_a_starting_server_neither_stops_it_nor_its_exit_status(
    tmp_path: Path, minilm_folder: Path
) -> None:
    """``appliance serve | head -c 100``: head exits and every write to stdout fails. The log
    lines were dropped and counted, as designed, but the "serving on" banner printed once started
    raised BrokenPipeError out of serve(): the process exited 2 right after it had started, its
    model loads destroyed pending. The banner is best effort too: the server serves, and a
    SIGTERM drains it to exit 0."""
    make_repository(tmp_path, {MODEL: minilm_folder})
    port = free_port()
    cfg = tmp_path / "appliance.yaml"
    raw = {
        "server": {"port": port, "log_level": "info"},
        "admin": {"port": -1, "socket": ""},
        "model_repository": str(tmp_path / "engines"),
        "data_dir": str(tmp_path / "data"),
    }
    cfg.write_text(yaml.safe_dump(raw))
    with (tmp_path / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--config", str(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the first line: every write is EPIPE
    try:
        assert eventually(lambda: proc.poll() is not None or serves(port), timeout=60)
        assert proc.poll() is None, (tmp_path / "stderr.log").read_text()[-2000:]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "stderr.log").read_text()[-2000:]


def eventually(check: Any, timeout: float = 10.0) -> bool:
    """Signals are handled asynchronously: poll instead of guessing a sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_sighup_reloads_a_valid_file_and_keeps_the_old_one_otherwise(
    tmp_path: Path, minilm_folder: Path
) -> None:
    proc, port, cfg = spawn(tmp_path)
    try:
        raw = yaml.safe_load(cfg.read_text())
        raw["models"] = {MODEL: {"queue": {"priority_levels": 5}}}
        cfg.write_text(yaml.safe_dump(raw))
        os.kill(proc.pid, signal.SIGHUP)
        assert eventually(lambda: post(port, {"model": MODEL, "input": "x", "priority": 5})[0] == 200), (
            "5 levels now"
        )
        cfg.write_text("server: {port: not-a-port}\n")
        os.kill(proc.pid, signal.SIGHUP)
        assert eventually(lambda: "reload refused" in (tmp_path / "server.log").read_text())
        assert post(port, {"model": MODEL, "input": "y", "priority": 5})[0] == 200, "old config kept"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_reaches_abstract_and_path_sockets(tmp_path: Path, abstract: bool) -> None:
    from appliance.sdnotify import Notifier

    name = f"\0appliance-test-{os.getpid()}" if abstract else str(tmp_path / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(name)
    sock.settimeout(2)
    addr = "@" + name[1:] if abstract else name
    assert Notifier({"NOTIFY_SOCKET": addr}).ready("up")
    assert sock.recv(100).decode().splitlines()[0] == "READY=1"
    sock.close()


def serve_until_it_exits(tmp: Path, port: int, **extra: Any) -> tuple[int, str, str]:
    """``appliance serve`` on a repository made in ``tmp``, expected to refuse to start: its exit
    status, stderr, and stdout + stderr."""
    cfg = tmp / "appliance.yaml"
    raw = {
        "server": {"port": port, "log_level": "info"},
        "admin": {"port": -1},
        "model_repository": str(tmp / "engines"),
        "data_dir": str(tmp / "data"),
        **extra,
    }
    cfg.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    return done.returncode, done.stderr.decode(), done.stdout.decode() + done.stderr.decode()


def test_a_port_in_use_is_one_clear_error_and_exit_status_2(tmp_path: Path, minilm_folder: Path) -> None:
    """What start had set going (the default model's load) is stopped before the error is
    reported: no "Task was destroyed but it is pending!" lines after it."""
    make_repository(tmp_path, {MODEL: minilm_folder})
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with taken:
        status, _, out = serve_until_it_exits(tmp_path, port)
    assert status == 2, out
    assert f"('127.0.0.1', {port}): address already in use" in out
    assert '"level":"error"' not in out and "Traceback" not in out, out


@pytest.mark.parametrize(
    ("port", "expected"),
    [("99999", "less than or equal to 65535, got 99999"), ("-5", "greater than or equal to 0, got -5")],
)
def test_a_serve_port_out_of_range_is_one_line_naming_the_option_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], port: str, expected: str
) -> None:
    """Found by a new user: `serve --port 99999` printed a pydantic traceback and exited 1."""
    from appliance.cli import main

    cfg = tmp_path / "appliance.yaml"
    cfg.write_text(yaml.safe_dump({"admin": {"port": -1}, "data_dir": str(tmp_path / "data")}))
    assert main(["--config", str(cfg), "serve", f"--port={port}"]) == 2
    assert capsys.readouterr().err == f"appliance: --port: input should be {expected}\n"


def test_serve_refuses_to_start_with_model_settings_that_do_not_combine(
    tmp_path: Path, minilm_folder: Path
) -> None:
    """Found probing live retuning: serve started with them, /readyz said 503 for ever and the
    model's requests were 503 "failed to load (BatchPolicy.default_priority must be ...)", a field
    no operator can set. Like a reload and check-config, serve refuses them, naming the model and
    the setting, with check-config's exit status and before any port is taken."""
    make_repository(tmp_path, {MODEL: minilm_folder})
    models = {MODEL: {"queue": {"priority_levels": 2, "default_priority": 3}}}
    status, err, out = serve_until_it_exits(tmp_path, free_port(), models=models)
    assert status == 2, out
    why = f"model {MODEL}: queue.default_priority must be an integer from 1 to priority_levels (2), got 3"
    assert err == f"appliance: {tmp_path / 'appliance.yaml'}: {why}\n", out
    assert "serving on" not in out and "Traceback" not in out


def test_a_load_failed_by_settings_names_the_setting_not_the_class_field() -> None:
    """A model.yaml edited under a running server is read at the model's next load, after the
    start's check: its failure names the setting."""
    from appliance import settings
    from appliance.models import batch_policy

    values = {**settings.defaults(), "queue.priority_levels": 2, "queue.default_priority": 3}
    with pytest.raises(settings.SettingError) as caught:
        batch_policy(values)
    assert str(caught.value).startswith("queue.default_priority: queue.default_priority must be")
    assert "BatchPolicy" not in str(caught.value)


def test_a_reload_whose_settings_do_not_combine_changes_nothing(
    tmp_path: Path, minilm_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a live-retuning probe. Each value was checked on its own, but not how a model's
    values combine (a default priority past its priority levels): the reload swapped the settings
    in and, with the model resident, failed part-way through the models with a traceback, leaving
    its batcher on the old values, the models after it unconfigured, GET /admin/settings
    reporting the bad values and every later PATCH refused until the file was fixed (not
    resident, the reload was taken as it was). It is refused before anything is swapped, naming
    the model and the settings, as PATCH and check-config refuse it."""
    from appliance.api.common import MANAGER
    from appliance.config import load
    from appliance.server import Server

    make_repository(tmp_path, {MODEL: minilm_folder})
    cfg = tmp_path / "appliance.yaml"
    raw: dict[str, Any] = {
        "model_repository": str(tmp_path / "engines"),
        "data_dir": str(tmp_path / "data"),
        "models": {MODEL: {"queue": {"priority_levels": 4}}},
    }
    cfg.write_text(yaml.safe_dump(raw))
    server = Server(load(cfg))
    server.app[MANAGER].rescan()  # what start does
    before = (dict(server.cfg.defaults), dict(server.cfg.model_overrides))
    raw["defaults"] = {"breaker": {"window_s": 20}}
    raw["models"] = {MODEL: {"queue": {"priority_levels": 2, "default_priority": 3}}}
    cfg.write_text(yaml.safe_dump(raw))
    assert server.reload() is False
    assert (server.cfg.defaults, server.cfg.model_overrides) == before
    assert server.app[MANAGER].tunables(MODEL)["queue.priority_levels"] == 4
    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(refusals) == 1 and "reload refused, keeping the running configuration" in refusals[0]
    why = f"appliance.yaml: model {MODEL}: queue.default_priority must be an integer from 1 to priority_levels (2)"
    assert why in refusals[0]
    assert not any(r.exc_info for r in caplog.records)


def test_a_reload_names_the_server_wide_settings_that_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cache.synchronous (the cache file is opened with it) changed by a reload was taken
    silently and never applied; it is named as the listening sockets are."""
    from appliance.config import load
    from appliance.server import Server

    cfg = tmp_path / "appliance.yaml"
    raw: dict[str, Any] = {"model_repository": str(tmp_path / "engines"), "data_dir": str(tmp_path / "data")}
    (tmp_path / "engines").mkdir()
    cfg.write_text(yaml.safe_dump(raw))
    server = Server(load(cfg))
    raw["defaults"] = {"cache": {"synchronous": "FULL", "ttl_s": 60}}
    cfg.write_text(yaml.safe_dump(raw))
    assert server.reload() is True
    messages = [r.getMessage() for r in caplog.records]
    assert "reload: defaults.cache.synchronous change only on restart" in messages, messages
