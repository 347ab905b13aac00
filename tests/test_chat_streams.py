"""Chat streams as the request pipeline bounds them, through the real server and model: SSE
keep-alive comments while a stream waits for a slot, refusals before and after the stream is
committed, and no stream outliving its deadline or a stalled generation."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.api.common import MANAGER
from tests.conftest import ServerThread, make_repository

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, smollm_folder: Path) -> Iterator[ServerThread]:
    """One running sequence at a time, no preemption (a newcomer waits behind the priority-3
    blocker); queued streams send a keep-alive every 0.2 s."""
    tmp = tmp_path_factory.mktemp("streams")
    overrides = {
        MODEL: {
            "generation": {"max_running_sequences": 1, "preemption": False},
            "queue": {"max_queue_size": 2},
        }
    }
    repo = make_repository(tmp, {MODEL: smollm_folder}, overrides)
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        "admin": {"port": 0, "socket": str(tmp / "data" / "admin.sock")},
        "server": {"sse_keepalive_s": 0.2},
    }
    srv = ServerThread(cfg).start()
    yield srv
    srv.stop()


def running(srv: ServerThread) -> int:
    def snap() -> int:
        runtime = srv.app[MANAGER].slots[MODEL].runtime
        assert runtime is not None
        return int(runtime.generation_snapshot()["running"])

    return int(srv.call(snap))


def wait_for(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def open_stream(
    srv: ServerThread, body: dict[str, Any], headers: dict[str, str] | None = None
) -> socket.socket:
    data = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about the ocean."}],
            "stream": True,
            **body,
        }
    ).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    sock.sendall(
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Cache-Control: no-cache, no-store\r\n{extra}Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, limit_s: float = 60.0, times: int = 1) -> bytes:
    """Raw bytes (chunked framing included) until ``marker`` has arrived ``times`` times."""
    buf = b""
    deadline = time.monotonic() + limit_s
    while buf.count(marker) < times:
        assert time.monotonic() < deadline, buf[-300:]
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def blocker(srv: ServerThread) -> socket.socket:
    """A long generation holding the only slot until the test hangs up on it."""
    sock = open_stream(srv, {"max_tokens": 4000, "ignore_eos": True, "priority": 3})
    wait_for(lambda: running(srv) == 1)
    return sock


def test_a_queued_stream_sends_keep_alive_comments_until_its_first_token(single: ServerThread) -> None:
    hold = blocker(single)
    waiting = open_stream(single, {"max_tokens": 3, "temperature": 0})
    head = read_until(waiting, b": keep-alive\n\n", times=2)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert b"data:" not in head.split(b"\r\n\r\n", 1)[1]  # nothing but comments while queued
    hold.close()  # the slot frees: the queued stream gets its tokens
    rest = read_until(waiting, b"data: [DONE]")
    assert b'"finish_reason":"length"' in rest and b'"error"' not in rest
    waiting.close()


def test_a_refusal_after_the_first_keep_alive_is_an_error_event(single: ServerThread) -> None:
    hold = blocker(single)
    started = time.monotonic()
    # Admitted (its predicted wait fits), kept alive while queued, then its deadline passes.
    waiting = open_stream(single, {"max_tokens": 3}, {"X-Timeout-Ms": "4000"})
    body = read_until(waiting, b"data: [DONE]")
    elapsed = time.monotonic() - started
    assert body.startswith(b"HTTP/1.1 200") and b": keep-alive" in body
    event = next(json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: {"))
    assert event["error"]["message"] and elapsed < 4.0 + 2.0, (event, elapsed)
    waiting.close()
    hold.close()
    wait_for(lambda: running(single) == 0)


def test_a_refusal_before_any_keep_alive_is_a_plain_503(single: ServerThread) -> None:
    hold = blocker(single)
    waiting = open_stream(single, {"max_tokens": 3}, {"X-Timeout-Ms": "100"})
    head = read_until(waiting, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After" in head
    waiting.close()
    hold.close()
    wait_for(lambda: running(single) == 0)


def test_a_stream_whose_client_stops_reading_is_cut_off_and_stops_decoding(
    start_server, smollm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """A client that opens a stream and reads nothing: on loopback or a LAN the socket's send
    queue takes megabytes, so a whole stream fits in it and aiohttp's buffer stays empty. The send
    timeout watched only that buffer, and a probe's stream went on decoding for its whole
    ``max_tokens`` (holding a running slot and its KV cache) past a 10 s ``send_timeout_s``. What
    the client acknowledges is the measure: it stops moving once the client's small receive buffer
    is full, and the connection is aborted, which ends the sequence."""
    srv = start_server({MODEL: smollm_folder}, config={"server": {"send_timeout_s": 1.0}})
    data = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me about the ocean."}],
            "stream": True,
            "max_tokens": 4000,
            "ignore_eos": True,
        }
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", srv.port))
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Cache-Control: no-cache, no-store\r\n" + f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )
        wait_for(lambda: running(srv) == 1)
        # Reading nothing: the stream fills the client's buffer within a few dozen tokens, then
        # one second without an acknowledgement ends it, long before 4,000 tokens.
        wait_for(lambda: running(srv) == 0, timeout=30.0)
        metrics = srv.get("/metrics")[1].decode()
        assert 'appliance_connections_closed_total{reason="send_timeout"} 1.0' in metrics
    finally:
        sock.close()
    assert srv.get("/healthz")[0] == 200
