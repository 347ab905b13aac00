"""Running the server: the LAN data plane and the loopback admin plane, sharing one set of services,
and the process lifecycle under systemd (readiness, watchdog, drain on SIGTERM, reload on SIGHUP).

``appliance serve`` and the tests both start the process through :class:`Server`, so the tests run
exactly what an operator runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.api.admin import ADMIN_TOKEN, create_admin_app
from appliance.api.app import create_app
from appliance.api.common import DRAINING, INFLIGHT, MANAGER, RESILIENCE
from appliance.api.security import KEYS, LimitedRunner, keystore
from appliance.config import Config, ConfigError, load
from appliance.llm.scheduler import Scheduler
from appliance.sdnotify import Notifier, watchdog_loop

log = logging.getLogger(__name__)


class Server:
    def __init__(self, cfg: Config, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.app = create_app(cfg)
        self.admin_app = create_admin_app(self.app)
        self.notifier = Notifier(env)
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.admin_port = 0
        self.admin_socket: Path | None = None
        self.admin_token = ""

    async def start(self) -> None:
        cfg = self.cfg
        data = LimitedRunner(
            self.app,
            max_connections=cfg.server.max_connections,
            handler_cancellation=True,
            shutdown_timeout=cfg.server.drain_timeout_s,
            keepalive_timeout=cfg.server.keepalive_timeout_s,
            access_log=None,
        )
        await data.setup()
        self._runners.append(data)
        site = web.TCPSite(data, cfg.server.host, cfg.server.port, ssl_context=self._tls(), backlog=128)
        await site.start()
        self.port = _bound_port(site)

        self.admin_token = self._admin_token()
        self.admin_app[ADMIN_TOKEN] = self.admin_token
        admin = web.AppRunner(self.admin_app, access_log=None, keepalive_timeout=30)
        await admin.setup()
        self._runners.append(admin)
        path = cfg.admin_socket
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await web.UnixSite(admin, str(path)).start()
            os.chmod(path, 0o660)
            self.admin_socket = path
        if cfg.file.admin.port >= 0:
            asite = web.TCPSite(admin, "127.0.0.1", cfg.file.admin.port)
            await asite.start()
            self.admin_port = _bound_port(asite)
        log.info(
            "serving on %s://%s:%d; admin on 127.0.0.1:%d and %s",
            "https" if cfg.file.tls.certificate else "http",
            cfg.server.host,
            self.port,
            self.admin_port,
            self.admin_socket,
        )
        self._tasks.append(asyncio.create_task(self._announce_ready()))
        self._tasks.append(asyncio.create_task(watchdog_loop(self.notifier, self.app[MANAGER].progress)))

    def _tls(self) -> ssl.SSLContext | None:
        tls = self.cfg.file.tls
        if not tls.certificate:
            return None
        if not tls.key:
            raise ConfigError("tls.key: required when tls.certificate is set")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cfg.base_dir / tls.certificate, self.cfg.base_dir / tls.key)
        return ctx

    async def _announce_ready(self) -> None:
        """READY=1 once the default models can serve; STATUS lines while they load."""
        mgr = self.app[MANAGER]
        while not mgr.ready():
            loading = [n for n, s in mgr.slots.items() if s.state.value == "loading"]
            self.notifier.status("loading " + ", ".join(loading) if loading else "starting")
            self.notifier.extend_timeout(30)
            await asyncio.sleep(0.2)
        self.notifier.ready(f"serving {len(mgr.slots)} models on port {self.port}")

    def _admin_token(self) -> str:
        if self.cfg.file.admin.token:
            return self.cfg.file.admin.token
        data = self.cfg.data_dir
        data.mkdir(parents=True, exist_ok=True)
        path = data / "admin.token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token

    async def drain(self) -> None:
        """Refuse new work (503), answer queued work 503, let running batches and streams finish."""
        self.notifier.stopping("draining")
        self.app[DRAINING][0] = True
        timeout = self.cfg.server.drain_timeout_s
        mgr = self.app[MANAGER]
        started = time.monotonic()
        await asyncio.gather(*(self._shed(s.runtime.batcher) for s in mgr.slots.values() if s.runtime))
        with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError: on 3.10 they differ
            await asyncio.wait_for(
                self.app[INFLIGHT].wait_idle(), max(0.0, timeout - (time.monotonic() - started))
            )
        left = self.app[INFLIGHT].count
        if left:
            log.warning("drain timeout: %d requests still running are cut", left)

    @staticmethod
    async def _shed(queue: Any) -> None:
        """Answer what waits with 503; let running batches and streams finish."""
        try:
            if isinstance(queue, Scheduler):
                await queue.close(drain=False, keep_running=True)
            else:
                await queue.close(drain=False)  # a Batcher never interrupts running batches
        except Exception:
            log.exception("drain: closing a queue failed")

    async def stop(self) -> None:
        if not self.app[DRAINING][0]:
            await self.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    def reload(self) -> bool:
        """SIGHUP: re-read the file with the same validation as at start; keep the old one if bad."""
        path = self.cfg.path
        if path is None:
            return False
        try:
            new = load(path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.status("reload refused: invalid configuration")
            return False
        if new.file.server != self.cfg.file.server or new.file.admin != self.cfg.file.admin:
            log.warning("reload: server and admin sections change only on restart")
        self.cfg.defaults, self.cfg.model_overrides = new.defaults, new.model_overrides
        self.cfg.file.auth = new.file.auth
        self.app[KEYS] = keystore([k.model_dump() for k in new.file.auth.keys])
        mgr, resilience = self.app[MANAGER], self.app[RESILIENCE]
        resilience.configure_cache(self.cfg.tunables_for("", {}))
        mgr.configure_memory()
        for name in mgr.slots:
            mgr.apply(name)
            resilience.configure(name, mgr.tunables(name))
        log.info("configuration reloaded from %s", path)
        self.notifier.status("configuration reloaded")
        return True

    @property
    def ready(self) -> bool:
        return self.app[MANAGER].ready()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


async def serve(cfg: Config) -> None:
    server = Server(cfg)
    # Children (pip during a pull, say) must not talk to systemd in our name.
    os.environ.pop("NOTIFY_SOCKET", None)
    await server.start()
    print(f"appliance: serving on http://{cfg.server.host}:{server.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.0fs)", cfg.server.drain_timeout_s)
    await server.stop()
