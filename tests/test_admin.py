"""The admin plane: stats, live settings (validated as a whole, applied at once, persisted
atomically), model, breaker and cache actions; over TCP with the token and over the Unix socket."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from appliance import models
from appliance.api import admin as admin_api
from appliance.gpu import cuda
from tests.conftest import ServerThread, build_tensor_model, copy_in, make_repository

MODEL = "all-minilm-l6-v2"


def admin(srv: ServerThread, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    assert srv.server is not None
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        srv.admin_url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {srv.server.admin_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def purge_request(srv: ServerThread) -> urllib.request.Request:
    """POST /admin/cache/purge, for a test that reads the refusal's headers (admin() does not)."""
    assert srv.server is not None
    return urllib.request.Request(
        srv.admin_url + "/admin/cache/purge",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {srv.server.admin_token}", "Content-Type": "application/json"},
    )


@pytest.fixture
def served(tmp_path: Path, minilm_folder: Path) -> Any:
    """A server started from a real appliance.yaml, so that persistence can be checked."""
    repo = make_repository(tmp_path, {MODEL: minilm_folder})
    path = tmp_path / "appliance.yaml"
    raw = {
        "server": {"port": 0},
        "admin": {"port": 0, "socket": "data/admin.sock"},
        "model_repository": str(repo),
        "data_dir": "data",
    }
    path.write_text("# operator notes that PyYAML cannot keep\n" + yaml.safe_dump(raw))
    servers: list[ServerThread] = []

    def start() -> ServerThread:
        current = yaml.safe_load(path.read_text())
        srv = ServerThread(current, path).start()
        servers.append(srv)
        return srv

    yield start, path
    for s in servers:
        s.stop()


def test_stats_snapshot_after_traffic(served: Any) -> None:
    start, _ = served
    srv = start()
    for i in range(5):
        srv.post("/v1/embeddings", {"model": MODEL, "input": f"stats {i}"})
    srv.post("/v1/embeddings", {"model": MODEL, "input": "x", "priority": 99})
    status, stats = admin(srv, "GET", "/admin/stats")
    assert status == 200
    m = stats["models"][MODEL]
    assert m["state"] == "resident" and m["kind"] == "embedding"
    assert m["requests_per_s"] > 0 and m["p50_ms"] > 0 and m["p99_ms"] >= m["p50_ms"]
    assert set(m["queue_depth"]) == {"1", "2", "3"}
    assert m["recent_batch_sizes"] and m["backend"] in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
    if not cuda.probe().ok:  # a CPU box: the step downs are named, and there is only a host pool
        assert m["backend"] == "onnxruntime-cpu"
        assert "TensorRT: " in m["backend_reason"] and "ONNX Runtime CUDA: " in m["backend_reason"]
        assert stats["memory"]["host"]["models"] == 1 and stats["memory"]["device"] is None
    assert stats["cache"]["enabled"] is True and stats["uptime_s"] >= 0 and stats["version"]


def test_settings_patch_is_validated_as_a_whole(served: Any) -> None:
    start, _ = served
    srv = start()
    status, body = admin(
        srv,
        "PATCH",
        "/admin/settings",
        {"models": {MODEL: {"batching": {"max_batch_size": 4}, "queue": {"aging_ms": -1}}}},
    )
    assert status == 400
    assert "queue.aging_ms" in body["error"]["message"] and "0" in body["error"]["message"]
    _, current = admin(srv, "GET", "/admin/settings")
    assert current["models"][MODEL]["batching.max_batch_size"] == 16, "nothing applied"
    # Every problem is reported, each naming its setting, for a form to show next to its field.
    status, body = admin(
        srv,
        "PATCH",
        "/admin/settings",
        {"models": {MODEL: {"batching": {"max_batch_size": 0}, "queue": {"aging_ms": -1}}}},
    )
    problems = {p["setting"]: p["message"] for p in body["error"]["problems"]}
    assert status == 400 and set(problems) == {"batching.max_batch_size", "queue.aging_ms"}
    assert "1 to 1024" in problems["batching.max_batch_size"]
    status, body = admin(
        srv, "PATCH", "/admin/settings", {"models": {MODEL: {"queue": {"default_priority": 5}}}}
    )
    assert status == 400 and "default_priority" in body["error"]["message"]
    status, body = admin(srv, "PATCH", "/admin/settings", {"models": {"ghost": {}}})
    assert status == 400 and "ghost" in body["error"]["message"]
    # Problems in several sections are all reported, each with its setting (and model), and a
    # combination is named by its setting, not by an internal class.
    status, body = admin(
        srv,
        "PATCH",
        "/admin/settings",
        {
            "defaults": {"queue": {"aging_ms": -1}},
            "models": {MODEL: {"batching": {"max_batch_size": 0}}, "ghost": {}},
        },
    )
    problems = body["error"]["problems"]
    assert status == 400 and {p["setting"] for p in problems} == {
        "queue.aging_ms",
        "batching.max_batch_size",
        "models.ghost",
    }, problems
    assert [p.get("model") for p in problems if p["setting"] == "batching.max_batch_size"] == [MODEL]
    status, body = admin(
        srv, "PATCH", "/admin/settings", {"models": {MODEL: {"queue": {"default_priority": 5}}}}
    )
    (problem,) = body["error"]["problems"]
    assert problem["setting"] == "queue.default_priority" and "BatchPolicy" not in problem["message"]
    status, body = admin(srv, "PATCH", "/admin/settings", {"models": {MODEL: {"cache": {"ttl_s": 5}}}})
    assert status == 400 and "server-wide" in body["error"]["message"]


def test_settings_apply_live_and_survive_a_restart(served: Any) -> None:
    start, path = served
    srv = start()
    status, body = admin(
        srv,
        "PATCH",
        "/admin/settings",
        {"defaults": {"cache": {"ttl_s": 120}}, "models": {MODEL: {"batching": {"max_batch_size": 4}}}},
    )
    assert status == 200 and body["models"][MODEL]["batching.max_batch_size"] == 4
    from appliance.api.common import MANAGER

    policy = srv.call(lambda: srv.app[MANAGER].slots[MODEL].runtime.batcher.policy)  # type: ignore[union-attr]
    assert policy.max_batch_size == 4, "applied to the running batcher at once"
    saved = yaml.safe_load(path.read_text())
    assert saved["models"][MODEL]["batching"]["max_batch_size"] == 4
    assert saved["defaults"]["cache"]["ttl_s"] == 120
    assert "operator notes" in (path.parent / "appliance.yaml.bak").read_text()
    _, view = admin(srv, "GET", "/admin/settings")
    assert view["sources"][MODEL]["batching.max_batch_size"] == "override"
    assert view["sources"][MODEL]["queue.max_queue_size"] == "model.yaml"
    srv.stop()
    again = start()
    _, current = admin(again, "GET", "/admin/settings")
    assert current["models"][MODEL]["batching.max_batch_size"] == 4
    assert current["defaults"]["cache.ttl_s"] == 120


def test_a_settings_save_on_a_slow_disk_stalls_no_request_and_patches_apply_in_order(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH writes the config file with two fsyncs: on the event loop, a slow disk's seconds
    stalled every request (the data plane's too). The save runs in a thread; a PATCH sent while
    one saves waits its turn, so the file and the running values end as the last one says."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance import config
    from appliance.api.common import CONFIG

    start, path = served
    srv = start()
    real, saving, disk = config.atomic_write, threading.Event(), threading.Event()

    def slow_disk(*args: Any, **kwargs: Any) -> None:
        saving.set()
        disk.wait(30)
        real(*args, **kwargs)

    monkeypatch.setattr(config, "atomic_write", slow_disk)

    def patch(aging_ms: int) -> tuple[int, Any]:
        return admin(srv, "PATCH", "/admin/settings", {"defaults": {"queue": {"aging_ms": aging_ms}}})

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(patch, 111)
        assert saving.wait(10)
        second = pool.submit(patch, 222)
        try:
            with urllib.request.urlopen(srv.url + "/healthz", timeout=2) as r:
                assert r.status == 200  # answered while the file is being written
        finally:
            disk.set()
        assert first.result()[0] == 200 and second.result()[0] == 200
    assert yaml.safe_load(path.read_text())["defaults"]["queue"]["aging_ms"] == 222
    assert srv.call(lambda: srv.app[CONFIG].defaults["queue.aging_ms"]) == 222


def test_model_breaker_and_cache_actions(served: Any) -> None:
    start, _ = served
    srv = start()
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    # Unloaded after it has served, a default model is still ready: its next request loads it.
    status, ready = srv.get("/readyz")
    assert status == 200 and ready["models"][MODEL] == "available"
    assert admin(srv, "POST", f"/admin/models/{MODEL}/load")[1]["state"] == "resident"
    assert admin(srv, "POST", "/admin/models/ghost/load")[0] == 404

    status, snap = admin(srv, "POST", f"/admin/breakers/{MODEL}/open")
    assert status == 200 and snap["state"] == "forced_open"
    assert admin(srv, "GET", "/admin/stats")[1]["models"][MODEL]["breaker"]["state"] == "forced_open"
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "while forced open"})
    assert status == 503 and "Retry-After" in headers
    # Not "is failing" (an operator-side probe): it stays open until an operator closes it.
    message = body["error"]["message"]
    assert "an operator" in message and "until an operator closes it" in message, message
    assert "is failing" not in message
    assert admin(srv, "POST", f"/admin/breakers/{MODEL}/close")[1]["state"] == "closed"
    assert admin(srv, "POST", f"/admin/breakers/{MODEL}/disable")[1]["state"] == "disabled"
    assert admin(srv, "POST", f"/admin/breakers/{MODEL}/reset")[1]["state"] == "closed"
    assert admin(srv, "POST", f"/admin/breakers/{MODEL}/explode")[0] == 400

    srv.post("/v1/embeddings", {"model": MODEL, "input": "cached"})
    from appliance.api.common import RESILIENCE

    srv.call(lambda: srv.app[RESILIENCE].cache.flush())  # type: ignore[union-attr]
    status, body = admin(srv, "POST", "/admin/cache/purge", {"model": MODEL})
    assert status == 200 and body["purged"] >= 1
    assert (
        srv.post("/v1/embeddings", {"model": MODEL, "input": "cached"})[2]["X-Appliance-Source"] == "engine"
    )
    assert admin(srv, "POST", "/admin/cache/purge")[0] == 200


def test_a_stuck_cache_writer_is_reported_and_a_purge_does_not_wait_on_it(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a probe: with the cache writer stuck in a batch (a wedged disk), /readyz said 200,
    worker_up said 1, and POST /admin/cache/purge never answered. The purge now answers 503 with
    Retry-After once the writer has not answered in cache.REQUEST_TIMEOUT_S, and the stats say
    the writer is stalled once it has completed no loop in cache.STALL_S (both cut here)."""
    import threading

    from appliance import cache as cache_module
    from appliance.api.common import RESILIENCE

    start, _ = served
    srv = start()
    rc = srv.app[RESILIENCE].cache
    assert rc is not None
    assert admin(srv, "GET", "/admin/stats")[1]["cache"]["writer_stalled"] is False
    monkeypatch.setattr(cache_module, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(cache_module, "STALL_S", 1.0)
    gate = threading.Event()
    original = rc._apply

    def stuck(batch: Any, sweep: bool) -> Any:  # test-only hook: a write that does not return
        if batch:
            gate.wait(30)
        return original(batch, sweep)

    monkeypatch.setattr(rc, "_apply", stuck)
    try:
        srv.post("/v1/embeddings", {"model": MODEL, "input": "the put that gets stuck"})
        assert srv.server is not None
        req = purge_request(srv)
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=10)
        assert time.monotonic() - started < 5
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        error = json.loads(refused.value.read())["error"]
        assert error["type"] == "service_unavailable" and "writer has not answered" in error["message"]
        time.sleep(1.2)
        stats = admin(srv, "GET", "/admin/stats")[1]["cache"]
        assert stats["writer_stalled"] is True and stats["writer_silent_s"] > 1.0, stats
    finally:
        gate.set()
    deadline = time.monotonic() + 5
    while admin(srv, "GET", "/admin/stats")[1]["cache"]["writer_stalled"]:
        assert time.monotonic() < deadline, "the stall is reported after the writer moved on"
        time.sleep(0.1)


def test_a_purge_with_a_misspelt_key_is_refused_not_a_purge_of_everything(
    start_server: Any, minilm_folder: Path
) -> None:
    """Found by a hostile-client probe: ``{"modle": m}`` (or any key but ``model``) was read as no
    model at all, and the answer was 200 with every model's entries purged. An operator who
    meant one model lost the whole cache. Unknown keys are a 400 naming the key; nothing goes."""
    from appliance.api.common import RESILIENCE

    srv = start_server({MODEL: minilm_folder})
    srv.post("/v1/embeddings", {"model": MODEL, "input": "kept"})
    assert srv.call(lambda: srv.app[RESILIENCE].cache.flush()) is True
    status, body = admin(srv, "POST", "/admin/cache/purge", {"modle": MODEL})
    assert status == 400, body
    assert body["error"]["param"] == "modle" and "'model'" in body["error"]["message"], body
    assert admin(srv, "GET", "/admin/stats")[1]["cache"]["entries"] == 1
    status, body = admin(srv, "POST", "/admin/cache/purge", {"model": MODEL})
    assert status == 200 and body["purged"] == 1, body


def test_a_purge_the_cache_could_not_carry_out_is_503_not_zero_purged(served: Any) -> None:
    """Found by a probe: with an ``sqlite3`` shell holding the cache file's lock, the purge's write
    was dropped as busy after the 5 s busy timeout and the answer was 200 ``{"purged": 0}``, the
    entries all still there. It is a 503 with Retry-After saying so; once the lock is gone the
    purge deletes them."""
    import sqlite3

    from appliance.api.common import RESILIENCE

    start, _ = served
    srv = start()
    rc = srv.app[RESILIENCE].cache
    assert rc is not None
    srv.post("/v1/embeddings", {"model": MODEL, "input": "kept while the file is locked"})
    assert srv.call(rc.flush) is True
    other = sqlite3.connect(rc.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    assert srv.server is not None
    req = purge_request(srv)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "5"
    assert "not carried out" in json.loads(refused.value.read())["error"]["message"]
    assert admin(srv, "GET", "/admin/stats")[1]["cache"]["entries"] >= 1
    status, body = admin(srv, "POST", "/admin/cache/purge")
    assert status == 200 and body["purged"] >= 1


def test_unix_socket_needs_no_token(served: Any) -> None:
    start, _ = served
    srv = start()
    assert srv.server is not None and srv.server.admin_socket is not None

    async def get() -> tuple[int, Any]:
        conn = aiohttp.UnixConnector(path=str(srv.server.admin_socket))  # type: ignore[union-attr]
        async with aiohttp.ClientSession(connector=conn) as s, s.get("http://appliance/admin/stats") as r:
            return r.status, await r.json()

    status, stats = asyncio.run(get())
    assert status == 200 and MODEL in stats["models"]


def test_null_removes_an_override(served: Any) -> None:
    start, path = served
    srv = start()
    admin(srv, "PATCH", "/admin/settings", {"models": {MODEL: {"batching": {"max_batch_size": 4}}}})
    status, view = admin(
        srv, "PATCH", "/admin/settings", {"models": {MODEL: {"batching": {"max_batch_size": None}}}}
    )
    assert status == 200
    assert view["models"][MODEL]["batching.max_batch_size"] == 16, "back to the model.yaml value"
    assert view["sources"][MODEL]["batching.max_batch_size"] == "model.yaml"
    assert "models" not in yaml.safe_load(path.read_text())


def test_removing_an_override_by_a_name_that_is_no_setting_is_a_400_naming_it(served: Any) -> None:
    """Found by a live-retuning probe. Only values were validated, so a null under a misspelt or
    misplaced name (or a section's name, or a server-wide setting under a model) was a 200 that
    removed nothing: the operator was told the override was gone while it still applied. Each is refused
    as setting it would be, in the same request as the rest (nothing of it applied)."""
    start, _ = served
    srv = start()
    assert (
        admin(srv, "PATCH", "/admin/settings", {"models": {MODEL: {"queue": {"max_queue_size": 7}}}})[0]
        == 200
    )
    for body, setting, message in (
        (
            {"models": {MODEL: {"batching": {"max_queue_size": None}, "queue": {"aging_ms": 5}}}},
            "batching.max_queue_size",
            "unknown setting (did you mean queue.max_queue_size?)",
        ),
        ({"models": {MODEL: {"queue": {"max_queue_siz": None}}}}, "queue.max_queue_siz", "unknown setting"),
        # A group given a value is told what a group takes (it read "unknown setting").
        (
            {"defaults": {"queue": None}},
            "queue",
            "a group of settings; expected a mapping of queue.* settings (null each one to remove it)",
        ),
        (
            {"models": {MODEL: {"cache": {"max_bytes": None}}}},
            "cache.max_bytes",
            "a server-wide setting; set it under 'defaults'",
        ),
    ):
        status, resp = admin(srv, "PATCH", "/admin/settings", body)
        assert status == 400, (body, resp)
        assert {"setting": setting, "message": message} in [
            {k: p[k] for k in ("setting", "message")} for p in resp["error"]["problems"]
        ], resp
    view = admin(srv, "GET", "/admin/settings")[1]
    assert view["overrides"]["models"][MODEL] == {"queue.max_queue_size": 7}


def test_a_patch_says_which_resident_models_and_which_server_settings_wait_to_apply(served: Any) -> None:
    """Found by a live-retuning probe. reload_needed named every model of the repository, unbuilt
    ones too, for any load-time setting sent: for cache.synchronous, which only a restart applies
    (the console said "takes effect when reloaded" with six models), for a value model.yaml
    shadows, and for a PATCH that changed nothing. It names the resident models whose effective
    value changed; restart_needed names the server-wide settings that wait for a restart."""
    start, _ = served
    srv = start()

    def waits(body: dict[str, Any]) -> tuple[list[str], list[str]]:
        status, view = admin(srv, "PATCH", "/admin/settings", body)
        assert status == 200, view
        return view["reload_needed"], view["restart_needed"]

    assert waits({"defaults": {"cache": {"synchronous": "FULL"}}}) == ([], ["cache.synchronous"])
    assert waits({"defaults": {"cache": {"synchronous": "FULL"}}}) == ([], []), "no change"
    # model.yaml sets engine.intra_op_threads: a server-wide default changes nothing for it.
    assert waits({"defaults": {"engine": {"intra_op_threads": 1}}}) == ([], [])
    assert waits({"models": {MODEL: {"engine": {"intra_op_threads": 1}}}}) == ([MODEL], [])
    assert waits({"models": {MODEL: {"batching": {"max_batch_size": 4}}}}) == ([], []), "applied live"


def test_settings_changed_while_a_model_loads_apply_to_it_once_loaded(served: Any, monkeypatch: Any) -> None:
    """Found by a live-retuning probe. A PATCH applies the settings to each resident model's
    queue; a model still loading had built its queue from the values read before, and once
    resident it ran those until the next PATCH, while GET /admin/settings showed the new ones: a
    priority-5 request after a PATCH to 5 levels was a 400 "from 1 to 3". The test wraps the
    load's warm-up run only to land the PATCH after the queue is built and before it serves."""
    from appliance import models
    from appliance.api.common import MANAGER

    start, _ = served
    srv = start()
    five = {"models": {MODEL: {"queue": {"priority_levels": 5, "default_priority": 5}}}}

    def wrapped(factory: Any) -> Any:
        def make(*args: Any) -> Any:
            runtime = factory(*args)
            attr = "peak_probe" if runtime.peak_probe is not None else "warmup"
            run = getattr(runtime, attr)

            def retuned_then_run() -> None:  # on the load's executor thread
                assert admin(srv, "PATCH", "/admin/settings", five)[0] == 200
                run()

            setattr(runtime, attr, retuned_then_run)
            return runtime

        return make

    for kind, factory in list(models.RUNTIME_FACTORIES.items()):
        monkeypatch.setitem(models.RUNTIME_FACTORIES, kind, wrapped(factory))
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[0] == 200
    assert admin(srv, "POST", f"/admin/models/{MODEL}/load")[0] == 200
    assert admin(srv, "GET", "/admin/settings")[1]["models"][MODEL]["queue.priority_levels"] == 5
    policy = srv.call(lambda: srv.app[MANAGER].slots[MODEL].runtime.batcher.policy)  # type: ignore[union-attr]
    assert (policy.priority_levels, policy.default_priority) == (5, 5)
    status, body, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": "after the load", "priority": 5})
    assert status == 200, body


def test_hostile_admin_bodies_and_tokens_get_json_errors_not_500s(served: Any) -> None:
    """Found by fuzzing: sections of the wrong type, a model name that is no string, and a token
    whose bytes are not UTF-8 each raised inside a handler, and aiohttp answered its plain-text
    500. Each is now a 400 or 401 in the admin API's JSON shape, naming the field. A section that
    is an empty list, a 0 or false (an operator-side probe) was taken for an empty one, a 200: it
    is a 400 as well; null stays an absent section."""
    start, _ = served
    srv = start()
    for body, param in (
        ({"defaults": [1]}, "defaults"),
        ({"defaults": "x"}, "defaults"),
        ({"models": 5}, "models"),
        ({"models": True}, "models"),
        ({"defaults": []}, "defaults"),
        ({"models": []}, "models"),
        ({"defaults": 0}, "defaults"),
        ({"models": False}, "models"),
        ({"defaults": ""}, "defaults"),
    ):
        status, resp = admin(srv, "PATCH", "/admin/settings", body)
        assert status == 400 and resp["error"]["param"] == param, (body, resp)
        assert resp["error"]["message"].startswith(f"{param}: expected a mapping, got "), resp
    assert admin(srv, "PATCH", "/admin/settings", {"defaults": None, "models": None})[0] == 200
    for model in (["x"], {}):
        status, resp = admin(srv, "POST", "/admin/cache/purge", {"model": model})
        assert status == 400 and resp["error"]["param"] == "model", resp
    port = int(srv.admin_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /admin/settings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401") and b"application/json" in head, head
    assert admin(srv, "GET", "/admin/settings")[0] == 200


def test_an_operators_load_is_not_undone_by_keep_alive(served: Any) -> None:
    """Found by a new user: a model that keep_alive had unloaded and an operator loaded again was
    unloaded within a second, because its last use was still the old one. A load counts as a use."""
    start, _ = served
    srv = start()
    status, body = admin(
        srv, "PATCH", "/admin/settings", {"models": {MODEL: {"memory": {"keep_alive_s": 2}}}}
    )
    assert status == 200, body

    def state() -> str:
        return str(admin(srv, "GET", "/admin/stats")[1]["models"][MODEL]["state"])

    deadline = time.monotonic() + 15
    while state() == "resident":
        assert time.monotonic() < deadline, "keep_alive never unloaded the idle model"
        time.sleep(0.2)
    time.sleep(1.0)  # idle longer than keep_alive since its last use
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/load")
    assert status == 200 and body["state"] == "resident", body
    time.sleep(1.5)  # past a keep-alive check, within keep_alive_s of the load
    assert state() == "resident"


def test_settings_are_not_saved_over_a_config_file_that_is_gone_or_broken(served: Any) -> None:
    """Found by an operator-side probe: with the file deleted, a PATCH wrote a new one holding only
    the tunables (the server, admin and path sections lost for the next restart); with invalid
    YAML on disk it was a 500. Now it is a 409 naming the file, and nothing is applied."""
    start, path = served
    srv = start()
    good = path.read_text()
    change = {"defaults": {"queue": {"aging_ms": 123}}}
    try:
        for broken in ("server: [unclosed\n", None):
            if broken is None:
                path.unlink()
            else:
                path.write_text(broken)
            status, body = admin(srv, "PATCH", "/admin/settings", change)
            assert status == 409 and body["error"]["code"] == "config_file_conflict", body
            assert str(path.name) in body["error"]["message"]
            assert admin(srv, "GET", "/admin/settings")[1]["defaults"]["queue.aging_ms"] != 123
        assert not path.exists()
    finally:
        path.write_text(good)
    assert admin(srv, "PATCH", "/admin/settings", change)[0] == 200


def start_a_slow_batch(srv: ServerThread, engine: Any, seconds: float) -> threading.Thread:
    """An embedding request whose batch takes ``seconds`` in ``engine`` (a FaultyEngine), sent
    from a thread; returns once the batch is running."""
    engine.delay_s = seconds
    ran = len(engine.batches)
    running = threading.Thread(target=srv.post, args=("/v1/embeddings", {"model": MODEL, "input": "slow"}))
    running.start()
    deadline = time.monotonic() + 30
    while len(engine.batches) == ran:  # the slow batch is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return running


def assert_the_loop_answers(srv: ServerThread) -> None:
    """/healthz within 1.5 s: the event loop is not held by what the test has hung."""
    started = time.monotonic()
    with urllib.request.urlopen(srv.url + "/healthz", timeout=1.5) as r:
        assert r.status == 200
    assert time.monotonic() - started < 1.5


def slow_loads(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Test-only hook: every engine open waits (up to 30 s) until the event returned is set."""
    from appliance.models import ModelManager

    gate = threading.Event()
    original = ModelManager._open_engine

    def slow_open(entry: Any, values: Any) -> Any:
        gate.wait(30)
        return original(entry, values)

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(slow_open))
    return gate


def test_an_unload_under_traffic_leaves_one_engine_and_its_memory_counted(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an operator-side probe: requests arriving while an unload drained the old engine
    loaded a new one beside it, and the unload then released the new engine's memory lease, so
    the budget no longer saw a resident model. A load now waits for the unload to finish."""
    import threading

    # Requests wait for the unload's drain this long before a 503: on a loaded box the drain can
    # take longer than the 2 s default, and the 503 is not what this test is about.
    monkeypatch.setattr(models, "UNLOAD_WAIT_S", 60.0)
    start, _ = served
    srv = start()
    statuses: list[int] = []

    def traffic(i: int) -> None:
        for j in range(6):
            body = {"model": MODEL, "input": [f"sentence {i} {j} {k} " * 10 for k in range(16)]}
            statuses.append(srv.post("/v1/embeddings", body, {"Cache-Control": "no-store"})[0])

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[0] == 200
    for t in threads:
        t.join()
    assert set(statuses) == {200}
    stats = admin(srv, "GET", "/admin/stats")[1]
    model = stats["models"][MODEL]
    assert model["state"] == "resident" and model["memory_bytes"], model
    assert stats["memory"]["used_bytes"] > 0
    assert 'appliance_model_loaded{model="all-minilm-l6-v2"} 1.0' in srv.get("/metrics")[1].decode()


def test_unloading_a_model_whose_folder_went_while_it_served_says_it_is_unloaded_and_removed(
    served: Any,
) -> None:
    """Found by a new-user probe: the unload happened ("model unloaded" in the log), but its
    answer was a 404 model_not_found (the unload's rescan had let the model go), so the console
    reported a failure."""
    import shutil

    start, _ = served
    srv = start()
    shutil.rmtree(Path(srv.cfg.model_repository) / MODEL)
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/unload")
    assert status == 200 and body["state"] == "removed", body
    assert body["name"] == MODEL and "no longer in the model repository" in body["error"]
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[0] == 404  # gone now


def test_a_request_during_a_long_unload_is_told_to_come_back_not_held_for_the_drain(
    start_server: Any, minilm_folder: Path, faulty: Any
) -> None:
    """Found by a probe: an unload drains the model's running work, which for a generation lasts
    as long as its max_tokens; every request meanwhile waited for all of it (45 s), then loaded
    the model the operator had just unloaded. It now waits briefly, then gets a 503 with
    Retry-After saying the model is being unloaded."""
    import threading

    srv = start_server({MODEL: minilm_folder})
    engine = faulty[-1]
    running = start_a_slow_batch(srv, engine, 6.0)  # which the unload drains
    unload = threading.Thread(target=admin, args=(srv, "POST", f"/admin/models/{MODEL}/unload"))
    unload.start()
    time.sleep(0.3)
    started = time.monotonic()
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "during"})
    waited = time.monotonic() - started
    assert status == 503 and "is being unloaded" in body["error"]["message"], body
    assert "Retry-After" in headers and waited < 5, waited
    unload.join(30)
    running.join(30)
    assert srv.post("/v1/embeddings", {"model": MODEL, "input": "after"})[0] == 200


def test_a_request_whose_load_an_unload_undid_is_not_told_the_load_failed(
    start_server: Any, minilm_folder: Path
) -> None:
    """Found by a probe: an operator's unload right after a load (which it had waited for) left
    the requests that were waiting on that load a 503 "failed to load (no reason recorded)" and a
    warning in the log, while nothing had failed. They are told the model is being unloaded."""
    from appliance.api.common import MANAGER
    from appliance.errors import LoadFailed, ModelUnloading

    srv = start_server({MODEL: minilm_folder})
    mgr = srv.app[MANAGER]

    async def race() -> tuple[BaseException | None, BaseException | None]:
        await mgr.unload(MODEL)
        first = asyncio.ensure_future(mgr.load(MODEL))  # starts the load
        await asyncio.sleep(0)
        # The operator's unload, as soon as the load is done; then a request that waited on it.
        mgr.slots[MODEL].load_task.add_done_callback(lambda _: asyncio.ensure_future(mgr.unload(MODEL)))
        second = asyncio.ensure_future(mgr.load(MODEL))
        done = await asyncio.gather(first, second, return_exceptions=True)
        return tuple(d if isinstance(d, BaseException) else None for d in done)  # type: ignore[return-value]

    first, second = srv.call(race)
    assert first is None
    assert isinstance(second, ModelUnloading) and not isinstance(second, LoadFailed), second


def test_a_request_waiting_out_an_unload_whose_folder_went_is_a_404_not_a_load(
    start_server: Any, minilm_folder: Path, faulty: Any
) -> None:
    """Found by a regression probe: a request that waited out a drain loaded the model into the
    slot the unload's rescan had just let go (its model.yaml removed meanwhile), then failed with a
    503 "failed to load (... does not exist)", its engine left open."""
    import threading

    srv = start_server({MODEL: minilm_folder})
    engine = faulty[-1]
    engine.delay_s = 1.0
    ran = len(engine.batches)
    running = threading.Thread(target=srv.post, args=("/v1/embeddings", {"model": MODEL, "input": "slow"}))
    running.start()
    deadline = time.monotonic() + 30
    while len(engine.batches) == ran:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    unload = threading.Thread(target=admin, args=(srv, "POST", f"/admin/models/{MODEL}/unload"))
    unload.start()
    time.sleep(0.2)
    (Path(srv.cfg.model_repository) / MODEL / "model.yaml").unlink()  # its artefacts stay
    opened = len(faulty)
    status, body, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": "during"})
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    assert len(faulty) == opened, "no engine was opened for a model that is gone"
    unload.join(30)
    running.join(30)


def test_the_admin_plane_finds_a_folder_copied_in_and_names_a_broken_file(
    served: Any, minilm_folder: Path
) -> None:
    """Found by a regression probe: a folder copied in was served by the data plane at once, but
    the admin plane's load said "no such model" until a data-plane request had read the
    repository; for a broken model.yaml it said the same, where the data plane names the file."""
    start, _ = served
    srv = start()
    repo = Path(srv.cfg.model_repository)
    copy_in(repo, "copied", minilm_folder)
    time.sleep(1.1)  # past the rescan's rate bound since start
    status, body = admin(srv, "POST", "/admin/models/copied/load")
    assert status == 200 and body["state"] == "resident", body
    (repo / "broken").mkdir()
    (repo / "broken" / "model.yaml").write_text("name: broken\nkind: embeding\n")
    time.sleep(1.1)
    status, body = admin(srv, "POST", "/admin/models/broken/load")
    assert status == 404 and "broken/model.yaml" in body["error"]["message"], body


def test_settings_are_not_saved_over_an_empty_config_file(served: Any) -> None:
    """Found by an operator-side probe: with the file empty (caught mid-write, or truncated by a
    full disk) a PATCH wrote one holding only the tunables, the server, admin and path sections
    lost for the next restart, and the .bak became the empty file. It is refused as a reload
    refuses it: a 409, nothing written, nothing applied."""
    start, path = served
    srv = start()
    bak = path.parent / "appliance.yaml.bak"
    for empty in ("", "# only a comment\n", "{}\n"):
        path.write_text(empty)
        status, body = admin(srv, "PATCH", "/admin/settings", {"defaults": {"queue": {"aging_ms": 123}}})
        assert status == 409 and body["error"]["code"] == "config_file_conflict", body
        assert "empty" in body["error"]["message"] and path.name in body["error"]["message"]
        assert path.read_text() == empty and not bak.exists()
        assert admin(srv, "GET", "/admin/settings")[1]["defaults"]["queue.aging_ms"] != 123


def test_saving_settings_never_loses_the_operators_comments(served: Any) -> None:
    """Found by an operator-side probe: two PATCHes of `{}` destroyed the file's comments for
    good, the first moving them to the .bak, the second replacing the .bak with its own copy. A
    PATCH that changes nothing writes nothing; a save replaces the .bak only when the file on disk
    is not the program's own copy, so the .bak keeps the operator's last hand-written file."""
    start, path = served
    srv = start()
    bak = path.parent / "appliance.yaml.bak"
    hand_written = path.read_text()
    nothing = {"models": {MODEL: {"batching": {"max_batch_size": None}}}}  # no such override
    for body in ({}, {}, {"defaults": {}}, nothing):
        status, view = admin(srv, "PATCH", "/admin/settings", body)
        assert status == 200 and view["models"][MODEL]["batching.max_batch_size"] == 16, view
    assert path.read_text() == hand_written and not bak.exists()
    for size in (4, 8, 2):
        status, _ = admin(
            srv, "PATCH", "/admin/settings", {"models": {MODEL: {"batching": {"max_batch_size": size}}}}
        )
        assert status == 200
    assert bak.read_text() == hand_written, "the operator's file, not the program's first copy"
    assert yaml.safe_load(path.read_text())["models"][MODEL]["batching"]["max_batch_size"] == 2
    assert "appliance.yaml.bak" in path.read_text().splitlines()[0], "the file says where its comments went"
    # Edited by hand again, the file is the operator's: the next save keeps that edit as the .bak.
    path.write_text(path.read_text() + "# batch of 2 for the night shift\n")
    assert admin(srv, "PATCH", "/admin/settings", {"defaults": {"queue": {"aging_ms": 50}}})[0] == 200
    assert "night shift" in bak.read_text() and "night shift" not in path.read_text()


def test_a_patch_never_reverts_an_edit_on_disk_that_is_not_reloaded(served: Any) -> None:
    """Found by an operator-side probe: with defaults edited in the file but not reloaded yet, a
    PATCH of an unrelated model override rewrote the file's defaults from memory, silently
    reverting the edit. It is a 409 that says to reload first, and nothing is written or applied;
    once reloaded, the same PATCH is saved beside the edit."""
    start, path = served
    srv = start()
    raw = yaml.safe_load(path.read_text())
    raw["defaults"] = {"queue": {"default_priority": 1}}
    edited = "# priority 1 by default from Monday\n" + yaml.safe_dump(raw)
    path.write_text(edited)
    change = {"models": {MODEL: {"batching": {"max_batch_size": 4}}}}
    status, body = admin(srv, "PATCH", "/admin/settings", change)
    assert status == 409 and body["error"]["code"] == "config_file_conflict", body
    message = body["error"]["message"]
    assert "defaults" in message and "systemctl reload appliance" in message and "SIGHUP" in message
    assert path.read_text() == edited and not (path.parent / "appliance.yaml.bak").exists()
    assert admin(srv, "GET", "/admin/settings")[1]["models"][MODEL]["batching.max_batch_size"] == 16
    assert srv.server is not None and srv.call(srv.server.reload) is True
    status, body = admin(srv, "PATCH", "/admin/settings", change)
    assert status == 200, body
    saved = yaml.safe_load(path.read_text())
    assert saved["defaults"] == {"queue": {"default_priority": 1}}
    assert saved["models"][MODEL]["batching"]["max_batch_size"] == 4


def slow_settings_saves(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """A test-only hook: each PATCH's save of the settings file is slow in its last step (a slow
    fsync). The first event is set once a save has written the file; the save then waits for
    the second (30 s at most)."""
    from appliance.config import save_settings

    saved, gate = threading.Event(), threading.Event()

    def slow_save(*args: Any) -> None:
        save_settings(*args)
        saved.set()
        gate.wait(30)

    monkeypatch.setattr(admin_api, "save_settings", slow_save)
    return saved, gate


def test_a_reload_during_a_patchs_save_runs_after_it_and_is_not_undone(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an operator-side probe: a SIGHUP while a PATCH's save was in its thread (a slow
    fsync) applied the file, and the PATCH then applied the values it had planned from the old
    ones, reverting the reload's: the server ran queue.aging_ms 0 while the file said 7. The reload
    takes the settings lock, as a PATCH does: it runs once the PATCH is done, and what runs is
    what the file says."""
    start, path = served
    srv = start()
    saved, gate = slow_settings_saves(monkeypatch)
    change = {"models": {MODEL: {"batching": {"max_batch_size": 4}}}}
    answers: list[tuple[int, Any]] = []
    patch = threading.Thread(target=lambda: answers.append(admin(srv, "PATCH", "/admin/settings", change)))
    patch.start()
    assert saved.wait(10)
    raw = yaml.safe_load(path.read_text())  # the PATCH's file, edited by the operator, reloaded
    raw["defaults"] = {"queue": {"aging_ms": 7}}
    path.write_text(yaml.safe_dump(raw))
    assert srv.server is not None
    srv.call(srv.server.reload)
    gate.set()
    patch.join(30)
    assert answers and answers[0][0] == 200, answers
    deadline = time.monotonic() + 10
    while (current := admin(srv, "GET", "/admin/settings")[1])["defaults"]["queue.aging_ms"] != 7:
        assert time.monotonic() < deadline, f"the reload was undone: {current['overrides']}"
        time.sleep(0.05)
    assert current["models"][MODEL]["batching.max_batch_size"] == 4


def test_an_unload_during_a_load_waits_for_it_and_unloads(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an operator-side probe: an unload while the model was loading answered 200
    "loading" and did nothing, and the model ended resident. The unload waits for the load and
    then unloads, answering the final state; a load that outlasts the wait is a 409 saying the
    model is still loading, and the unload is not half done."""
    import threading

    from appliance.api import admin as admin_api

    start, _ = served
    srv = start()
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    gate = slow_loads(monkeypatch)

    def state() -> str:
        return str(admin(srv, "GET", "/admin/stats")[1]["models"][MODEL]["state"])

    def in_background(path: str) -> tuple[threading.Thread, list[tuple[int, Any]]]:
        answers: list[tuple[int, Any]] = []
        thread = threading.Thread(target=lambda: answers.append(admin(srv, "POST", path)))
        thread.start()
        return thread, answers

    def load_started() -> threading.Thread:
        loader, _ = in_background(f"/admin/models/{MODEL}/load")
        deadline = time.monotonic() + 10
        while state() != "loading":
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.05)
        return loader

    # Past the wait: a 409, and the load goes on to make the model resident.
    monkeypatch.setattr(admin_api, "UNLOAD_WAITS_FOR_LOAD_S", 0.3)
    loader = load_started()
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/unload")
    assert status == 409 and body["error"]["code"] == "model_loading", body
    assert "still loading" in body["error"]["message"] and body["error"]["param"] == "model"
    gate.set()
    loader.join(30)
    assert state() == "resident"

    # Within the wait: the unload answers once the load is done, with the model unloaded.
    monkeypatch.setattr(admin_api, "UNLOAD_WAITS_FOR_LOAD_S", 30.0)
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    gate.clear()
    loader = load_started()
    unloader, answers = in_background(f"/admin/models/{MODEL}/unload")
    time.sleep(0.5)
    assert unloader.is_alive(), f"the unload answered before the load was done: {answers}"
    gate.set()
    unloader.join(30)
    loader.join(30)
    assert answers[0][0] == 200 and answers[0][1]["state"] == "available", answers
    assert state() == "available"


def test_a_hung_engine_open_fails_its_load_at_the_load_timeout_and_is_not_opened_again_beside_it(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a fault probe: a load whose engine open hung (a stalled disk, a wedged driver) was
    waited for without a bound. The admin load never answered, and the load held the load lock,
    so every later load, and each request waiting on one, waited for ever too. Past
    engine.load_timeout_s the load fails, naming it (the admin load and requests get a 503 with
    Retry-After), and the engine the hung open brings at last is closed. Found by a lifecycle
    probe: the next load of that model then opened a second engine beside the stuck open (its
    memory twice, once counted); it is refused until the stuck call ends, then loads."""
    from appliance.models import ModelManager
    from tests.conftest import FaultyEngine

    start, _ = served
    srv = start()
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    timeout = {"models": {MODEL: {"engine": {"load_timeout_s": 1}}}}
    assert admin(srv, "PATCH", "/admin/settings", timeout)[0] == 200
    gate, closed = threading.Event(), threading.Event()
    original = ModelManager._open_engine

    class Late(FaultyEngine):
        def close(self) -> None:
            super().close()
            closed.set()

    def hung_open(entry: Any, values: Any) -> Any:  # test-only hook: an open that hangs
        gate.wait(30)
        return Late(original(entry, values))

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(hung_open))
    started = time.monotonic()
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/load")
    assert status == 503 and "engine.load_timeout_s" in body["error"]["message"], body
    assert time.monotonic() - started < 10
    status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "meanwhile"})
    assert status == 503 and "engine.load_timeout_s" in body["error"]["message"], body
    assert "Retry-After" in headers
    model = admin(srv, "GET", "/admin/stats")[1]["models"][MODEL]
    assert model["state"] == "failed" and "engine.load_timeout_s" in model["error"], model

    # The hung open still runs: the next load (given the default's time) is refused at once,
    # rather than opening a second engine beside it.
    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(original))
    no_timeout = {"models": {MODEL: {"engine": {"load_timeout_s": None}}}}
    assert admin(srv, "PATCH", "/admin/settings", no_timeout)[0] == 200
    started = time.monotonic()
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/load")
    assert status == 503 and "is still running" in body["error"]["message"], body
    assert time.monotonic() - started < 5
    # Once it ends, its engine is closed and the model loads again.
    gate.set()
    assert closed.wait(10), "the engine the timed-out load opened at last was not closed"
    deadline = time.monotonic() + 10
    while (answer := admin(srv, "POST", f"/admin/models/{MODEL}/load"))[0] == 503:
        # The refusal lifts once that close has returned (its thread's end reaches the loop).
        assert "is still running" in answer[1]["error"]["message"] and time.monotonic() < deadline, answer
        time.sleep(0.05)
    status, body = answer
    assert status == 200 and body["state"] == "resident", body
    assert srv.post("/v1/embeddings", {"model": MODEL, "input": "after"})[0] == 200


def test_a_load_longer_than_the_admin_wait_is_answered_202_and_goes_on(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that takes longer than the admin request waits (LOAD_WAIT_S, within the console's
    300 s) is answered 202 "still loading", saying where to follow it, and the load goes on to
    make the model resident: a client's own timeout said nothing of what became of it."""
    from appliance.api import admin as admin_api

    start, _ = served
    srv = start()
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    gate = slow_loads(monkeypatch)
    monkeypatch.setattr(admin_api, "LOAD_WAIT_S", 0.3)
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/load")
    assert status == 202 and body["state"] == "loading", body
    assert "GET /admin/stats" in body["message"]
    gate.set()
    deadline = time.monotonic() + 30
    while admin(srv, "GET", "/admin/stats")[1]["models"][MODEL]["state"] != "resident":
        assert time.monotonic() < deadline, "the load did not go on"
        time.sleep(0.05)


def test_an_unload_behind_a_long_drain_is_answered_202_and_the_drain_goes_on(
    start_server: Any, minilm_folder: Path, faulty: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an operator-side probe: an unload waited for the model's whole drain, which
    behind a long generation lasts minutes: the console's 60 s ran out first, saying nothing of
    the unload. Past UNLOAD_DRAIN_WAIT_S it is answered 202 "unloading"; the running work still
    ends with its answer, and the unload completes."""
    from appliance.api import admin as admin_api
    from appliance.api.common import MANAGER

    srv = start_server({MODEL: minilm_folder})
    engine = faulty[-1]
    engine.delay_s = 3.0  # the running batch, which the unload drains, takes this long
    ran = len(engine.batches)
    answers: list[Any] = []
    running = threading.Thread(
        target=lambda: answers.append(srv.post("/v1/embeddings", {"model": MODEL, "input": "slow"}))
    )
    running.start()
    deadline = time.monotonic() + 30
    while len(engine.batches) == ran:  # the slow batch is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    monkeypatch.setattr(admin_api, "UNLOAD_DRAIN_WAIT_S", 0.3)
    started = time.monotonic()
    status, body = admin(srv, "POST", f"/admin/models/{MODEL}/unload")
    assert status == 202 and body["state"] == "unloading", body
    assert "GET /admin/stats" in body["message"] and time.monotonic() - started < 2.5
    running.join(30)
    assert answers[0][0] == 200, answers  # the drain was not cut
    deadline = time.monotonic() + 30
    while srv.call(lambda: srv.app[MANAGER].slots[MODEL].unloading) is not None:
        assert time.monotonic() < deadline, "the unload did not complete"
        time.sleep(0.05)
    assert admin(srv, "GET", "/admin/stats")[1]["models"][MODEL]["state"] == "available"


def _admin_raw(srv: ServerThread, head: str, body: bytes = b"") -> bytes:
    """One request over a fresh TCP connection to the admin plane, answered to its end."""
    port = int(srv.admin_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.split(b"\r\n\r\n", 1)[1]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_the_admin_plane_refuses_as_the_data_plane_does_in_its_own_shape(served: Any) -> None:
    """Found by fuzzing the admin plane at the HTTP level: it had none of the data plane's front
    door. A request the HTTP parser refuses (a header line too long, a malformed Content-Length)
    and an unknown Expect were answered in aiohttp's text/plain (the long header a 400, not 431);
    404 and 405 said only "405: Method Not Allowed"; a Content-Length over the limit was waited
    for until the read deadline (408) instead of a 413 at once; a br body was a 400 "not valid br
    data" and a zstd one a text/plain 400 telling to install a package, not the 415; a body sent
    as "gzip, gzip" was taken undecoded (200); and a client without the token that asked first
    (Expect: 100-continue) was told to send its body before its 401. Each now answers as the
    data plane does, in the admin API's JSON shape."""
    start, _ = served
    srv = start()
    assert srv.server is not None
    auth = f"Authorization: Bearer {srv.server.admin_token}\r\n"

    def refused(reply: bytes, status: int) -> dict[str, Any]:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == str(status).encode(), reply[:300]
        assert b"application/json" in head, head
        error = json.loads(body)["error"]
        assert isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error), body
        return dict(error)

    get = "GET /admin/settings HTTP/1.1\r\nHost: x\r\n" + auth
    assert (
        "could not be parsed"
        in refused(_admin_raw(srv, get + "X-Long: " + "a" * 9000 + "\r\n"), 431)["message"]
    )
    patch = "PATCH /admin/settings HTTP/1.1\r\nHost: x\r\n" + auth
    assert refused(_admin_raw(srv, patch + "Content-Length: -1\r\n"), 400)["code"] == "malformed_request"
    assert (
        "only 100-continue"
        in refused(_admin_raw(srv, patch + "Expect: gimme\r\nContent-Length: 2\r\n", b"{}"), 417)["message"]
    )
    error = refused(
        _admin_raw(srv, "PUT /admin/settings HTTP/1.1\r\nHost: x\r\n" + auth + "Content-Length: 0\r\n"), 405
    )
    assert error["message"] == "PUT is not allowed on /admin/settings; it takes GET, HEAD, PATCH"
    assert refused(_admin_raw(srv, "GET /admin/nope HTTP/1.1\r\nHost: x\r\n" + auth), 404)["message"] == (
        "no route for GET /admin/nope"
    )
    started = time.monotonic()
    error = refused(_admin_raw(srv, patch + "Content-Length: 99999999999\r\n"), 413)
    assert "99999999999 bytes" in error["message"] and time.monotonic() - started < 4
    for encoding in ("br", "zstd", "gzip, gzip"):
        error = refused(
            _admin_raw(srv, patch + f"Content-Encoding: {encoding}\r\nContent-Length: 2\r\n", b"{}"), 415
        )
        assert error["code"] == "unsupported_content_encoding", (encoding, error)
    # Nor is a request that no route takes (aiohttp's own 404 or 405 asked for it).
    for expect in ("100-continue", "gimme"):
        put = (
            "PUT /admin/settings HTTP/1.1\r\nHost: x\r\n"
            + auth
            + f"Expect: {expect}\r\nContent-Length: 2\r\n"
        )
        assert refused(_admin_raw(srv, put), 405)["message"].startswith("PUT is not allowed")
    # Without the token, a client that asks first is refused at once, not asked for its body.
    reply = _admin_raw(
        srv, "PATCH /admin/settings HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
    )
    assert refused(reply, 401)["code"] == "admin_token_required"
    # With it, it is asked, and served.
    port = int(srv.admin_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (patch + "Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n").encode()
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"{}")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert admin(srv, "GET", "/admin/settings")[0] == 200


def test_a_client_that_hangs_up_mid_body_is_no_unhandled_error(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by fuzzing: a PATCH whose client closed the connection halfway through its body
    was logged as an unhandled error with a traceback (the data plane counts it a 499)."""
    start, _ = served
    srv = start()
    assert srv.server is not None
    port = int(srv.admin_url.rsplit(":", 1)[1])
    with caplog.at_level(logging.ERROR):
        for cut in (0, 10):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                (
                    f"PATCH /admin/settings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {srv.server.admin_token}\r\n"
                    "Content-Length: 1000\r\n\r\n"
                ).encode()
                + b'{"defaults": {}}'[:cut]
            )
            time.sleep(0.2)  # the route is reading the rest when the client goes
            sock.close()
        time.sleep(0.5)
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert admin(srv, "GET", "/admin/settings")[0] == 200


def test_a_settings_change_checks_each_kind_of_model_once_and_answers_for_every_model(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """With 2,000 models a PATCH held the event loop ~300 ms and a GET ~120 ms: every model's
    combination of settings was checked afresh, though most models share theirs, every model's
    batcher policy rebuilt though its values had not changed, and every model's source of every
    setting worked out one by one. Each distinct combination is checked once and only the models
    whose values changed are re-applied; the answer still gives every model its values and their
    sources, and a combination refused is named for each model that has it."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    src = build_tensor_model(
        tmp_path / "src" / "ident", [helper.make_node("Identity", ["x"], ["y"])], [x], [y]
    )
    names = [f"m{i:02d}" for i in range(12)]
    overrides: dict[str, dict[str, Any]] = {n: {"name": n} for n in names}
    overrides["m00"]["queue"] = {"max_queue_size": 7}  # a model.yaml setting of its own
    srv = start_server({n: src for n in names}, overrides=overrides)
    checked = [0]
    real = admin_api.validate_model_settings

    def validate_model_settings(values: dict[str, Any]) -> None:
        checked[0] += 1
        real(values)

    monkeypatch.setattr(admin_api, "validate_model_settings", validate_model_settings)
    applied: list[str] = []
    real_apply = models.ModelManager.apply

    def apply(mgr: models.ModelManager, name: str) -> None:
        applied.append(name)
        real_apply(mgr, name)

    monkeypatch.setattr(models.ModelManager, "apply", apply)
    status, view = admin(
        srv, "PATCH", "/admin/settings", {"models": {"m01": {"queue": {"max_queue_size": 9}}}}
    )
    assert status == 200, view
    assert checked[0] == 3  # the ten alike, m00 with its model.yaml's setting, m01 with its override
    assert applied == ["m01"]  # the one model whose values changed gets them pushed to its batcher
    size = "queue.max_queue_size"
    assert (view["models"]["m00"][size], view["sources"]["m00"][size]) == (7, "model.yaml")
    assert (view["models"]["m01"][size], view["sources"]["m01"][size]) == (9, "override")
    default = view["defaults"][size]
    assert all(
        (view["models"][n][size], view["sources"][n][size]) == (default, "registry") for n in names[2:]
    )
    assert all(view["sources"][n]["batching.max_batch_size"] == "model.yaml" for n in names)
    status, got = admin(srv, "GET", "/admin/settings")
    assert status == 200 and {k: got[k] for k in ("models", "sources")} == {
        k: view[k] for k in ("models", "sources")
    }
    # A default no model can take is refused for each of them, by name.
    status, err = admin(srv, "PATCH", "/admin/settings", {"defaults": {"queue": {"default_priority": 9}}})
    assert status == 400, err
    assert sorted(p["model"] for p in err["error"]["problems"]) == names, err


def test_an_unload_whose_engine_close_hangs_stalls_no_request_and_ends_at_its_bound(
    start_server: Any, minilm_folder: Path, faulty: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a lifecycle probe: an unload closed the engine on the event loop, so an engine
    whose close blocked (a hung driver freeing its memory) froze the whole process: /healthz,
    every request and the admin plane waited on it. The close runs on a thread now, waited for
    at most CLOSE_WAIT_S; then the unload goes on, and the model loads fresh at its next request."""
    import threading

    monkeypatch.setattr(models, "CLOSE_WAIT_S", 2.0)
    srv = start_server({MODEL: minilm_folder})
    engine = faulty[-1]
    closing, gate = threading.Event(), threading.Event()

    def hung_close() -> None:  # test-only fault hook: a driver that does not give the memory back
        closing.set()
        gate.wait(30)

    engine.close = hung_close
    answers: list[tuple[int, Any]] = []
    unload = threading.Thread(
        target=lambda: answers.append(admin(srv, "POST", f"/admin/models/{MODEL}/unload"))
    )
    unload.start()
    try:
        assert closing.wait(30), "the unload never closed the engine"
        assert_the_loop_answers(srv)
        unload.join(30)
        assert answers and answers[0][0] == 200 and answers[0][1]["state"] == "available", answers
        assert srv.post("/v1/embeddings", {"model": MODEL, "input": "after"})[0] == 200
        assert len(faulty) == 2, "the next request did not load a fresh engine"
    finally:
        gate.set()
        unload.join(30)


def test_the_managers_close_waits_for_an_unload_still_draining(
    start_server: Any, minilm_folder: Path, faulty: Any
) -> None:
    """Found by a lifecycle probe: an operator's unload still draining the model's running work
    at shutdown was not waited for by ModelManager.close (the unload had taken the runtime from
    the slot, so close's own unload skipped it): the stop went on, and the loop closed under the
    drain, its engine never closed nor its memory released. The close waits for it now."""
    import threading

    from appliance.api.common import MANAGER

    srv = start_server({MODEL: minilm_folder})
    mgr = srv.app[MANAGER]
    engine = faulty[-1]
    closed = threading.Event()
    close = engine.close

    def recorded_close() -> None:
        close()
        closed.set()

    engine.close = recorded_close
    running = start_a_slow_batch(srv, engine, 2.0)  # which the unload drains

    async def unload_then_close() -> bool:
        unloading = asyncio.ensure_future(mgr.unload(MODEL))  # as the admin plane runs one
        await asyncio.sleep(0)  # it starts: draining the running batch
        assert mgr.slots[MODEL].unloading is not None and not unloading.done()
        await mgr.close()
        return unloading.done()

    assert srv.call(unload_then_close), "the close returned while the unload still drained"
    assert closed.is_set() and mgr.memory.lease(MODEL) is None
    running.join(30)


def test_a_failed_load_whose_engine_close_hangs_stalls_no_request(
    start_server: Any, minilm_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a lifecycle probe: a load that failed after its engine opened (its warm-up raised)
    closed that engine on the event loop, so a close that blocked (a hung driver) froze every
    request and /healthz with it. It is closed as an unload's is: on a thread, bounded by
    CLOSE_WAIT_S; the load's 503 names what failed."""
    import threading

    from appliance import inference
    from appliance.models import ModelManager
    from tests.conftest import FaultyEngine

    srv = start_server({MODEL: minilm_folder})
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    monkeypatch.setattr(models, "CLOSE_WAIT_S", 2.0)
    closing, gate = threading.Event(), threading.Event()
    original = ModelManager._open_engine

    class HungClose(FaultyEngine):  # test-only fault hook: a driver that does not give memory back
        def close(self) -> None:
            closing.set()
            gate.wait(30)
            super().close()

    def failed_warm_up(self: Any) -> None:  # test-only fault hook: a warm-up that raises
        raise RuntimeError("injected warm-up failure")

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(lambda e, v: HungClose(original(e, v))))
    monkeypatch.setattr(inference.EmbeddingRuntime, "warmup_peak", failed_warm_up)
    answers: list[tuple[int, Any]] = []
    load = threading.Thread(target=lambda: answers.append(admin(srv, "POST", f"/admin/models/{MODEL}/load")))
    load.start()
    try:
        assert closing.wait(30), "the failed load never closed its engine"
        assert_the_loop_answers(srv)
        load.join(30)
        status, body = answers[0]
        assert status == 503 and "injected warm-up failure" in body["error"]["message"], answers
    finally:
        gate.set()
        load.join(30)


def test_the_engine_of_a_timed_out_load_is_closed_off_the_event_loop(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a lifecycle probe: the engine a timed-out load's open brought at last was closed
    in a callback on the event loop, so a close that blocked (the driver that hung the open,
    hanging again) froze every request and /healthz with it. It is closed on a thread."""

    from appliance.models import ModelManager
    from tests.conftest import FaultyEngine

    start, _ = served
    srv = start()
    assert admin(srv, "POST", f"/admin/models/{MODEL}/unload")[1]["state"] == "available"
    timeout = {"models": {MODEL: {"engine": {"load_timeout_s": 1}}}}
    assert admin(srv, "PATCH", "/admin/settings", timeout)[0] == 200
    opened, closing, released = threading.Event(), threading.Event(), threading.Event()
    original = ModelManager._open_engine

    class HungClose(FaultyEngine):  # test-only fault hook: a close that hangs in the driver
        def close(self) -> None:
            closing.set()
            released.wait(30)
            super().close()

    def hung_open(entry: Any, values: Any) -> Any:  # test-only fault hook: an open that hangs
        opened.wait(30)
        return HungClose(original(entry, values))

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(hung_open))
    try:
        status, body = admin(srv, "POST", f"/admin/models/{MODEL}/load")
        assert status == 503 and "engine.load_timeout_s" in body["error"]["message"], body
        opened.set()  # the open ends: its engine is closed, and that close hangs
        assert closing.wait(10), "the engine the timed-out load opened at last was not closed"
        assert_the_loop_answers(srv)
    finally:
        opened.set()
        released.set()


def test_an_unload_whose_caller_gives_up_still_closes_the_engine_and_releases_its_memory(
    start_server: Any, minilm_folder: Path, faulty: Any
) -> None:
    """Found by a lifecycle probe: an engine replacement (the breaker's restart) bounds its unload,
    and the bound cancelled the unload midway, after the model was detached and before its engine
    closed: the lease was never released (the model kept its memory in /admin/stats while
    unloaded) and the next request loaded a second engine beside the one still closing. The
    unload's end runs to completion whoever gave up on it; meanwhile requests are told to come
    back (503, Retry-After), and once the old engine is closed the model loads fresh."""
    from appliance.api.common import MANAGER

    srv = start_server({MODEL: minilm_folder})
    mgr = srv.app[MANAGER]
    engine = faulty[-1]
    closing, gate, closed = threading.Event(), threading.Event(), threading.Event()
    close = engine.close

    def slow_close() -> None:  # test-only fault hook: a driver slow to give memory back
        closing.set()
        gate.wait(30)
        close()
        closed.set()

    engine.close = slow_close
    try:
        srv.call(lambda: mgr.restart(MODEL, timeout_s=1.0))  # its bound cuts the unload
        assert closing.wait(10), "the unload never reached the engine's close"
        status, body, headers = srv.post("/v1/embeddings", {"model": MODEL, "input": "meanwhile"})
        assert status == 503 and "Retry-After" in headers, (status, body)
        assert len(faulty) == 1, "a second engine was opened beside the one still closing"
    finally:
        gate.set()
    assert closed.wait(30)
    deadline = time.monotonic() + 30
    while srv.call(lambda: mgr.memory.lease(MODEL)) is not None:
        assert time.monotonic() < deadline, "the unloaded model's memory lease was never released"
        time.sleep(0.05)
    assert admin(srv, "GET", "/admin/stats")[1]["memory"]["models"].get(MODEL) is None
    assert srv.post("/v1/embeddings", {"model": MODEL, "input": "after"})[0] == 200
    assert len(faulty) == 2


def test_a_load_stopped_at_shutdown_closes_the_engine_its_open_brings(
    start_server: Any, minilm_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a lifecycle probe: a stop during a model's load (its open slow: a large model, a
    slow disk) cancelled the load, and its cleanup was skipped: the engine the open brought once
    it ended was never closed and its worker never shut down. The manager's close now waits
    (within the stop's deadline) for that call to end, and closes what it opened."""
    from appliance.api.common import MANAGER
    from appliance.models import ModelManager
    from tests.conftest import FaultyEngine

    opening, gate, closed = threading.Event(), threading.Event(), threading.Event()
    original = ModelManager._open_engine

    class Recorded(FaultyEngine):
        def close(self) -> None:
            super().close()
            closed.set()

    def slow_open(entry: Any, values: Any) -> Any:  # test-only fault hook: an open that takes long
        opening.set()
        gate.wait(30)
        return Recorded(original(entry, values))

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(slow_open))
    srv = start_server({MODEL: minilm_folder}, wait_ready=False)
    try:
        assert opening.wait(30)
        assert srv.get("/readyz")[0] == 503  # still loading
        task = srv.app[MANAGER].slots[MODEL].load_task
        stopping = threading.Thread(target=srv.stop)
        stopping.start()
        deadline = time.monotonic() + 30
        while not task.cancelling():  # the manager's close has stopped the load
            assert time.monotonic() < deadline, "the stop never reached the load"
            time.sleep(0.01)
    finally:
        gate.set()  # the open ends, after its load was stopped
    stopping.join(30)
    assert not stopping.is_alive()
    assert closed.is_set(), "the engine opened by the stopped load was left open"


def test_a_load_asked_for_while_the_server_drains_is_refused_503(
    start_server, minilm_folder: Path, faulty: Any
) -> None:  # type: ignore[no-untyped-def]
    """An operator's load while the server is stopping is a 503 with Retry-After, as the data
    plane's requests are, and nothing is loaded. Before, it was carried out: a model opened
    (1.1 GB for the chat model) while the drain ran, and an open still running when the drain
    ended made the models' close miss the stop's deadline, its engine left open at the exit."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.api.common import DRAINING, MANAGER

    other = "minilm-other"
    srv = start_server({MODEL: minilm_folder, other: minilm_folder}, overrides={other: {"name": other}})
    assert admin(srv, "POST", f"/admin/models/{other}/unload")[1]["state"] == "available"
    for engine in faulty:
        engine.delay_s = 1.0  # the running request holds the drain
    rows = sum(e.rows for e in faulty)  # (the loads' batch-size measurements ran some)
    body = json.dumps({"model": MODEL, "input": "running"}).encode()
    running = urllib.request.Request(
        srv.url + "/v1/embeddings",
        data=body,
        headers={"Content-Type": "application/json", "Cache-Control": "no-store, no-cache"},
    )
    with ThreadPoolExecutor(1) as pool:
        answered = pool.submit(lambda: urllib.request.urlopen(running, timeout=30).status)
        deadline = time.monotonic() + 10
        while sum(e.rows for e in faulty) == rows:  # the engine has it
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
        assert srv.server is not None
        drained = asyncio.run_coroutine_threadsafe(srv.server.drain(), srv.loop)
        while not srv.app[DRAINING][0]:
            time.sleep(0.01)
        request = urllib.request.Request(
            srv.admin_url + f"/admin/models/{other}/load",
            data=b"",
            method="POST",
            headers={"Authorization": f"Bearer {srv.server.admin_token}"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"]
        error = json.loads(refused.value.read())["error"]
        assert "stopping" in error["message"]
        assert answered.result() == 200, "the running request is answered whole"
    drained.result(10)
    assert srv.call(lambda: srv.app[MANAGER].slots[other].state) == models.ModelState.available
