"""The fault matrix: for each stage of the request pipeline, an injected exception, an injected
hang, and a client that hangs up during that stage, under both cache durabilities.

Every request must end (an answer, a fallback, or an error in the API's shape) within its
deadline + 1 s; the next request must be answered; nothing may be left in flight. The faults are
injected by replacing one live object's method on the running server (test-only fault hooks:
the real stages cannot be made to fail on demand); everything else is the real server, model,
SQLite cache and HTTP over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.api.common import MANAGER, RESILIENCE
from appliance.api.security import KEYS
from appliance.auth import KeyStore
from tests.conftest import ServerThread, make_repository

MODEL = "all-minilm-l6-v2"
DEADLINE_MS = 1500
STAGES = ("auth", "cache_read", "breaker", "admission", "engine", "cache_write")
FAULTS = ("raise", "hang", "hangup")


class Injected(RuntimeError):
    pass


async def _forever(*args: Any, **kwargs: Any) -> Any:
    await asyncio.sleep(3600)


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected fault")


async def _araise(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected fault")


@pytest.fixture(scope="module", params=["NORMAL", "FULL"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, minilm_folder: Path
) -> Iterator[tuple[ServerThread, str]]:
    tmp = tmp_path_factory.mktemp(f"matrix-{request.param}")
    store = KeyStore()
    key, _ = store.add("app")
    repo = make_repository(tmp, {MODEL: minilm_folder}, {MODEL: {"engine": {"timeout_ms": 1000}}})
    cfg = {
        "model_repository": str(repo),
        "data_dir": str(tmp / "data"),
        "admin": {"port": 0, "socket": str(tmp / "data" / "admin.sock")},
        "auth": {"keys": store.to_records()},
        "defaults": {"cache": {"synchronous": request.param}},
    }
    srv = ServerThread(cfg).start()
    yield srv, key
    srv.stop()


class Faults:
    """Replaces one stage's method on the live server and puts it back."""

    def __init__(self, srv: ServerThread) -> None:
        self.srv = srv
        self.undo: list[Callable[[], None]] = []

    def patch(self, obj: Any, name: str, value: Any) -> None:
        had = name in vars(obj)
        old = vars(obj).get(name)

        def restore() -> None:
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        setattr(obj, name, value)
        self.undo.append(restore)

    def inject(self, stage: str, fault: str) -> None:
        app = self.srv.app
        hang = fault in ("hang", "hangup")
        if stage == "auth":
            self.patch(app[KEYS], "authenticate_async", _forever if hang else _araise)
        elif stage == "cache_read":
            self.patch(app[RESILIENCE].cache, "get", _forever if hang else _araise)
        elif stage == "breaker":
            breaker = app[RESILIENCE].breaker(MODEL, app[MANAGER].tunables(MODEL))
            if hang:  # acquire() is synchronous: a "hang" is the engine call it guards hanging
                self.patch(app[MANAGER].slots[MODEL].runtime.batcher, "submit", _forever)
            else:
                self.patch(breaker, "acquire", _raise)
        elif stage == "admission":
            self.patch(app[MANAGER].slots[MODEL].runtime.batcher, "submit", _forever if hang else _araise)
        elif stage == "engine":
            engine = app[MANAGER].slots[MODEL].runtime.engine
            # A hung engine thread: the run blocks past engine.timeout_ms (1 s), then returns.
            self.patch(engine, "run", _slow(engine.run, 2.5) if hang else _raise)
        elif stage == "cache_write":
            cache = app[RESILIENCE].cache
            self.patch(cache, "put", _raise if not hang else (lambda *a, **k: time.sleep(0)))
            self.patch(cache, "put_and_wait", _forever if hang else _araise)

    def clear(self) -> None:
        while self.undo:
            self.undo.pop()()


def _slow(run: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return run(*args, **kwargs)

    return slow


def post(port: int, key: str, text: str, *, timeout: float) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = json.dumps({"model": MODEL, "input": text}).encode()
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "X-Timeout-Ms": str(DEADLINE_MS),
    }
    try:
        conn.request("POST", "/v1/embeddings", body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def inflight(srv: ServerThread) -> float:
    _, text = srv.get("/metrics")
    for line in text.decode().splitlines():
        if line.startswith('appliance_inflight_requests{api="openai"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_request_ends_and_the_next_is_answered(
    served: tuple[ServerThread, str], stage: str, fault: str
) -> None:
    srv, key = served
    faults = Faults(srv)
    srv.call(lambda: faults.inject(stage, fault))
    text = f"{stage} {fault} {time.monotonic()}"  # never cached before
    started = time.monotonic()
    try:
        if fault == "hangup":
            # The client gives up mid-stage (unless the stage does not wait: NORMAL durability
            # never waits for a cache write).
            with contextlib.suppress(socket.timeout, TimeoutError):
                post(srv.port, key, text, timeout=0.3)
        else:
            status, headers, body = post(srv.port, key, text, timeout=30)
            elapsed = time.monotonic() - started
            assert elapsed < DEADLINE_MS / 1000 + 1.0, (stage, fault, elapsed, status, body)
            if status != 200:  # an error in the API's own shape, and a 503 says when to retry
                assert set(body["error"]) >= {"message", "type", "code"}, body
                if status == 503:
                    assert int(headers["Retry-After"]) >= 1
            assert status in (200, 500, 503), (status, body)
    finally:
        srv.call(faults.clear)
    # The next request is answered (an engine thread that was hung may first finish its batch).
    deadline = time.monotonic() + 10
    while True:
        status, _, body = post(srv.port, key, f"next after {stage} {fault} {time.monotonic()}", timeout=30)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, body
    for _ in range(50):  # and nothing is left in flight
        if inflight(srv) == 0:
            break
        time.sleep(0.1)
    assert inflight(srv) == 0
    assert srv.get("/readyz")[0] == 200
