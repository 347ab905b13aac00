"""Shared fixtures: real models built from their wheels, and a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from aiohttp import web

from appliance.build.pull import pull
from appliance.config import parse
from appliance.engines.base import Engine, EngineError, EngineOutOfMemory, TensorSpec
from appliance.models import ModelManager
from appliance.server import Server

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "engines"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 model, built once (idempotent) in the repository's engines/."""
    return pull("all-minilm-l6-v2", ENGINES)


@pytest.fixture(scope="session")
def smollm_folder() -> Path:
    """The real SmolLM2-135M-Instruct decoder, built once (idempotent) in the repository's engines/."""
    return pull("smollm2-135m-instruct", ENGINES)


class ServerThread:
    """The real aiohttp server, on its own event loop in a thread, listening on 127.0.0.1.

    Running it in a thread lets tests use blocking clients (openai, tritonclient) as LAN apps do.
    """

    def __init__(
        self, config: dict[str, Any], config_path: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.env = env or {}
        config = {"admin": {"port": 0}, **config}
        self.cfg = parse(config, config_path, env={})
        self.server: Server | None = None
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self._started.set()

    @property
    def app(self) -> web.Application:
        assert self.server is not None
        return self.server.app

    @property
    def admin_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.admin_port}"

    async def _serve(self) -> None:
        self.cfg.server.port = 0
        self.cfg.server.drain_timeout_s = 5
        self.server = Server(self.cfg, env=self.env)
        await self.server.start()
        self.port = self.server.port
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await self.server.stop()

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServerThread:
        self._thread.start()
        self._started.wait(timeout)
        if self.error:
            raise self.error
        if wait_ready:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status, body = self.get("/readyz")
                if status == 200:
                    return self
                time.sleep(0.05)
            raise TimeoutError(f"server not ready: {body}")
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (to inspect or poke services) and return its result."""

        async def wrapper() -> Any:
            r = fn()
            return await r if asyncio.iscoroutine(r) else r

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(30)

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw, status, rh = resp.read(), resp.status, dict(resp.headers)
        except urllib.error.HTTPError as err:
            raw, status, rh = err.read(), err.code, dict(err.headers)
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw
        return status, parsed, rh

    def get(self, path: str) -> tuple[int, Any]:
        status, body, _ = self.request("GET", path)
        return status, body

    def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        return self.request("POST", path, body, headers)


def make_repository(
    tmp: Path, models: dict[str, Path], overrides: dict[str, dict[str, Any]] | None = None
) -> Path:
    """A model repository in ``tmp`` whose folders link to built models' artefacts.

    ``overrides`` patches each model's model.yaml, so tests tune queues without touching engines/.
    """
    repo = tmp / "engines"
    repo.mkdir(exist_ok=True)
    for name, folder in models.items():
        dest = repo / name
        dest.mkdir()
        for f in folder.iterdir():
            if f.name == "model.yaml":
                continue
            (dest / f.name).symlink_to(f)
        spec = yaml.safe_load((folder / "model.yaml").read_text())
        for section, values in (overrides or {}).get(name, {}).items():
            if isinstance(values, dict):
                spec.setdefault(section, {}).update(values)
            else:
                spec[section] = values
        (dest / "model.yaml").write_text(yaml.safe_dump(spec))
    return repo


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(
        models: dict[str, Path],
        *,
        overrides: dict[str, dict[str, Any]] | None = None,
        config: dict[str, Any] | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> ServerThread:
        # Each server of a test gets its own repository folder (a test may start several).
        home = tmp_path / f"server-{len(servers)}"
        home.mkdir()
        repo = make_repository(home, models, overrides)
        cfg: dict[str, Any] = {
            "model_repository": str(repo),
            "data_dir": str(tmp_path / "data"),
            "admin": {"port": 0, "socket": str(tmp_path / "data" / "admin.sock")},
        }
        cfg.update(config or {})
        srv = ServerThread(cfg, env=env).start(wait_ready=wait_ready)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()


class FaultyEngine(Engine):
    """Test-only fault hook around a real engine.

    Engine failures (exceptions, hangs, out-of-memory) cannot be produced on demand from a healthy
    ONNX model; this wrapper produces them when a test sets ``mode`` or ``delay_s``.
    """

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.mode: str | None = None
        self.delay_s = 0.0
        self.rows = 0  # sentences that reached the engine
        self.oom_above: int | None = None  # batches with more rows than this run out of memory
        self.batches: list[int] = []
        self.backend = inner.backend
        self.backend_reason = inner.backend_reason

    @property
    def on_gpu(self) -> bool:
        return self.inner.on_gpu

    @property
    def backend_name(self) -> str:
        return self.inner.backend_name

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self.inner.inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self.inner.outputs

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        rows = int(next(iter(feeds.values())).shape[0])
        self.rows += rows
        self.batches.append(rows)
        if self.oom_above is not None and rows > self.oom_above:
            raise EngineOutOfMemory(f"injected: a batch of {rows} does not fit")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.mode == "raise":
            raise EngineError("injected engine failure")
        if self.mode == "oom":
            raise EngineOutOfMemory("injected out of memory")
        return self.inner.run(feeds, output_names)

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FaultyEngine]]:
    engines: list[FaultyEngine] = []
    original = ModelManager._open_engine

    def open_engine(entry: Any, values: Any) -> Engine:
        e = FaultyEngine(original(entry, values))
        engines.append(e)
        return e

    monkeypatch.setattr(ModelManager, "_open_engine", staticmethod(open_engine))
    yield engines


def copy_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


__all__ = ["ENGINES", "FIXTURES", "ROOT", "ServerThread", "copy_fixture", "make_repository", "shutil"]
