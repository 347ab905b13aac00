"""Running the server: the LAN data plane and the loopback admin plane, sharing one set of services.

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
from pathlib import Path

from aiohttp import web

from appliance.api.admin import ADMIN_TOKEN, create_admin_app
from appliance.api.app import create_app
from appliance.api.common import DRAINING, MANAGER
from appliance.config import Config

log = logging.getLogger(__name__)


class Server:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.app = create_app(cfg)
        self.admin_app = create_admin_app(self.app)
        self._runners: list[web.AppRunner] = []
        self.port = 0
        self.admin_port = 0
        self.admin_socket: Path | None = None
        self.admin_token = ""
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.cfg
        data = web.AppRunner(
            self.app,
            handler_cancellation=True,
            shutdown_timeout=cfg.server.drain_timeout_s,
            access_log=None,
        )
        await data.setup()
        self._runners.append(data)
        site = web.TCPSite(data, cfg.server.host, cfg.server.port, backlog=cfg.server.max_connections)
        await site.start()
        self.port = _bound_port(site)

        self.admin_token = self._admin_token()
        self.admin_app[ADMIN_TOKEN] = self.admin_token
        admin = web.AppRunner(self.admin_app, access_log=None)
        await admin.setup()
        self._runners.append(admin)
        if cfg.file.admin.socket:
            path = (cfg.base_dir / cfg.file.admin.socket).resolve()
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
            "serving on http://%s:%d; admin on 127.0.0.1:%d and %s",
            cfg.server.host,
            self.port,
            self.admin_port,
            self.admin_socket,
        )

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

    async def stop(self) -> None:
        """Drain: refuse new work with 503, let accepted work finish, then close everything."""
        self.app[DRAINING][0] = True
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        self.stopped.set()

    @property
    def ready(self) -> bool:
        return self.app[MANAGER].ready()


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


async def serve(cfg: Config) -> None:
    server = Server(cfg)
    await server.start()
    print(f"appliance: serving on http://{cfg.server.host}:{server.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.0fs)", cfg.server.drain_timeout_s)
    await server.stop()
