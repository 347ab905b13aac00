"""LAN security: API keys, per-key rate limits and priority caps, the admin plane kept apart,
connection and body-read limits. All through the real server over loopback."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from appliance.auth import KeyStore
from tests.conftest import ROOT, ServerThread, self_signed

MODEL = "all-minilm-l6-v2"


@pytest.fixture
def keyed(start_server, minilm_folder: Path) -> tuple[ServerThread, dict[str, str]]:  # type: ignore[no-untyped-def]
    store = KeyStore()
    plain = {}
    plain["app"], _ = store.add("app")
    plain["slow"], _ = store.add("slow", rate=1.0)
    plain["low"], _ = store.add("low", max_priority=3)
    plain["gone"], _ = store.add("gone")
    store.revoke("gone")
    srv = start_server({MODEL: minilm_folder}, config={"auth": {"keys": store.to_records()}})
    return srv, plain


def call(
    srv: ServerThread, key: str | None, body: dict[str, Any] | None = None, header: str = "bearer"
) -> tuple[int, Any, dict[str, str]]:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
    return srv.post("/v1/embeddings", body or {"model": MODEL, "input": "hello"}, headers)


def test_keys_are_required_once_configured(keyed: tuple[ServerThread, dict[str, str]]) -> None:
    srv, keys = keyed
    status, body, _ = call(srv, None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(srv, "apl_wrongwrongwrong")[0] == 401
    assert call(srv, keys["gone"])[0] == 401, "a revoked key is refused"
    assert call(srv, keys["app"])[0] == 200
    assert call(srv, keys["app"], header="x-api-key")[0] == 200
    # KServe errors keep Triton's shape.
    status, body, _ = srv.post(f"/v2/models/{MODEL}/infer", {"inputs": []})
    assert status == 401 and isinstance(body["error"], str)


def test_made_up_secrets_for_a_known_key_id_get_429_without_costing_a_kdf_each(
    keyed: tuple[ServerThread, dict[str, str]],
) -> None:
    """Whoever has seen a key knows its id; a flood of made-up secrets with it is answered 429
    with Retry-After once the id's budget of KDF runs is spent, while the key's real holder
    (verified before) is served throughout."""
    srv, keys = keyed
    assert call(srv, keys["app"])[0] == 200
    prefix = keys["app"][:12]  # "apl_" and the 8-character id
    statuses = []
    started = time.monotonic()
    for i in range(20):
        status, body, headers = call(srv, prefix + f"{i:043d}")
        statuses.append(status)
        if status == 429:
            assert body["error"]["code"] == "key_checks_throttled" and int(headers["Retry-After"]) >= 1
    elapsed = time.monotonic() - started
    # A burst of 10 KDF runs per id (the real key's first use took one), then 1 a second.
    assert statuses[:9] == [401] * 9 and set(statuses) == {401, 429}
    assert statuses.count(401) <= 9 + elapsed + 1
    assert call(srv, keys["app"])[0] == 200


def test_a_key_whose_bytes_are_not_ascii_is_401_not_500(keyed: tuple[ServerThread, dict[str, str]]) -> None:
    """Found by fuzzing: a presented key with non-UTF-8 bytes (aiohttp decodes them to lone
    surrogates) raised while being hashed, a 500 to a client without any key."""
    srv, _ = keyed
    for header in (
        b"Authorization: Bearer \xff\xfe",
        b"X-API-Key: \xc3(abc",
        b"Authorization: Bearer caf\xe9",
    ):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + header
                + b"\r\nContent-Length: 2\r\n\r\n{}"
            )
            head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 401"), head


def test_official_client_sends_its_key(keyed: tuple[ServerThread, dict[str, str]]) -> None:
    srv, keys = keyed
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=keys["app"], max_retries=0)
    assert len(client.embeddings.create(model=MODEL, input="x").data[0].embedding) == 384
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=MODEL, input="x")


def _complete(reply: bytes) -> bool:
    """Whether ``reply`` holds a whole answer: its head and Content-Length bytes of body."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return bool(sep) and bool(lengths) and len(body) >= int(lengths[0].split(b":")[1])


def test_a_client_without_a_key_that_asks_first_is_refused_not_asked_for_its_body(
    keyed: tuple[ServerThread, dict[str, str]],
) -> None:
    """Found by fuzzing: with keys required, a client that sent no key and asked first (Expect:
    100-continue) was told "100 Continue", so it sent its body (up to server.max_body_bytes),
    only to get the 401 the headers had already decided. It gets the 401 at once now, in each
    API's shape; a client with its key is still asked for the body, and served."""
    srv, keys = keyed
    body = json.dumps({"model": MODEL, "input": "asked first"}).encode()

    def ask(path: str, key: str | None) -> bytes:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Expect: 100-continue\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            reply = sock.recv(65536)
            if reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
                sock.sendall(body)
            # Up to the answer's end (a refused connection may stay open a while for its body).
            while not _complete(reply.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")):
                reply += sock.recv(65536)
        return reply

    for path, shape in (("/v1/embeddings", dict), (f"/v2/models/{MODEL}/infer", str)):
        reply = ask(path, None)
        assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
        assert isinstance(json.loads(reply.partition(b"\r\n\r\n")[2])["error"], shape)
    reply = ask("/v1/embeddings", keys["app"])
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), reply[:200]


def test_health_and_metrics_stay_open(keyed: tuple[ServerThread, dict[str, str]]) -> None:
    srv, _ = keyed
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
        assert srv.get(path)[0] == 200, path


def test_per_key_rate_limit_answers_429_with_retry_after(keyed: tuple[ServerThread, dict[str, str]]) -> None:
    srv, keys = keyed
    statuses = [call(srv, keys["slow"], {"model": MODEL, "input": f"r{i}"}) for i in range(4)]
    limited = [s for s in statuses if s[0] == 429]
    assert limited, [s[0] for s in statuses]
    assert limited[0][1]["error"]["code"] == "rate_limited"
    assert int(limited[0][2]["Retry-After"]) >= 1
    assert call(srv, keys["app"])[0] == 200, "another key is not limited"


def test_priority_cap_lowers_a_claimed_top_level(keyed: tuple[ServerThread, dict[str, str]]) -> None:
    srv, keys = keyed
    status, _, _ = call(srv, keys["low"], {"model": MODEL, "input": "urgent!", "priority": 1})
    assert status == 200
    _, metrics = srv.get("/metrics")
    # The request was queued at level 3 (the cap), never at level 1.
    text = metrics.decode()
    assert 'appliance_queue_depth{model="all-minilm-l6-v2",priority="3"}' in text
    assert 'priority="1"' not in text


def test_admin_plane_is_not_on_the_data_plane_and_needs_its_token(
    keyed: tuple[ServerThread, dict[str, str]],
) -> None:
    srv, keys = keyed
    status, _, _ = srv.request("GET", "/admin/stats", headers={"Authorization": f"Bearer {keys['app']}"})
    assert status == 404
    req = urllib.request.Request(srv.admin_url + "/admin/stats")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    assert srv.server is not None
    req = urllib.request.Request(
        srv.admin_url + "/admin/stats", headers={"Authorization": f"Bearer {srv.server.admin_token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["models"][MODEL]["state"] == "resident"


def test_at_the_connection_cap_a_newcomer_replaces_the_connection_idle_longest(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """A client holding idle sockets cannot lock others out: at the cap the one idle longest is
    closed (as nginx reuses idle keep-alive connections) and the newcomer is served."""
    srv = start_server({MODEL: minilm_folder}, config={"server": {"max_connections": 2}})
    oldest = socket.create_connection(("127.0.0.1", srv.port))
    time.sleep(0.05)
    younger = socket.create_connection(("127.0.0.1", srv.port))
    try:
        time.sleep(0.1)
        newcomer = socket.create_connection(("127.0.0.1", srv.port))
        newcomer.settimeout(5)
        newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert newcomer.recv(200).startswith(b"HTTP/1.1 200")
        oldest.settimeout(5)
        assert oldest.recv(200) == b""  # closed, without a reply
        younger.settimeout(5)
        younger.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert younger.recv(200).startswith(b"HTTP/1.1 200")
        newcomer.close()
    finally:
        oldest.close()
        younger.close()
    time.sleep(0.1)
    assert 'appliance_connections_closed_total{reason="idle_evicted"} 1.0' in srv.get("/metrics")[1].decode()


def test_a_closed_connection_leaves_nothing_in_the_per_connection_rate_table(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """Each connection's request-rate bucket goes when the connection closes. Before, a closed
    connection's entry (and with it its handler, transport and buffers) stayed until the table
    reached 4,096 entries: after a soak's clients came and went, object counts never returned to
    their baseline."""
    from appliance.api.security import CEILINGS

    srv = start_server({MODEL: minilm_folder})
    table = lambda: srv.call(lambda: len(srv.app[CEILINGS]._conns))  # noqa: E731
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", srv.port)) as conn:  # a keep-alive connection
            conn.settimeout(30)
            body = json.dumps({"model": MODEL, "input": "hello"}).encode()
            conn.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert conn.recv(200).startswith(b"HTTP/1.1 200")
            assert table() >= 1  # tracked while it is open
    deadline = time.monotonic() + 10
    while table() and time.monotonic() < deadline:  # the server sees each close a loop turn later
        time.sleep(0.02)
    assert table() == 0, "closed connections' buckets are still held"


def test_connections_beyond_the_cap_get_503_when_every_one_is_busy(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server({MODEL: minilm_folder}, config={"server": {"max_connections": 2}})
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        for s in held:  # a request in flight on each: its body is still arriving
            s.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"model":'
            )
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", srv.port))
        extra.settimeout(5)
        reply = b""
        while chunk := extra.recv(4096):
            reply += chunk
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        # OpenAI's error object (its API is unknown before the request is read); well-formed JSON.
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.1)
    assert srv.get("/healthz")[0] == 200
    assert 'appliance_connections_closed_total{reason="over_cap"} 1.0' in srv.get("/metrics")[1].decode()


def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """A client that sends requests and never reads the answers cannot hold a busy connection,
    its handler and its buffered output forever: once it has received nothing for
    ``server.send_timeout_s`` the server aborts the connection (nginx's send_timeout), counts it,
    and keeps serving everyone else."""
    srv = start_server({MODEL: minilm_folder}, config={"server": {"send_timeout_s": 0.5}})
    with urllib.request.urlopen(srv.url + "/openapi.json", timeout=10) as r:
        doc = r.read()
    pipelined = 400  # ~19 KB each: several times what the two sockets' buffers hold
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    try:
        s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * pipelined)
        time.sleep(2.5)  # reading nothing meanwhile
        received = 0
        s.settimeout(10)
        try:
            while chunk := s.recv(1 << 16):
                received += len(chunk)
        except ConnectionResetError:
            pass  # the abort's RST overtook the rest of the buffered bytes
        except TimeoutError:
            pytest.fail(f"the connection is still open after {received} bytes")
    finally:
        s.close()
    assert received < pipelined * len(doc) / 2
    metrics = srv.get("/metrics")[1].decode()
    assert 'appliance_connections_closed_total{reason="send_timeout"} 1.0' in metrics
    assert srv.get("/healthz")[0] == 200


def test_a_slow_reader_that_keeps_reading_is_not_cut_off(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    """The send timeout is between two receptions, not for the whole answer: a client that reads
    slowly but keeps reading gets everything, however long that takes."""
    srv = start_server({MODEL: minilm_folder}, config={"server": {"send_timeout_s": 0.2}})
    with urllib.request.urlopen(srv.url + "/openapi.json", timeout=10) as r:
        doc = r.read()
    pipelined = 250
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect(("127.0.0.1", srv.port))
    received = 0
    try:
        s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * pipelined)
        s.settimeout(10)
        while received < pipelined * len(doc):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            received += len(chunk)
            time.sleep(0.05)  # a quarter of the timeout between reads
    finally:
        s.close()
    assert received > pipelined * len(doc)  # every answer, headers included
    metrics = srv.get("/metrics")[1].decode()
    assert 'appliance_connections_closed_total{reason="send_timeout"} 0.0' in metrics


def test_a_trickling_body_is_cut_off(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server({MODEL: minilm_folder}, config={"server": {"read_timeout_s": 0.5}})
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model":'
    )
    s.settimeout(5)
    started = time.monotonic()
    reply = s.recv(500)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 3


class _Trickler:
    """A client that sends a request's head, then its body a byte every 0.1 s on its own thread,
    going on after any answer until the server stops taking bytes (as a client with a slow
    upload does: it reads the answer only once it has sent its body)."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        self.sock = sock
        sock.sendall(head)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()

    def _send(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.sock.sendall(b" ")
            except OSError:
                return  # closed, either end

    def answer(self, within_s: float) -> tuple[bytes, float]:
        """Everything the server sends until it closes, and the seconds from its first byte to
        its close; fails if the server has not closed within ``within_s`` of that byte."""
        self.sock.settimeout(within_s)
        reply, first = b"", 0.0
        try:
            while chunk := self.sock.recv(4096):
                first = first or time.monotonic()
                reply += chunk
        except TimeoutError:
            pytest.fail(f"still open {within_s} s after {reply[:40]!r}")
        return reply, time.monotonic() - first

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _busy_slots(srv: ServerThread) -> int:
    """Connections with a request in flight, as the connection cap reads them."""
    server = srv.server._runners[0].server  # type: ignore[union-attr]
    return int(
        srv.call(lambda: sum(bool(getattr(h, "_request_in_progress", False)) for h in server.connections))
    )


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_body_too_slow_is_answered_408_and_its_connection_closed_at_once(
    start_server, tmp_path: Path, scheme: str
) -> None:  # type: ignore[no-untyped-def]
    """``server.read_timeout_s`` bounds how long a trickling body holds its connection: the 408
    says ``Connection: close`` and the server closes right after it (the client still sending),
    and until the client closes too that connection is the first to make way for a newcomer at
    ``server.max_connections``. Before, aiohttp went on reading the body for another 10 s (kept
    the connection for another request if the body ended meanwhile), and on TLS a newcomer at
    the cap got a 503 as the lingering connection was still counted."""
    tls = scheme == "https"
    if tls:
        srv, ctx = _tls_server(start_server, tmp_path, read_timeout_s=2, max_connections=2)
    else:
        srv, ctx = start_server({}, config={"server": {"read_timeout_s": 2, "max_connections": 2}}), None

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", srv.port))
        return ctx.wrap_socket(s, server_hostname="127.0.0.1") if ctx else s

    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    slow = _Trickler(connect(), head)
    other = None
    try:
        reply, open_s = slow.answer(within_s=8)  # the 408 at 2 s; lingering closed it at 12 s
        status, _, rest = reply.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert b"Connection: close" in rest.split(b"\r\n\r\n")[0]
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert open_s < 3, "closed right after the 408"
        # At the cap: the refused connection (its client still sending) and one busy with a body.
        other = _Trickler(connect(), head)
        deadline = time.monotonic() + 10
        while _busy_slots(srv) < 1:
            assert time.monotonic() < deadline, "the second request never reached the server"
            time.sleep(0.02)
        newcomer = _https_get(srv, ctx, "/healthz")[0] if tls else srv.get("/healthz")[0]
        assert newcomer == 200, "the newcomer took the refused connection's slot"
    finally:
        slow.close()
        if other is not None:
            other.close()


def test_a_body_over_the_size_limit_is_answered_413_and_its_connection_closed_at_once(
    start_server,
) -> None:  # type: ignore[no-untyped-def]
    """A Content-Length over ``server.max_body_bytes`` is refused before the body is read, with
    ``Connection: close``, and the connection closes right after the 413 while the client is
    still sending. Before, aiohttp read and discarded the body for up to 10 s after the 413, and
    kept the connection for another request if it ended meanwhile."""
    srv = start_server({}, config={"server": {"max_body_bytes": 1024}})
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n"
    )
    client = _Trickler(socket.create_connection(("127.0.0.1", srv.port)), head)
    try:
        reply, open_s = client.answer(within_s=8)
    finally:
        client.close()
    head_out = reply.split(b"\r\n\r\n")[0]
    assert head_out.startswith(b"HTTP/1.1 413") and b"Connection: close" in head_out
    assert open_s < 3, "closed right after the 413"


def test_keys_cli_prints_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    cfg = tmp_path / "appliance.yaml"
    cfg.write_text("server: {port: 9000}\n")
    run = [sys.executable, "-m", "appliance", "keys"]
    out = subprocess.run(
        [*run, "add", "lan-app", "--max-priority", "2", "--rate", "5", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    key = out.stdout.strip()
    assert key.startswith("apl_")
    stored = yaml.safe_load(cfg.read_text())["auth"]["keys"][0]
    assert key not in cfg.read_text() and stored["hash"].startswith("scrypt$")
    assert (stored["max_priority"], stored["rate_per_s"]) == (2, 5.0)
    again = subprocess.run(
        [*run, "add", "lan-app", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert again.returncode == 2 and "lan-app" in again.stderr
    subprocess.run(
        [*run, "revoke", "lan-app", "--config", str(cfg)], check=True, cwd=ROOT, capture_output=True
    )
    listed = subprocess.run(
        [*run, "list", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "lan-app\trevoked" in listed.stdout
    # A revoked name is taken until its entry is removed; the message says how.
    again = subprocess.run(
        [*run, "add", "lan-app", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert again.returncode == 2 and "appliance keys remove lan-app" in again.stderr
    subprocess.run(
        [*run, "remove", "lan-app", "--config", str(cfg)], check=True, cwd=ROOT, capture_output=True
    )
    assert yaml.safe_load(cfg.read_text())["auth"]["keys"] == []
    # A cap below the top level would write a file nothing could load (found by a new user).
    bad = subprocess.run(
        [*run, "add", "x", "--max-priority", "0", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "max_priority" in bad.stderr and "Traceback" not in bad.stderr
    assert yaml.safe_load(cfg.read_text())["auth"]["keys"] == []
    listed = subprocess.run(
        [*run, "list", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert listed.stdout == "" and "no keys" in listed.stderr


def test_tls_serves_https_when_configured(start_server, minilm_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key)
    srv = start_server(
        {MODEL: minilm_folder}, config={"tls": {"certificate": str(cert), "key": str(key)}}, wait_ready=False
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    body = json.dumps({"model": MODEL, "input": "over TLS"}).encode()
    req = urllib.request.Request(
        f"https://127.0.0.1:{srv.port}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}
    )
    for _ in range(100):  # the model loads in the background
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
                assert r.status == 200 and len(json.loads(r.read())["data"][0]["embedding"]) == 384
                break
        except urllib.error.HTTPError as e:
            assert e.code == 503
            time.sleep(0.1)
    else:
        pytest.fail("no answer over TLS")
    with pytest.raises(OSError):  # plain HTTP is not answered on the TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=5)


def test_tls_connections_that_never_finish_their_handshake_are_closed_after_the_keepalive_timeout(
    start_server, minilm_folder: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Sockets opened on the TLS port that never handshake, or stop half-way through, are closed
    after server.keepalive_timeout_s, as idle connections are, and others are served meanwhile.
    asyncio's 60 s held a file descriptor each for a minute, unseen by the connection cap (which
    counts a TLS connection from its handshake's end)."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key)
    srv = start_server(
        {MODEL: minilm_folder},
        config={"tls": {"certificate": str(cert), "key": str(key)}, "server": {"keepalive_timeout_s": 1}},
        wait_ready=False,
    )
    silent = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(5)]
    halfway = socket.create_connection(("127.0.0.1", srv.port))
    halfway.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, then nothing
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{srv.port}/healthz", timeout=5, context=ctx) as r:
            assert r.status == 200
        for s in [*silent, halfway]:
            s.settimeout(5)  # the keep-alive timeout is 1 s
            with contextlib.suppress(ConnectionResetError):  # (a reset is closed too)
                assert s.recv(100) == b"", "closed by the server"
    finally:
        for s in [*silent, halfway]:
            s.close()


def _tls_server(start_server, tmp_path: Path, **server: Any) -> tuple[ServerThread, Any]:  # type: ignore[no-untyped-def]
    """A server without models on HTTPS (a fresh self-signed certificate), and a client context
    that trusts it."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key)
    srv = start_server(
        {}, config={"tls": {"certificate": str(cert), "key": str(key)}, "server": server}, wait_ready=False
    )  # (its wait polls over plain HTTP; the listener is up once start returns)
    return srv, ssl.create_default_context(cafile=str(cert))


def _https_get(srv: ServerThread, ctx: Any, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"https://127.0.0.1:{srv.port}{path}", timeout=10, context=ctx) as r:
        return r.status, r.read()


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed ``s`` (a FIN or a reset), without waiting."""
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _half_hellos(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each send a ClientHello's record header and stop there."""
    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"\x16\x03\x01\x02\x00")
        held.append(s)
    return held


def test_tls_connections_still_handshaking_count_under_the_connection_cap(
    start_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A client that opens many sockets on the TLS port and stops each half-way through its
    handshake holds no more than ``server.max_connections`` of them: past the cap the oldest
    handshake makes way for the newcomer (it is idle, as a keep-alive connection is), so a real
    HTTPS client is still served at once. Before, a TLS connection counted only from its
    handshake's end: 60 such sockets against a cap of 4 were all held, each until the keep-alive
    timeout, with no bound on how many."""
    cap, extra = 3, 5
    srv, ctx = _tls_server(start_server, tmp_path, max_connections=cap, keepalive_timeout_s=60)
    held = _half_hellos(srv.port, cap + extra)
    try:
        deadline = time.monotonic() + 10  # far inside the 60 s handshake timeout
        while sum(map(_closed_by_server, held)) < extra and time.monotonic() < deadline:
            time.sleep(0.05)
        closed = [_closed_by_server(s) for s in held]
        assert closed == [True] * extra + [False] * cap, "the oldest went, the cap's worth stays"
        assert _https_get(srv, ctx, "/healthz")[0] == 200
        assert not _closed_by_server(held[-1]), "the newest half-handshake is still held"
    finally:
        for s in held:
            s.close()
    text = _https_get(srv, ctx, "/metrics")[1].decode()
    assert 'appliance_connections_closed_total{reason="idle_evicted"}' in text


def test_a_tls_newcomer_beyond_a_cap_of_busy_connections_is_closed_at_once(
    start_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """When every slot has a request in flight, a new socket on the TLS port is closed at its
    accept, as the plain port answers its 503 and closes, rather than handshaking and waiting
    for a slot (a 503 in clear text would be no answer to a ClientHello). Before, it was held
    through its handshake, uncounted, however many there were."""
    import ssl

    srv, ctx = _tls_server(start_server, tmp_path, max_connections=2, keepalive_timeout_s=60)
    busy: list[ssl.SSLSocket] = []
    try:
        for _ in range(2):  # a request in flight on each: its body is still arriving
            s = ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", srv.port)), server_hostname="127.0.0.1"
            )
            s.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"model":'
            )
            busy.append(s)

        def busy_slots() -> int:  # connections with a request in flight, as the cap reads them
            server = srv.server._runners[0].server  # type: ignore[union-attr]
            return sum(bool(getattr(h, "_request_in_progress", False)) for h in server.connections)

        deadline = time.monotonic() + 10
        while srv.call(busy_slots) < 2:  # the bodies' first bytes read: both connections are busy
            assert time.monotonic() < deadline, "the two requests never reached the server"
            time.sleep(0.02)
        newcomer = socket.create_connection(("127.0.0.1", srv.port))
        newcomer.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # (a reset is closed too)
            assert newcomer.recv(100) == b"", "closed by the server, at once"
        newcomer.close()
    finally:
        for s in busy:
            s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the busy ones' slots come back as they close
        with contextlib.suppress(OSError):
            status, text = _https_get(srv, ctx, "/metrics")
            break
        time.sleep(0.05)
    assert status == 200
    # At least the newcomer's: a scrape tried before the busy slots came back is closed so too.
    over_cap = re.search(r'appliance_connections_closed_total\{reason="over_cap"\} (\S+)', text.decode())
    assert over_cap is not None and float(over_cap.group(1)) >= 1


def test_an_idle_tls_connection_at_the_cap_makes_way_for_a_newcomer_at_once(
    start_server, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """At ``server.max_connections`` an idle keep-alive connection is closed for a newcomer, on
    TLS as on plain HTTP. A TLS close waits for the client's close_notify, and the connection
    closed for the newcomer stayed counted meanwhile: the newcomer, its handshake done, was
    refused a 503 for the slot that had been freed for it."""
    import http.client

    srv, ctx = _tls_server(start_server, tmp_path, max_connections=1, keepalive_timeout_s=60)
    idle = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=10)
    try:
        idle.request("GET", "/healthz")
        first = idle.getresponse()
        assert first.status == 200 and first.getheader("Connection", "").lower() != "close"
        first.read()  # answered and kept: idle, and holding the one slot
        assert _https_get(srv, ctx, "/healthz")[0] == 200, "the newcomer is served"
    finally:
        idle.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def either_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Servers started under this fixture run on uvloop (production's, where it is installed) or
    on asyncio's own loop (where it is not): their TLS transports differ."""
    if request.param == "asyncio":
        monkeypatch.setitem(sys.modules, "uvloop", None)  # new_event_loop falls back to asyncio's
    else:
        pytest.importorskip("uvloop")
    return str(request.param)


def test_a_tls_connection_closing_at_the_cap_makes_way_for_a_newcomer(
    start_server, tmp_path: Path, either_loop: str
) -> None:  # type: ignore[no-untyped-def]
    """A TLS connection whose answer said ``Connection: close`` waits, closing, for its client's
    close_notify; one that never sends it holds its slot. At ``server.max_connections`` it is
    dropped for a newcomer, who is served. Before, on asyncio's loop, that close was the TLS
    transport's second: it raised (AttributeError from the transport's get_extra_info), logged
    as an asyncio callback error, and the newcomer's connection was left hanging (its handshake
    timed out) or died with a "Fatal error", while the closing one kept its slot."""
    srv, ctx = _tls_server(start_server, tmp_path, max_connections=1, keepalive_timeout_s=60)
    closing = ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port)), server_hostname="127.0.0.1")
    try:
        closing.settimeout(10)
        closing.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := closing.recv(65536):  # to the server's close_notify, not answered
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert _https_get(srv, ctx, "/healthz")[0] == 200, "the newcomer is served"
    finally:
        closing.close()


def test_the_slot_freed_for_a_tls_newcomer_is_its_own_at_its_handshake_end(
    start_server, tmp_path: Path, either_loop: str
) -> None:  # type: ignore[no-untyped-def]
    """At ``server.max_connections`` a TLS newcomer's accept closes the idlest connection, and at
    its handshake's end the newcomer is served, every time. The closed connection stayed listed
    by aiohttp until its handler's task ended, a few loop turns later: a handshake that ended
    first was refused a 503 as one too many (on uvloop and on asyncio's loop, within a few
    tries)."""
    import http.client

    srv, ctx = _tls_server(start_server, tmp_path, max_connections=1, keepalive_timeout_s=60)
    for attempt in range(12):
        idle = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=10)
        try:
            idle.request("GET", "/healthz")
            first = idle.getresponse()
            first.read()  # answered and kept: idle, and holding the one slot
            assert first.status == 200
            assert _https_get(srv, ctx, "/healthz")[0] == 200, f"newcomer {attempt} is served"
        finally:
            idle.close()
