"""One specification per defect found in review (reliability issue, item 7), each through the real
parts: a reload with a bad key hash, artefact digests and their external weights, cache identity
per model, FULL durability that could not be kept, the breaker judging a stream by its first token,
the admin plane failing closed, and the rate ceilings before a body is read."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from appliance.api.admin import admin_guard
from appliance.api.common import MANAGER, RESILIENCE
from appliance.breaker import BreakerState
from appliance.config import load
from appliance.repository import artefact_digest, load_model_file, write_build_record
from appliance.server import Server
from tests.conftest import ServerThread

MODEL = "all-minilm-l6-v2"


def test_a_reload_with_a_bad_key_hash_changes_nothing(tmp_path: Path, minilm_folder: Path) -> None:
    """The key hashes are checked before anything is swapped, and nothing escapes the handler."""
    cfg_file = tmp_path / "appliance.yaml"
    raw: dict[str, Any] = {"model_repository": str(tmp_path / "engines"), "data_dir": str(tmp_path / "data")}
    (tmp_path / "engines").mkdir()
    cfg_file.write_text(yaml.safe_dump(raw))
    server = Server(load(cfg_file))
    before = dict(server.cfg.defaults)
    raw["defaults"] = {"queue": {"priority_levels": 5}}
    raw["auth"] = {"keys": [{"name": "broken", "hash": "scrypt$not-a-hash"}]}
    cfg_file.write_text(yaml.safe_dump(raw))
    assert server.reload() is False
    assert server.cfg.defaults == before  # not half-applied


def test_a_reload_from_an_empty_or_hostile_file_changes_nothing(
    tmp_path: Path, minilm_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by an operator-side probe. An empty file (truncated by a full disk, or caught
    mid-write) was taken at its word: every setting reset and every API key dropped, opening the
    data plane. An alias bomb hung the event loop; a directory, a duplicated key or non-UTF-8
    bytes raised out of the signal callback or were silently half-read."""
    cfg_file = tmp_path / "appliance.yaml"
    raw: dict[str, Any] = {
        "model_repository": str(tmp_path / "engines"),
        "data_dir": str(tmp_path / "data"),
        "defaults": {"queue": {"aging_ms": 7}},
    }
    (tmp_path / "engines").mkdir()
    cfg_file.write_text(yaml.safe_dump(raw))
    server = Server(load(cfg_file))
    before = dict(server.cfg.defaults)
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    for text in (
        "",
        "# only a comment\n",
        bomb + "defaults: {queue: {aging_ms: *b}}\n",
        "server: {}\nserver: {}\n",
    ):
        cfg_file.write_text(text)
        assert server.reload() is False, text
    cfg_file.write_bytes(b"\xff\xfe" * 10)
    assert server.reload() is False
    cfg_file.unlink()
    cfg_file.mkdir()
    assert server.reload() is False
    assert server.cfg.defaults == before
    refusals = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refusals) == 6 and "the file is empty" in refusals[0] and "aliases" in refusals[2]


def test_a_reload_names_what_waits_for_a_restart_and_warns_when_keys_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance.auth import KeyStore

    store = KeyStore()
    store.add("app")
    cfg_file = tmp_path / "appliance.yaml"
    raw: dict[str, Any] = {
        "model_repository": str(tmp_path / "engines"),
        "data_dir": str(tmp_path / "data"),
        "auth": {"keys": store.to_records()},
    }
    (tmp_path / "engines").mkdir()
    cfg_file.write_text(yaml.safe_dump(raw))
    server = Server(load(cfg_file))
    raw["server"] = {"port": 9123, "log_level": "debug"}
    raw["auth"] = {"keys": []}
    cfg_file.write_text(yaml.safe_dump(raw))
    assert server.reload() is True
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "server.log_level, server.port change only on restart" in messages
    assert "the data plane is open to every client" in messages


def test_the_artefact_digest_covers_external_weights(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx.data").write_bytes(b"weights v1")
    first = artefact_digest(tmp_path, ["model.onnx"])
    (tmp_path / "model.onnx.data").write_bytes(b"weights v2")
    assert artefact_digest(tmp_path, ["model.onnx"]) != first


def test_the_identity_follows_artefacts_replaced_under_a_stale_build_record(tmp_path: Path) -> None:
    """The build record's digest stood for the artefacts: a rebuilt model.onnx copied in with the
    old .build.json left beside it kept the old identity, and so the old model's cached answers
    (and its measured batch size) were taken for the new one's."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.yaml").write_text("name: m\nkind: embedding\nartefacts: {model: model.onnx}\n")
    onnx = folder / "model.onnx"
    onnx.write_bytes(b"graph v1")
    write_build_record(folder, ["model.onnx"])
    record = (folder / ".build.json").read_bytes()
    entry = load_model_file(folder / "model.yaml")
    first = entry.digest()
    assert entry.digest() == first  # nothing changed: the entries cached for it stay usable

    before = onnx.stat()
    onnx.write_bytes(b"graph v2")  # the same size: only content and mtime differ
    os.utime(onnx, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    second = entry.digest()
    assert second != first and (folder / ".build.json").read_bytes() == record

    (folder / "model.onnx.data").write_bytes(b"external weights")  # the graph file untouched
    third = entry.digest()
    assert third != second

    # Delivered as `cp -p` or `rsync -t` would: a new file of the same size, its mtime kept.
    kept = onnx.stat()
    fresh = folder / "model.onnx.new"
    fresh.write_bytes(b"graph v3")
    os.utime(fresh, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    fresh.replace(onnx)
    assert onnx.stat().st_mtime_ns == kept.st_mtime_ns and onnx.stat().st_size == kept.st_size
    assert entry.digest() != third


def test_two_models_with_the_same_artefacts_never_share_cache_entries(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    srv = start_server({MODEL: minilm_folder, "twin": minilm_folder}, overrides={"twin": {"name": "twin"}})
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "same words"})
    assert status == 200
    srv.call(lambda: srv.app[RESILIENCE].cache.flush())
    status, body, headers = srv.post("/v1/embeddings", {"model": "twin", "input": "same words"})
    assert status == 200 and headers["X-Appliance-Source"] == "engine" and body["model"] == "twin"


def test_a_full_durability_write_that_was_not_kept_says_so(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server({MODEL: minilm_folder}, config={"defaults": {"cache": {"synchronous": "FULL"}}})
    cache = srv.app[RESILIENCE].cache

    async def dropped(*args: Any) -> bool:  # test-only fault hook: the writer's queue is full
        return False

    srv.call(lambda: setattr(cache, "put_and_wait", dropped))
    status, _, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "not durable"})
    assert status == 200 and headers.get("X-Appliance-Cache") == "not-stored"
    srv.call(lambda: delattr(cache, "put_and_wait"))
    status, _, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "durable"})
    assert status == 200 and "X-Appliance-Cache" not in headers


def test_a_full_durability_answer_says_not_stored_while_the_cache_is_off(
    start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """Found by a fault probe (cache.synchronous FULL, data_dir on a full tmpfs): the answer whose
    write failed said ``X-Appliance-Cache: not-stored``, but the write error switched the cache
    off, and every later answer, kept nowhere, said nothing. The cache is switched off here as
    a write error would (switch_off: the same state, without filling a disk)."""
    srv = start_server({MODEL: minilm_folder}, config={"defaults": {"cache": {"synchronous": "FULL"}}})
    cache = srv.app[RESILIENCE].cache
    srv.call(lambda: cache.switch_off("injected for the test"))
    status, _, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "nowhere"})
    assert status == 200 and headers.get("X-Appliance-Cache") == "not-stored", headers
    req_headers = {"Cache-Control": "no-store"}  # nothing was promised: nothing to say
    status, _, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "unasked"}, headers=req_headers)
    assert status == 200 and "X-Appliance-Cache" not in headers, headers


def test_a_stream_probe_is_judged_by_its_first_token_not_its_length(
    start_server, smollm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """A half-open breaker's probe is a stream: the breaker closes at its first token, while the
    generation goes on (it used to hold the probe for the whole generation, so one longer than the
    probe timeout re-tripped a healthy engine)."""
    chat = "smollm2-135m-instruct"
    srv = start_server({chat: smollm_folder}, overrides={chat: {"breaker": {"open_duration_s": 0.05}}})
    breaker = srv.call(lambda: srv.app[RESILIENCE].breaker(chat, srv.app[MANAGER].tunables(chat)))
    # Test-only: trip it as a failure rate would (OPEN, not operator-forced), so that the next call
    # after 50 ms is the half-open probe.
    srv.call(lambda: breaker._trip("test", breaker._clock()))
    time.sleep(0.1)
    body = {
        "model": chat,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    seen = b""
    while seen.count(b"data: {") < 3:  # the role chunk and the first tokens
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
    assert srv.call(lambda: breaker.state) == BreakerState.CLOSED  # while the stream goes on
    assert b"[DONE]" not in seen
    sock.close()


async def test_the_admin_plane_fails_closed_without_a_transport() -> None:
    """A request whose transport is gone is not taken for the Unix socket (token required)."""
    app = web.Application()
    from appliance.api.admin import ADMIN_TOKEN

    app[ADMIN_TOKEN] = "secret"
    request = make_mocked_request("GET", "/admin/stats", app=app)
    request._protocol.transport = None  # the connection went away while the request was queued

    async def handler(req: web.Request) -> web.Response:
        return web.Response(text="stats")

    resp = await admin_guard(request, handler)
    assert resp.status == 401


def test_the_admin_socket_is_never_open_to_other_users(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    srv: ServerThread = start_server({MODEL: minilm_folder})
    assert srv.server is not None and srv.server.admin_socket is not None
    mode = stat.S_IMODE(os.stat(srv.server.admin_socket).st_mode)
    assert mode & 0o007 == 0, oct(mode)
    old = os.umask(0o022)
    os.umask(old)
    assert old != 0o117  # the server put the process umask back after binding


def test_rate_ceilings_answer_before_the_body_is_read(start_server, minilm_folder: Path) -> None:  # type: ignore[no-untyped-def]
    """In the API's own error shape, with a request id, as every other refusal."""
    srv = start_server({MODEL: minilm_folder}, config={"server": {"max_request_rate": 5}})
    statuses = []
    kserve = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    for i in range(20):
        status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": f"r{i}"})
        statuses.append(status)
        if status == 503:
            assert int(headers["Retry-After"]) >= 1 and headers["X-Request-Id"]
            assert body["error"]["code"] == "rate_ceiling" and "rate" in body["error"]["message"]
        status, body, _ = srv.post(f"/v2/models/{MODEL}/infer", kserve)
        if status == 503:
            assert isinstance(body["error"], str) and "rate" in body["error"]  # KServe's shape
    assert 503 in statuses and 200 in statuses
    assert srv.get("/healthz")[0] == 200  # probes are not rate-limited


def test_the_global_rate_ceiling_keeps_what_is_left_for_the_most_urgent() -> None:
    """Under a flood the global bucket runs low; priority 3 must leave two thirds of what its burst
    holds beyond one request, priority 2 (and no header) a third, and priority 1 may take the
    last token. A full bucket admits anyone."""
    from aiohttp.test_utils import make_mocked_request

    from appliance.api.security import RateCeilings

    for rate in (30.0, 5.0):  # a burst of 3 (at 5/s too: with 1 there was nothing to hold back)
        ceilings = RateCeilings(rate, 0.0)

        def allowed(priority: str | None, ceilings: RateCeilings = ceilings) -> bool:
            headers = {} if priority is None else {"X-Priority": priority}
            return ceilings.check(make_mocked_request("POST", "/v1/embeddings", headers=headers)) == 0.0

        taken = [allowed(p) for p in ("3", "3", "2", None, "1", "1")]
        assert taken == [True, False, True, False, True, False], rate


def test_the_per_connection_ceiling_forgets_closed_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection's bucket was pruned only once idle for 10 s: more connections than the table
    holds within 10 s (clients without keep-alive, ~410 a second at 4,096) kept it growing, and
    every newcomer rebuilt it. A closed connection's bucket goes at the next prune. (A connection
    here is aiohttp's handler as the table sees it: its transport, None once closed.)"""
    from types import SimpleNamespace

    from appliance.api import security

    class Conn:  # hashed by identity, as aiohttp's handlers are
        def __init__(self) -> None:
            self.transport: object | None = object()

    monkeypatch.setattr(security, "_MAX_TRACKED", 8)
    ceilings = security.RateCeilings(0.0, 100.0)
    live = Conn()
    conns = [live] + [Conn() for _ in range(40)]
    for conn in conns:
        request = SimpleNamespace(headers={}, protocol=conn)  # what check() reads of a request
        assert ceilings.check(request) == 0.0  # type: ignore[arg-type]
        if conn is not live:
            conn.transport = None  # the client hung up; it never comes back
    assert len(ceilings._conns) <= 8 and live in ceilings._conns  # it held all 41


def test_an_empty_admin_token_file_is_replaced_and_an_unusable_data_dir_is_one_line(
    tmp_path: Path, start_server, minilm_folder: Path
) -> None:  # type: ignore[no-untyped-def]
    """Found by an operator-side probe: an empty admin.token (a crash while it was written) locked
    the admin API with 401s and nothing logged; a data_dir that could not be created (a file in
    its place) killed start-up with a traceback."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin.token").write_text("")
    srv = start_server({MODEL: minilm_folder})
    assert srv.server is not None and srv.server.admin_token
    assert (data / "admin.token").read_text().strip() == srv.server.admin_token
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the data folder should be")
    cfg = tmp_path / "blocked.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_repository": str(tmp_path / "none"),
                "data_dir": str(blocked),
                "server": {"port": 0},
                "admin": {"port": -1, "socket": ""},
            }
        )
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(cfg), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "data_dir" in out.stderr and "Traceback" not in out.stderr, out.stderr[
        -2000:
    ]
