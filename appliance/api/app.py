"""The aiohttp application: routes, middlewares and the services' lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.api import chat, kserve, openai, openapi
from appliance.api.common import (
    ACTIONS,
    CHAT,
    CONFIG,
    DRAINING,
    EMBEDDINGS,
    EXTRA_STATS,
    GPU,
    INFLIGHT,
    MANAGER,
    METRICS,
    OFFLOOP,
    PIPELINE,
    RESILIENCE,
    ROLLING,
    STARTED,
    STOP,
    STREAM_ERROR,
    SUPERVISOR,
    TENSORS,
    TICKET,
    Inflight,
    MissRouter,
    OffLoop,
    StopClock,
    api_of,
    body_refusal,
    error_response,
    http_error,
    read_body,
    send_continue,
    unmet_expectation,
)
from appliance.api.security import (
    CEILINGS,
    KEY,
    KEYS,
    LIMITER,
    RateCeilings,
    authenticate,
    keystore,
    needs_key,
    over_ceiling,
)
from appliance.api.shedding import body_here, early_refusal, refusal_response, sheds
from appliance.auth import KeyRateLimiter, presented_key
from appliance.config import Config
from appliance.errors import ApplianceError, Unavailable
from appliance.gpu.nvml import GpuSampler, register_gpu_metrics
from appliance.inference import EmbeddingService, TensorService
from appliance.llm.service import ChatService
from appliance.models import ModelManager
from appliance.pipeline import Pipeline
from appliance.resilience import Resilience
from appliance.supervisor import Supervisor
from appliance.telemetry import HELD, Held, Metrics, RollingStats

log = logging.getLogger(__name__)
access_log = logging.getLogger("appliance.access")
# Request ids: a random per-process prefix and a counter (uuid4 cost 3 % of the event loop).
_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNMETERED = {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}


def _request_id(request: web.Request) -> str:
    """The client's X-Request-Id (at most 64 characters, printable ASCII), else a new one."""
    given = request.headers.get("X-Request-Id", "")[:64]
    if not (given.isascii() and given.isprintable()):
        # Bytes that are not UTF-8 reach here as lone surrogates (aiohttp decodes header values
        # with surrogateescape): in the response's headers they could not be encoded, and in the
        # JSON log line they made it fail. Each such character, or any other not printable
        # ASCII, becomes "_"; the id stays recognisable to the client that sent it.
        cleaned = "".join(c if " " <= c <= "~" else "_" for c in given).strip(" ")
        # Nothing of the client's left (only replacements): a new id. Else its own, in full:
        # stripping "_" cut the replacement of a last character ("abc/é" came back "abc/").
        given = cleaned if cleaned.strip("_") else ""
    return given or f"{_ID_PREFIX}-{next(_ids):x}"


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: the client holds its body back until told to send it. A body
    the front door refuses unread (too large, an encoding it does not decode, no API key where
    one is required, the server draining) is not asked for: no 100, and the front door's final
    answer follows at once (RFC 9110, 10.1.1)."""
    err = unmet_expectation(request)
    if err is not None:
        refused = error_response(api_of(request.path), err)
        refused.headers["X-Request-Id"] = _request_id(request)
        return refused
    # (A key that is presented but wrong is found out only by the key check, on a worker thread:
    # its client is still asked for the body. Refusing keyless clients here is what costs nothing.)
    keyless = needs_key(request) and presented_key(request.headers) is None
    draining = request.app[DRAINING][0] and request.path not in UNMETERED
    return await send_continue(request, not keyless and not draining and body_refusal(request) is None)


@web.middleware
async def front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request, in order: the rate ceilings (a POST, before its body is read), the drain,
    a request id, the API key, shedding before work (appliance.api.shedding), metrics and the
    access log, then the handler; any error rendered in the API's own shape. One middleware rather
    than three: under overload each layer's cost is paid by thousands of refusals a second."""
    app = request.app
    path = request.path
    post = request.method == "POST"
    if post:
        refused = over_ceiling(request)
        if refused is not None:
            refused.headers["X-Request-Id"] = _request_id(request)
            return refused
    api = api_of(path)
    metrics = app[METRICS]
    started = time.perf_counter()
    model = "-"
    status = 500
    metered = path not in UNMETERED
    request_id = _request_id(request)
    if metered and app[DRAINING][0]:
        refused = error_response(api, Unavailable("the server is shutting down", retry_after_s=5))
        refused.headers["X-Request-Id"] = request_id
        # With Connection: close: a keep-alive client sent its retry down this same connection,
        # to the draining process, and got this 503 again until the process exited, instead of
        # reconnecting (to a replica, or to this one restarted).
        refused.force_close()
        return refused
    key_needed = needs_key(request)
    entered = handled = False
    key = None
    response: web.StreamResponse
    # Triton's statistics of the work done for this request, counted once it has ended well.
    held: Held = []
    holding = HELD.set(held)
    try:
        if key_needed:
            if metered:  # counted while its key is checked (on a worker thread), for the drain
                metrics.child(metrics.inflight, api).inc()
                app[INFLIGHT].enter()
                entered = True
            await authenticate(request)
        # (request.get() of a missing key raises and catches a KeyError inside: not on this path.)
        key = request[KEY] if key_needed else None
        early = None
        if post:
            refused_body = body_refusal(request)
            if refused_body is not None:
                raise refused_body
        if post and sheds(path):
            here = body_here(request)
            if here is not None:
                # All here (the usual small request): taken as is, without request.read()'s
                # awaits; else the rest is awaited within server.read_timeout_s, as the route would.
                raw = request.content.read_nowait() if here else await read_body(request)
                early = early_refusal(request, key, raw)
        if early is not None:
            # Refused before work: never counted in flight, as nothing of it is left to drain.
            status = early[0].status
            response = refusal_response(api, early[0])
        else:
            if metered and not entered:
                metrics.child(metrics.inflight, api).inc()
                app[INFLIGHT].enter()
                entered = True
            handled = True
            request["request_id"] = request_id  # for a stream's early headers (chat._sse)
            response = await handler(request)
            status = response.status
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's convention); not a server error
        raise
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        # The client hung up while its body was being read, or a stream's write found it gone
        # before the cancellation came: nobody to answer, and no server error (a traceback per
        # hang-up would flood the log and the 500 count under a probe). aiohttp's writes raise
        # ConnectionResetError; a transport's own socket error may be either of the others.
        status = 499
        response = web.Response(status=499)
    except ApplianceError as exc:
        status = exc.status
        response = error_response(api, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = http_error(request, exc)
        status = err.status
        response = error_response(api, err)
        if "Allow" in exc.headers:  # a 405 says which methods the path takes
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:  # the process keeps serving whatever a handler did
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = ApplianceError(f"internal error: {type(exc).__name__}")
        response = error_response(api, err)
    finally:
        HELD.reset(holding)
        ticket = request.get(TICKET) if handled else None
        if ticket is not None:
            ticket.release()  # queue places an early admission held and no submit used
        if entered:
            metrics.child(metrics.inflight, api).dec()
            app[INFLIGHT].leave()
        if metered:
            elapsed = time.perf_counter() - started
            # Only known models become label values: a client naming random models must not grow
            # the metrics (and their memory) without bound.
            named = request.get("model", model)
            model = named if named in request.app[MANAGER].slots else "-"
            level = request.get("priority")
            metrics.request_stats.record(model, api, str(status), str(level or 0), elapsed)
            if model != "-":
                request.app[ROLLING].record(model, elapsed, status)
                if post:  # an inference (metadata and readiness are GETs)
                    ok = status < 400 and STREAM_ERROR not in request
                    metrics.model_stats.answered(model, ok, elapsed, held)
            # One structured line per request; never the body (it may hold customer data).
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %d",
                    request.method,
                    path,
                    status,
                    extra={
                        "fields": {
                            "request_id": request_id,
                            "api": api,
                            "model": model,
                            "priority": request.get("priority"),
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                            "key": getattr(key, "name", None),
                        }
                    },
                )
    if not response.prepared:  # a stream sent its headers already, with the id (chat._sse)
        response.headers["X-Request-Id"] = request_id
        if app[DRAINING][0]:  # answered while draining (a queued request's 503): as above
            response.force_close()
    return response


async def healthz(request: web.Request) -> web.Response:
    """Process liveness; with ``?deep=1``, 503 while the progress watchdog would withhold systemd's
    ping (a busy engine silent past its allowance), so an orchestrator's liveness probe restarts
    a hung engine as ``WatchdogSec=`` does under systemd."""
    if request.query.get("deep") in ("1", "true"):
        stalls = request.app[MANAGER].progress.stalls()
        if stalls:
            detail = [
                {"component": s.component, "silent_s": round(s.silent_s, 1), "allowance_s": s.allowance_s}
                for s in stalls
            ]
            return web.json_response(
                {"status": "stalled", "stalled": detail}, status=503, headers={"Retry-After": "5"}
            )
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    mgr = request.app[MANAGER]
    models = {n: s.state.value for n, s in mgr.slots.items()}
    down = request.app[SUPERVISOR].down()
    ok = mgr.ready() and not request.app[DRAINING][0] and not down
    body = {"ready": ok, "models": models, "errors": mgr.readiness_errors(), "workers_down": down}
    return web.json_response(body, status=200 if ok else 503, headers={} if ok else {"Retry-After": "5"})


LAG_PROBE_S = 0.1


class LoopLag:
    """How late the loop runs a timer is how long it was blocked: anything slow on the loop
    (a big JSON body, a tokenizer call) shows here before clients notice. Exported as a histogram
    and, for the console, as quantiles over the last minute."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.recent: deque[float] = deque(maxlen=int(60 / LAG_PROBE_S))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        observe = self.metrics.event_loop_lag.observe
        while True:
            due = loop.time() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            lag = max(0.0, loop.time() - due)
            observe(lag)
            self.recent.append(lag)

    def snapshot(self) -> dict[str, float | int]:
        values = sorted(self.recent)
        if not values:
            return {"samples": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        pick = lambda q: values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]  # noqa: E731
        return {
            "samples": len(values),
            "p50_ms": round(pick(0.5) * 1000, 3),
            "p99_ms": round(pick(0.99) * 1000, 3),
            "max_ms": round(values[-1] * 1000, 3),
        }


async def metrics_view(request: web.Request) -> web.Response:
    request.app[RESILIENCE].refresh_metrics()
    # Read at scrape time, so that it is right outside systemd too (where no ping loop runs).
    request.app[METRICS].watchdog_healthy.set(1 if request.app[MANAGER].progress.healthy() else 0)
    data = await request.app[METRICS].exposition()  # rendered on a worker thread
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _services(app: web.Application) -> AsyncIterator[None]:
    # Models load in the background so that /healthz answers and /readyz says 503 meanwhile.
    mgr = app[MANAGER]
    cfg = app[CONFIG]
    resilience = app[RESILIENCE]
    supervisor = app[SUPERVISOR]
    await resilience.open_cache(cfg.data_dir / "cache.db", cfg.tunables_for("", {}))
    cache = resilience.cache
    # The cache, the GPU telemetry and the loop-lag probe are optional: requests are served
    # without them, so their failures never fail /readyz or stop the watchdog's pings.
    if cache is not None:
        supervisor.watch(
            "cache-writer",
            cache.writer_alive,
            cache.restart_writer,
            critical=False,
            on_give_up=lambda: cache.switch_off("its writer thread kept dying"),
        )
    sampler = app[GPU]
    sampler.start()
    supervisor.watch(
        "gpu-sampler", sampler.alive, sampler.restart, critical=False, error=lambda: sampler.error
    )
    lag = LoopLag(app[METRICS])
    app[EXTRA_STATS]["loop"] = lag.snapshot
    supervisor.task("loop-lag", lag.run, critical=False)
    mgr.supervisor = supervisor
    loop = asyncio.get_running_loop()
    restarts: set[asyncio.Task[None]] = set()

    def replace_engine(name: str) -> None:  # on the loop
        task = loop.create_task(mgr.restart(name))
        restarts.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(restarts.discard)

    def engine_sick(name: str) -> None:
        # A breaker reports under its lock, perhaps from an engine thread: only schedule here.
        loop.call_soon_threadsafe(replace_engine, name)

    resilience.on_engine_sick = engine_sick
    # /openapi.json's document is parsed from YAML once (openapi.document): in a thread now,
    # before the server listens; the first GET parsed it on the loop (0.1-0.3 s, every request
    # waiting), the moment a fuzzer or a client generator starts.
    await loop.run_in_executor(None, openapi.document)
    mgr.rescan()
    loading = supervisor.once("model-load", mgr.start())
    yield
    resilience.on_engine_sick = None
    for task in restarts:
        task.cancel()
    await supervisor.close()
    sampler.stop()
    app[DRAINING][0] = True
    if not loading.done():
        loading.cancel()
    await asyncio.gather(loading, return_exceptions=True)
    # Bounded: a hung engine, a dead worker or a cache writer stuck on a locked file must not hold
    # the shutdown past drain_timeout_s. Both steps draw from the stop's one deadline (the drain's
    # end and its grace; a second signal brings it in): each used to get drain_timeout_s + 1 of
    # its own after the drain, and a stop took three times the drain timeout.
    clock = app[STOP]
    if clock.ends is None:  # not stopped through Server.drain (an app run on its own)
        clock.start(cfg.server.drain_timeout_s)
    # Side by side: the cache's close (its last writes, its checkpoint) does not wait behind a
    # models' close that a hung engine holds to the deadline.
    steps = {
        "closing the models": asyncio.ensure_future(mgr.close(drain=True)),
        "closing the cache": asyncio.ensure_future(resilience.close()),
    }
    await clock.wait(asyncio.gather(*steps.values(), return_exceptions=True))
    for name, task in steps.items():
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.error("shutdown: %s did not finish within the stop's deadline; going on without it", name)
        elif not task.cancelled() and task.exception() is not None:
            log.error("shutdown: %s failed", name, exc_info=task.exception())
    app[OFFLOOP].close()  # last: a request still being drained may decode its body on it


def _breaker_action(
    resilience: Resilience, manager: ModelManager, verb: str
) -> Callable[[str], Awaitable[dict[str, Any]]]:
    async def act(model: str) -> dict[str, Any]:
        return resilience.action(model, verb, manager.tunables(model))

    return act


def create_app(cfg: Config) -> web.Application:
    app = web.Application(
        middlewares=[front_door],
        client_max_size=cfg.server.max_body_bytes,
    )
    app.router.__class__ = MissRouter  # a 404 or 405 asks for no body (see MissRouter)
    app[CEILINGS] = RateCeilings(cfg.server.max_request_rate, cfg.server.max_connection_request_rate)
    app[KEYS] = keystore([k.model_dump() for k in cfg.file.auth.keys])
    app[LIMITER] = KeyRateLimiter()
    metrics = Metrics()
    manager = ModelManager(cfg, metrics)
    app[CONFIG] = cfg
    app[METRICS] = metrics
    app[MANAGER] = manager
    app[EMBEDDINGS] = EmbeddingService(manager)
    app[TENSORS] = TensorService(manager)
    app[CHAT] = ChatService(manager)
    app[STARTED] = time.time()
    app[DRAINING] = [False]
    app[INFLIGHT] = Inflight()
    app[OFFLOOP] = OffLoop()
    app[STOP] = StopClock()
    app[ROLLING] = RollingStats()
    app[EXTRA_STATS] = {}
    app[ACTIONS] = {}
    resilience = Resilience(metrics)
    app[RESILIENCE] = resilience
    manager.forgetting += [resilience.forget_model, app[ROLLING].forget]
    app[PIPELINE] = Pipeline(manager, resilience, metrics)
    app[SUPERVISOR] = Supervisor(metrics, manager.progress)
    app[EXTRA_STATS]["workers"] = app[SUPERVISOR].snapshot
    app[EXTRA_STATS]["compute"] = manager.arbiter.snapshot
    app[EXTRA_STATS]["cache"] = lambda: resilience.cache.stats() if resilience.cache else {"enabled": False}
    app[EXTRA_STATS]["memory"] = manager.memory.snapshot
    # NVML readings, sampled in the background; without a driver it says "no GPU" once.
    sampler = GpuSampler(float(cfg.tunables_for("", {})["gpu.sample_interval_s"]))
    register_gpu_metrics(metrics.registry, sampler)
    app[GPU] = sampler
    app[EXTRA_STATS]["gpu"] = sampler.snapshot

    async def purge(model: str | None) -> int | None:
        return await resilience.cache.purge(model) if resilience.cache else 0

    for verb in ("open", "close", "reset", "disable"):
        app[ACTIONS][f"breaker:{verb}"] = _breaker_action(resilience, manager, verb)
    app[ACTIONS]["cache:purge"] = purge
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    for table in (openai.routes, chat.routes, kserve.routes, openapi.routes):
        for route in table:
            assert isinstance(route, web.RouteDef)
            if route.method == "GET":  # with HEAD, as add_get (and the admin plane's routes) have
                app.router.add_route("HEAD", route.path, route.handler, expect_handler=_expect)
            app.router.add_route(
                route.method, route.path, route.handler, expect_handler=_expect, **route.kwargs
            )
    app.cleanup_ctx.append(_services)
    return app
