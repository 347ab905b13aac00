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
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance import settings, yamlfile
from appliance.api.admin import ADMIN_TOKEN, SETTINGS_LOCK, create_admin_app
from appliance.api.app import create_app
from appliance.api.common import (
    CLOSE_RESERVE_S,
    DRAINING,
    INFLIGHT,
    MANAGER,
    RESILIENCE,
    STOP,
    SUPERVISOR,
    StopClock,
)
from appliance.api.security import KEYS, LimitedRunner, UnlingeringRunner, cut_unsent, keystore
from appliance.batcher import Batcher
from appliance.config import Config, ConfigError, parse
from appliance.llm.scheduler import Scheduler
from appliance.sdnotify import Notifier, watchdog_loop
from appliance.timeouts import within

log = logging.getLogger(__name__)
SEND_GRACE_S = 1.0  # after the drain: for the last bytes it had the handlers write


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
        # The stop's one deadline, shared with the app's cleanup (the models', the cache's): set
        # by the drain, brought in by a second SIGINT or SIGTERM (see StopClock).
        self.clock: StopClock = self.app[STOP]
        self.cut_by: int | None = None  # that signal's number
        self._queued_reload: asyncio.Task[None] | None = None  # see reload

    async def start(self) -> None:
        cfg = self.cfg
        # Per-model settings that do not combine refuse the start, as they refuse a reload and
        # as check-config reports them: started anyway, the model failed its first request with
        # a 503 and the service looked healthy to systemd.
        mgr = self.app[MANAGER]
        mgr.rescan()
        problems = mgr.settings_problems(cfg)
        if problems:
            where = cfg.path or "built-in defaults"
            raise ConfigError(f"{where}: " + "; ".join(problems))
        data = LimitedRunner(
            self.app,
            max_connections=cfg.server.max_connections,
            send_timeout_s=cfg.server.send_timeout_s,
            handler_cancellation=True,
            shutdown_timeout=cfg.server.drain_timeout_s,
            keepalive_timeout=cfg.server.keepalive_timeout_s,
            access_log=None,
        )
        await data.setup()
        self._runners.append(data)
        self.app[SUPERVISOR].task("send-timeout", data.reap_stalled_sends)
        site = _Site(
            data,
            cfg.server.host,
            cfg.server.port,
            ssl_context=tls_context(cfg),
            backlog=128,
            handshake_timeout_s=cfg.server.keepalive_timeout_s,
        )
        try:
            await site.start()
        except socket.gaierror as exc:  # said only "Name or service not known", naming nothing
            raise _host_error(cfg, exc) from None
        self.port = _bound_port(site)

        self.admin_token = self._admin_token()
        self.admin_app[ADMIN_TOKEN] = self.admin_token
        admin = UnlingeringRunner(self.admin_app, access_log=None, keepalive_timeout=30)
        await admin.setup()
        self._runners.append(admin)
        path = cfg.admin_socket
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            # The socket is created with its final mode: a chmod after bind would leave a window
            # in which any local user could connect without a token.
            old = os.umask(0o117)
            try:
                await web.UnixSite(admin, str(path)).start()
            finally:
                os.umask(old)
            os.chmod(path, 0o660)
            self.admin_socket = path
        if cfg.file.admin.port >= 0:
            asite = web.TCPSite(admin, "127.0.0.1", cfg.file.admin.port)
            await asite.start()
            self.admin_port = _bound_port(asite)
        admin_on = [f"127.0.0.1:{self.admin_port}"] if self.admin_port else []
        admin_on += [str(self.admin_socket)] if self.admin_socket is not None else []
        log.info(
            "serving on %s; admin on %s",
            self.url,
            " and ".join(admin_on) or 'nothing (admin.port -1 and admin.socket "": disabled)',
        )
        # Through the supervisor: one that raised used to end silently, and a dead watchdog loop
        # meant systemd killing the process with nothing in the log.
        supervisor = self.app[SUPERVISOR]
        self._tasks.append(supervisor.once("announce-ready", self._announce_ready()))
        self._tasks.append(
            supervisor.once("watchdog", watchdog_loop(self.notifier, self.app[MANAGER].progress))
        )

    async def _announce_ready(self) -> None:
        """READY=1 once the default models can serve; STATUS lines while they load."""
        mgr = self.app[MANAGER]
        while not mgr.ready():
            loading = [n for n, s in mgr.slots.items() if s.state.value == "loading"]
            errors = mgr.readiness_errors()
            # What holds it back, in `systemctl status`: a repository that is not there would
            # otherwise read "starting" for as long as the unit waits.
            self.notifier.status(
                "loading " + ", ".join(loading)
                if loading
                else "not ready: " + errors[0]
                if errors
                else "starting"
            )
            self.notifier.extend_timeout(30)
            await asyncio.sleep(0.2)
        self.notifier.ready(f"serving {len(mgr.slots)} models on port {self.port}")

    def _admin_token(self) -> str:
        if self.cfg.file.admin.token:
            return self.cfg.file.admin.token
        data = self.cfg.data_dir
        path = data / "admin.token"
        try:
            data.mkdir(parents=True, exist_ok=True)
            if path.exists():
                token = path.read_text().strip()
                if token:
                    return token
                # Empty (a crash or a full disk while it was written): every admin call would
                # get a 401 with nothing logged. Written anew.
                log.warning("%s is empty; writing a new admin token", path)
                path.unlink()
            token = secrets.token_urlsafe(24)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        except OSError as exc:
            raise _data_dir_error(data, exc) from None
        return token

    async def drain(self) -> None:
        """Refuse new work (503), answer queued work 503, let running batches and streams finish."""
        self.notifier.stopping("draining")
        self.app[DRAINING][0] = True
        mgr = self.app[MANAGER]
        clock = self.clock
        if clock.ends is None:
            clock.start(self.cfg.server.drain_timeout_s)
        shed = asyncio.gather(*(self._shed(s.runtime.batcher) for s in mgr.slots.values() if s.runtime))
        # Bounded (a hung engine must not hold the shutdown past drain_timeout_s), and not
        # cancelled at the bound: a scheduler may still be streaming.
        await clock.wait(shed, drain=True)
        idle = asyncio.ensure_future(self.app[INFLIGHT].wait_idle())
        await clock.wait(idle, drain=True)
        idle.cancel()
        left = self.app[INFLIGHT].count
        if left:
            # Out of time (or cut short): fail what still runs, so that every stream ends with an
            # error event and [DONE] and every whole request with a 503, before the connections close.
            if clock.cut.is_set():
                log.warning("drain cut by a second signal: %d requests still running are cut", left)
            else:
                log.warning("drain timeout: %d requests still running are cut", left)
            # A second each at most, and only out of what is left of the stop's grace.
            for slot in list(mgr.slots.values()):
                if slot.runtime is not None:
                    queue = slot.runtime.batcher
                    with contextlib.suppress(Exception, asyncio.TimeoutError):
                        await within(asyncio.shield(queue.close(drain=False)), _grace(clock))
                    if isinstance(queue, Batcher):
                        # A batch that did not end even then (a hung engine) is given up, so that
                        # its requests are answered 503 rather than have their connections cut.
                        queue.cut_running()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self.app[INFLIGHT].wait_idle(), _grace(clock))

    def cut(self, signum: int) -> None:
        """A second SIGINT or SIGTERM while draining (a second Ctrl-C): stop at once, not when
        the last stream ends; what still runs is failed as at the drain timeout."""
        if self.cut_by is None:
            log.warning("%s while draining: cutting the drain", signal.Signals(signum).name)
            self.cut_by = signum
            self.clock.cut_short()

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
        elif self.clock.left() == 0 and not self.clock.cut.is_set():
            # Drained earlier, on its own, and its time long spent: what follows (the services'
            # close, the cache's last writes) gets the stop's grace from now, not nothing at all.
            self.clock.start(0.0)
        tasks = [*self._tasks, *([self._queued_reload] if self._queued_reload is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        clock = self.clock
        ends = clock.drain_ends if clock.drain_ends is not None else time.monotonic()
        # Answers still being written (a client reading slowly, or not at all) get what is left of
        # the drain's time, and a second to send what its end wrote (an error event and [DONE]);
        # then they are cut here. Left to aiohttp's shutdown, each such connection held the stop
        # for up to twice more the drain timeout (see security.cut_unsent).
        until = max(time.monotonic() + SEND_GRACE_S, ends)
        # The stop's grace has the last word, less what it keeps for closing the services.
        until = min(until, time.monotonic() + clock.left(CLOSE_RESERVE_S))
        for runner in self._runners:
            cut = await cut_unsent(runner.server, until)
            if cut:
                log.warning("shutdown: %d connections still sending after the drain are cut", cut)
        for runner in reversed(self._runners):
            # A runner's cleanup waits for each connection's handler (a client still trickling
            # its body, a slow reader) up to its shutdown timeout, then cancels it: given the
            # whole drain_timeout_s again (the admin plane's aiohttp's 60 s), a body trickling
            # on either plane held the exit that long after the drain, and past systemd's stop
            # timeout. It gets what is left of the drain's bound (never 0: aiohttp takes 0 for
            # no bound at all). The data plane's cleanup also closes the services, under the
            # same deadline (see api.app._services).
            runner._shutdown_timeout = max(min(ends - time.monotonic(), clock.left(CLOSE_RESERVE_S)), 0.01)
            await runner.cleanup()
        self._runners.clear()

    def reload(self) -> bool:
        """SIGHUP: re-read the file with the same validation as at start; keep the old one if bad.

        Everything that can fail (the file, the key hashes) is checked before anything is swapped,
        and nothing escapes into the signal callback.

        Serialized with the admin plane's settings changes (SETTINGS_LOCK): a reload while a
        PATCH saves in its thread ran between its check and its application, and the PATCH then
        put back the values it had planned from, undoing what the reload applied while the file
        said otherwise. It now runs once that PATCH is done (several SIGHUPs meanwhile, once,
        reading the file as it is then); True only for a reload applied at once."""
        lock = self.admin_app[SETTINGS_LOCK]
        if lock.locked():
            if self._queued_reload is None or self._queued_reload.done():
                log.info("reload: waiting for the settings change being saved")
                # Held in _queued_reload alone (stop cancels it), not added to _tasks: that list
                # lives as long as the server, and every reload queued so kept its finished task.
                self._queued_reload = asyncio.ensure_future(self._reload_after(lock))
            return False
        return self._reload_now()

    async def _reload_after(self, lock: asyncio.Lock) -> None:
        async with lock:
            self._reload_now()

    def _reload_now(self) -> bool:
        path = self.cfg.path
        if path is None:
            return False
        try:
            raw = yamlfile.read(path)
            if not raw:
                # An empty file is most likely one being rewritten (or truncated by a full disk):
                # taken at its word it would reset every setting and drop every API key.
                raise ConfigError(f"{path}: the file is empty")
            new = parse(raw, path.resolve())
            keys = keystore([k.model_dump() for k in new.file.auth.keys])
            # Each value was checked on its own; how a model's values combine (a default priority
            # past its levels) is checked before anything is swapped too: found while applying,
            # it left half the models on the new values and every later PATCH refused.
            problems = self.app[MANAGER].settings_problems(new)
            if problems:
                raise ConfigError(f"{path.name}: " + "; ".join(problems))
        except (ConfigError, ValueError) as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.status("reload refused: invalid configuration")
            return False
        try:
            return self._apply(new, keys, path)
        except Exception:
            log.exception("reload failed while applying; the previous settings may be partly kept")
            return False

    def _apply(self, new: Config, keys: Any, path: Any) -> bool:
        later = _restart_only_changes(self.cfg, new)
        if later:
            log.warning("reload: %s change only on restart", ", ".join(later))
        if self.cfg.file.auth.keys and not new.file.auth.keys and new.file.auth.required is not True:
            log.warning("reload: no API keys are configured any more: the data plane is open to every client")
        self.cfg.defaults, self.cfg.model_overrides = new.defaults, new.model_overrides
        self.cfg.file.auth = new.file.auth
        self.app[KEYS].adopt(keys)
        mgr, resilience = self.app[MANAGER], self.app[RESILIENCE]
        resilience.configure_cache(self.cfg.tunables_for("", {}))
        mgr.configure_memory()
        mgr.rescan()  # new model folders; edited model.yaml files of models not resident
        unknown = sorted(set(new.model_overrides) - set(mgr.slots))
        if unknown:
            log.warning(
                "reload: models.%s: no such model in the repository (kept, unused)", ", models.".join(unknown)
            )
        for name in mgr.slots:
            mgr.apply(name)
            resilience.configure(name, mgr.tunables(name))
        log.info("configuration reloaded from %s", path)
        self.notifier.status("configuration reloaded")
        return True

    @property
    def scheme(self) -> str:
        """The data plane's URL scheme: the banner said http:// with TLS on, and a user who
        pasted it got "connection reset" from a port that speaks only TLS."""
        return "https" if self.cfg.file.tls.certificate else "http"

    @property
    def url(self) -> str:
        """The data plane's base URL as a client writes it: an IPv6 address in brackets (the
        banner said http://::1:8000, which no client parses)."""
        host = self.cfg.server.host
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self.app[MANAGER].ready()


def _grace(clock: StopClock) -> float:
    """A second, or what is left of the stop before closing the services if less (a bound of 0
    would be none at all)."""
    return max(min(1.0, clock.left(CLOSE_RESERVE_S)), 0.001)


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """The dotted names of changed fields that a reload cannot apply (listening sockets, paths)."""
    changed = []
    for section in ("server", "admin", "tls"):
        before = getattr(old.file, section).model_dump()
        after = getattr(new.file, section).model_dump()
        changed += [
            f"{section}.{k}" for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)
        ]
    for field in ("model_repository", "data_dir"):
        if getattr(old.file, field) != getattr(new.file, field):
            changed.append(field)
    # Server-wide tunables read once at start (cache.synchronous opens the cache file with it).
    before, after = old.tunables_for("", {}), new.tunables_for("", {})
    changed += [
        f"defaults.{s.name}"
        for s in settings.REGISTRY.values()
        if s.reload and s.scope == "server" and before[s.name] != after[s.name]
    ]
    return changed


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The data plane's TLS context, or None without tls.certificate. A refusal names the
    setting and the file: OpenSSL's own errors ("[SSL] PEM lib", a bare "No such file or
    directory") named neither."""
    tls = cfg.file.tls
    if not tls.certificate:
        if tls.key:  # TLS half configured: serving plain HTTP would be a silent downgrade
            raise ConfigError("tls.certificate: required when tls.key is set (without both, no TLS)")
        return None
    if not tls.key:
        raise ConfigError("tls.key: required when tls.certificate is set")
    cert, key = cfg.base_dir / tls.certificate, cfg.base_dir / tls.key
    for name, path in (("tls.certificate", cert), ("tls.key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{name}: {path}: {exc.strerror or exc}") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # The certificate on its own first: load_cert_chain's error does not say which file is bad.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls.certificate: {cert}: not a PEM certificate ({exc.reason or exc})") from None
    try:
        # A key under a passphrase would have OpenSSL prompt on the terminal (a service has
        # none, and a start waits on it): the empty passphrase fails it with an error instead.
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.key: {key}: not the PEM private key of tls.certificate {cert} ({exc.reason or exc})"
        ) from None
    return ctx


def _no_passphrase() -> bytes:
    return b""


def check_host(cfg: Config) -> None:
    """server.host resolves to an address to listen on (as the bind resolves it)."""
    host = cfg.server.host
    try:
        # asyncio's create_server listens on every interface for "", and resolves this way.
        socket.getaddrinfo(host or None, cfg.server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise _host_error(cfg, exc) from None


def _host_error(cfg: Config, exc: socket.gaierror) -> ConfigError:
    return ConfigError(f"server.host: {cfg.server.host}: {exc.strerror or exc}")


def check_data_dir(cfg: Config) -> None:
    """data_dir is a folder this user can write in, or one that can be made: proved by making and
    removing a scratch folder (as root, os.access says yes to /proc). Creates nothing that stays:
    a data_dir made here, by whoever runs check-config, could be one the service cannot write."""
    data = cfg.data_dir
    where = data
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".appliance-check-", dir=where))
    except OSError as exc:
        raise _data_dir_error(data, exc) from None


def _data_dir_error(data: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"data_dir: {data} is not a writable folder ({exc.strerror or exc})")


class _Site(web.TCPSite):
    """The data plane's TCPSite. On TLS, its connections count under ``server.max_connections``
    from their accept (see :meth:`LimitedRunner.tls_protocol`), and their handshakes are bounded
    as idle connections are (``server.keepalive_timeout_s``). With aiohttp's own TLS listener a
    client that opened connections and never handshook (or stopped half-way) held a file
    descriptor each for asyncio's 60 s, as many as it liked, unseen by the cap, which counted a
    connection only from its handshake's end."""

    def __init__(self, *args: Any, handshake_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        runner = self._runner
        assert isinstance(runner, LimitedRunner)
        await web.BaseSite.start(self)  # registers the site, as TCPSite.start does first
        self._server = await asyncio.get_running_loop().create_server(
            runner.tls_protocol(self._ssl_context, self.handshake_timeout_s),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (libuv's I/O and timers: less event-loop time per request,
    as uvicorn and Sanic use it), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(cfg: Config, hup_pending: Callable[[], bool] = lambda: False) -> int:
    """Serve until SIGTERM or SIGINT; the exit status (see :func:`serve`)."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(cfg, hup_pending))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def serve(cfg: Config, hup_pending: Callable[[], bool] = lambda: False) -> int:
    """0 after a whole drain; 128 + the signal's number when a second one cut it short.

    ``hup_pending`` says whether a SIGHUP came during start-up (the caller holds it off from the
    start, before the slow imports): the reload it asked for is applied once started."""
    server = Server(cfg)
    server.app[MANAGER].freeze_heap = True  # see appliance.heap
    sys.setswitchinterval(cfg.server.gil_switch_interval_ms / 1000)  # the serving process only
    # Children (pip during a pull, say) must not talk to systemd in our name.
    os.environ.pop("NOTIFY_SOCKET", None)
    try:
        await server.start()
    except BaseException:
        # A port in use, say: what start had set going (the models' loads, the workers) is
        # stopped before the error is reported, not left to die as "pending task" errors.
        with contextlib.suppress(Exception):
            await server.stop()
        raise
    # A stdout nobody reads any more (``serve | head``, a journald that went away) must not stop
    # a server that has started: the banner is best effort, as the log lines are (appliance.logs).
    # One write, text and newline together: print() writes them apart, and the log writer's
    # thread (appliance.logs) slipped a JSON line in between on the same stdout.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(f"appliance: serving on {server.url}\n")
        sys.stdout.flush()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if hup_pending():  # checked once this handler is in place: a later SIGHUP is its own
        log.info("SIGHUP during start-up: reloading the configuration now")
        server.reload()
    await stop.wait()
    log.info("stopping: draining in-flight requests (up to %.0fs)", cfg.server.drain_timeout_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.cut, sig)
    await server.stop()
    return 128 + server.cut_by if server.cut_by is not None else 0
