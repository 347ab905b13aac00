"""The admin plane: stats, live settings, model and breaker and cache actions.

It is a separate aiohttp application, never mounted on the LAN data plane: it listens on a Unix
socket and on loopback TCP, and over TCP every request must carry the admin token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appliance import __version__, cache, settings
from appliance.api.common import (
    ACTIONS,
    CONFIG,
    DRAINING,
    EXTRA_STATS,
    MANAGER,
    METRICS,
    RESILIENCE,
    ROLLING,
    STARTED,
    MissRouter,
    body_refusal,
    http_error,
    json_response,
    read_json,
    retry_after,
    send_continue,
    unmet_expectation,
)
from appliance.config import ConfigError, changed_sections, save_settings
from appliance.errors import ApplianceError, Conflict, InvalidRequest, ModelNotFound, Unavailable
from appliance.models import ModelState, validate_model_settings

log = logging.getLogger(__name__)

# How long an unload asked for while the model loads waits for that load: within the console's
# 60 s for an unload, leaving time for the drain that follows.
UNLOAD_WAITS_FOR_LOAD_S = 30.0
# How long an unload request waits for the model's drain (its running work: minutes for a long
# generation) before its 202 "unloading": with UNLOAD_WAITS_FOR_LOAD_S before it, within the
# console's 60 s for an unload. The drain goes on.
UNLOAD_DRAIN_WAIT_S = 20.0
# How long a load request waits for the load before its 202 "still loading": within the console's
# 300 s for a load. The load itself is bounded by engine.load_timeout_s and goes on meanwhile.
LOAD_WAIT_S = 240.0
# How long a settings PATCH waits for the one before it, and for its own save, before its 503.
SETTINGS_WAIT_S = 10.0

DATA_APP = web.AppKey("data_app", web.Application)
ADMIN_TOKEN = web.AppKey("admin_token", str)
# Held by a settings change from its check to its application (see patch_settings).
SETTINGS_LOCK = web.AppKey("settings_lock", asyncio.Lock)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unauthorized(ApplianceError):
    status = 401
    type = "authentication_error"
    code = "admin_token_required"


def _data(request: web.Request) -> web.Application:
    return request.app[DATA_APP]


def _token_refusal(request: web.Request) -> Unauthorized | None:
    """Why a request goes no further than its token, or None: over TCP it must carry the admin
    token; a Unix socket is guarded by its file permissions instead."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    # Fail closed: only a connection known to be on the Unix socket (whose peer name is a str)
    # goes without the token; a vanished transport or anything else must present it.
    if isinstance(peer, str):
        return None
    token = request.app[ADMIN_TOKEN]
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    # surrogateescape: aiohttp decodes a header's non-UTF-8 bytes to lone surrogates,
    # which a plain encode() would raise on (a 500 for anyone without the token).
    if token and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
        return None
    return Unauthorized("the admin API over TCP needs 'Authorization: Bearer <admin token>'")


def _error_response(exc: ApplianceError) -> web.Response:
    error: dict[str, Any] = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    if exc.problems:
        error["problems"] = exc.problems
    return web.json_response({"error": error}, status=exc.status, headers=retry_after(exc.retry_after_s))


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect``, as the data plane answers it: anything but ``100-continue`` is a 417 in the
    admin shape (aiohttp's own was text/plain), and a body that would be refused unread (no
    token, a declared length over the limit, an encoding not decoded) is not asked for."""
    err = unmet_expectation(request)
    if err is not None:
        return _error_response(err)
    return await send_continue(request, _token_refusal(request) is None and body_refusal(request) is None)


@web.middleware
async def admin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The token (over TCP), then the body's refusals before any of it is read (a declared
    length over the limit is a 413, an encoding the server does not decode a 415, as on the
    data plane); every error in the admin API's JSON shape."""
    try:
        refused: ApplianceError | None = _token_refusal(request)
        if refused is None and request.body_exists:
            refused = body_refusal(request)
        if refused is not None:
            raise refused
        return await handler(request)
    except ConnectionResetError:
        # The client hung up while its body was read: nobody to answer, and no server error (it
        # was logged as an unhandled error with a traceback), as on the data plane (nginx's 499).
        return web.Response(status=499)
    except ApplianceError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # The router's 404 and 405 say what was asked (and a 405 which methods the path takes,
        # with Allow), as the data plane's do, not aiohttp's bare "405: Method Not Allowed".
        response = _error_response(http_error(request, exc))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception as exc:  # the admin plane answers in its own shape, whatever a handler did
        log.exception("unhandled error on admin %s %s", request.method, request.path)
        return _error_response(ApplianceError(f"internal error: {type(exc).__name__}"))


routes = web.RouteTableDef()


@routes.get("/admin/stats")
async def stats(request: web.Request) -> web.Response:
    app = _data(request)
    mgr = app[MANAGER]
    rolling = app[ROLLING].snapshot()
    models: dict[str, Any] = {}
    for name, slot in mgr.slots.items():
        m: dict[str, Any] = mgr.describe(name)
        m.update(rolling.get(name, {"requests_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}))
        m["pinned"] = slot.entry.spec.pinned
        m["last_used_s_ago"] = round(time.monotonic() - slot.last_used, 1) if slot.last_used else None
        if slot.runtime is not None:
            snap = slot.runtime.batcher.snapshot()
            m["queue_depth"] = {str(k): v for k, v in snap["queue_depth"].items()}
            m["recent_batch_sizes"] = snap["recent_batch_sizes"][-32:]
            m["rejections"] = snap["rejections"]
            m["running_batches"] = snap["running_batches"]
            m["service_rate_per_s"] = snap["service_rate"]
            if "observed_drain" in snap:  # a batcher's: how fast each level drained lately
                m["observed_drain_per_s"] = {str(k): v for k, v in snap["observed_drain"].items()}
            fn = slot.runtime.generation_snapshot
            if fn is not None:
                m["generation"] = fn()
        resilience = app[RESILIENCE]
        breaker = resilience.breakers.get(name)
        if breaker is not None:
            m["breaker"] = breaker.snapshot()
        m["cache"] = resilience.cache_figures(name)
        models[name] = m
    extra: dict[str, Any] = {}
    for key, fn in app[EXTRA_STATS].items():
        extra[key] = fn()
    return json_response(
        {
            "version": __version__,
            # Changes on every start: a console tells a restart from a blip by it.
            "started_at": app[STARTED],
            "uptime_s": round(time.time() - app[STARTED], 1),
            "ready": mgr.ready(),
            "draining": app[DRAINING][0],
            "models": models,
            **extra,
        }
    )


def _settings_view(request: web.Request) -> dict[str, Any]:
    app = _data(request)
    mgr = app[MANAGER]
    cfg = app[CONFIG]
    # What no model.yaml or override shadows, worked out once: per model and setting it cost
    # ~50 ms of event loop at 2,000 models. Then each model's own few settings on top.
    base = {name: "defaults" if name in cfg.defaults else "registry" for name in settings.REGISTRY}
    defaults = {**settings.defaults(), **cfg.defaults}
    sources: dict[str, dict[str, str]] = {}
    models: dict[str, dict[str, Any]] = {}
    for n, slot in mgr.slots.items():
        over = cfg.model_overrides.get(n, {})
        own = slot.entry.tunables
        if not own and not over:
            sources[n], models[n] = base, defaults  # written as JSON, never changed: shared
            continue
        src = sources[n] = dict(base)
        src.update({name: "model.yaml" for name in own if name in src})
        src.update({name: "override" for name in over if name in src})
        models[n] = mgr.tunables(n)
    return {
        "registry": [s.describe() for s in settings.REGISTRY.values()],
        "defaults": defaults,
        "models": models,
        # Where each model's effective value comes from: registry < defaults < model.yaml < override.
        "sources": sources,
        "overrides": {"defaults": cfg.defaults, "models": cfg.model_overrides},
        "config_file": str(cfg.path) if cfg.path else None,
    }


@routes.get("/admin/settings")
async def get_settings(request: web.Request) -> web.Response:
    return json_response(_settings_view(request))


@routes.patch("/admin/settings")
async def patch_settings(request: web.Request) -> web.Response:
    """All or nothing: every value and every model's combination is checked before any applies."""
    body = await read_json(request)
    unknown = set(body) - {"defaults", "models"}
    if unknown:
        raise InvalidRequest(f"unknown keys {sorted(unknown)}; expected 'defaults' and/or 'models'")
    sections: dict[str, dict[str, Any]] = {}
    for section in ("defaults", "models"):
        # null is an absent section, as every optional field's null; any other value that is not
        # a mapping is refused, an empty list or a 0 too (`or {}` had taken those for empty).
        value = body.get(section)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise InvalidRequest(f"{section}: expected a mapping, got {type(value).__name__}", param=section)
        sections[section] = value
    lock = request.app[SETTINGS_LOCK]
    if not await _acquire(lock, SETTINGS_WAIT_S):
        raise Unavailable(
            f"another settings change has been saving for over {SETTINGS_WAIT_S:g} s (a slow disk); "
            "retry once it is done",
            retry_after_s=SETTINGS_WAIT_S,
        )
    try:
        changes = _planned_change(request, sections)
    except BaseException:
        lock.release()
        raise
    # The save (a file write and two fsyncs: a slow disk's seconds) runs in a thread, not on the
    # event loop, which it stalled for every request; the lock, held until it is applied, keeps
    # PATCHes from interleaving or reordering their writes. The task applies what it saved even
    # if this request stops waiting, so what runs and what the file says never differ.
    commit = asyncio.ensure_future(_commit(request, *changes))
    commit.add_done_callback(lambda _: lock.release())
    commit.add_done_callback(_log_failure)
    done, _ = await asyncio.wait({commit}, timeout=SETTINGS_WAIT_S)
    if not done:
        raise Unavailable(
            f"the settings file has not been written in {SETTINGS_WAIT_S:g} s (a slow disk); the change "
            "applies once it is saved: check GET /admin/settings",
            retry_after_s=SETTINGS_WAIT_S,
        )
    reload_needed, restart_needed = commit.result()
    view = _settings_view(request)
    view["reload_needed"] = reload_needed
    view["restart_needed"] = restart_needed
    return json_response(view)


async def _acquire(lock: asyncio.Lock, timeout_s: float) -> bool:
    """``lock``, taken within ``timeout_s``; False if not (wait_for on acquire() can lose a lock
    taken as the timeout fires, before Python 3.12)."""
    waiter = asyncio.ensure_future(lock.acquire())

    def give_back(w: asyncio.Future[Any]) -> None:
        if not w.cancelled():  # taken after all, as the wait ended
            lock.release()

    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        if not waiter.done():
            waiter.cancel()
            waiter.add_done_callback(give_back)
    return bool(done)


def _log_failure(task: asyncio.Future[Any]) -> None:
    """A commit whose request stopped waiting still reports how it ended."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if isinstance(exc, ApplianceError):
            log.error("settings change: %s", exc.message)
        else:
            log.error("settings change failed", exc_info=exc)


def _planned_change(
    request: web.Request, sections: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The defaults and overrides ``sections`` make of the running ones, every value and every
    model's combination checked (InvalidRequest naming each problem)."""
    app = _data(request)
    mgr, cfg = app[MANAGER], app[CONFIG]
    # Every problem, of every section and model, is gathered before refusing: a form shows each
    # next to its field (and, for a model's override, says which model).
    problems: list[dict[str, str]] = []
    details: list[str] = []  # the message: each section's refusal, naming its settings

    def refused(exc: settings.SettingError, model: str | None = None) -> None:
        details.append(exc.detail or str(exc))
        for name, message in exc.problems:
            problems.append({"setting": name, "message": message, **({"model": model} if model else {})})

    # A null value removes an override, so the value below it applies again.
    flat = settings.flatten(sections["defaults"])
    new_defaults = dict(cfg.defaults)
    try:
        new_defaults.update(settings.validate(flat, "defaults.", removals=True))
    except settings.SettingError as exc:
        refused(exc)
    for key in _unset(flat):
        new_defaults.pop(key, None)
    new_models = {m: dict(v) for m, v in cfg.model_overrides.items()}
    for name, tree in sections["models"].items():
        if name not in mgr.slots or not isinstance(tree, dict):
            what = "no such model" if name not in mgr.slots else "expected a mapping of settings"
            details.append(f"models.{name}: {what}")
            problems.append({"setting": f"models.{name}", "message": details[-1]})
            continue
        flat = settings.flatten(tree)
        target = new_models.setdefault(name, {})
        try:
            target.update(settings.validate(flat, f"models.{name}.", per_model=True, removals=True))
        except settings.SettingError as exc:
            refused(exc, name)
        for key in _unset(flat):
            target.pop(key, None)
    if not problems:  # the combinations, once every value is known to be valid on its own
        # Models whose own settings (model.yaml's, then the override's) are alike have the same
        # combination: each is checked once (checking it per model cost ~100 ms at 2,000 models;
        # most models of a repository share their model.yaml's few settings, or have none).
        checked: dict[str, settings.SettingError | None] = {}
        for name, slot in mgr.slots.items():
            own = {**slot.entry.tunables, **new_models.get(name, {})}
            alike = repr(sorted(own.items()))  # names are unique: values are never compared
            if alike in checked:
                error = checked[alike]
            else:
                try:
                    validate_model_settings({**settings.defaults(), **new_defaults, **own})
                    error = None
                except settings.SettingError as exc:
                    error = exc
                checked[alike] = error
            if error is not None:
                details.append(f"model {name}: {error.detail}")
                problems.append({"setting": error.name, "message": details[-1], "model": name})
    if problems:
        err = InvalidRequest("; ".join(details), param=problems[0]["setting"])
        err.problems = problems
        raise err
    return new_defaults, new_models


async def _commit(
    request: web.Request, new_defaults: dict[str, Any], new_models: dict[str, dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """Save the change, then apply it; what waits for a reload and what for a restart."""
    app = _data(request)
    mgr, cfg = app[MANAGER], app[CONFIG]
    try:
        # A PATCH that changes nothing writes nothing: each rewrite drops the file's comments.
        if changed_sections(cfg, new_defaults, new_models):
            await asyncio.get_running_loop().run_in_executor(
                None, save_settings, cfg, new_defaults, new_models
            )
    except (ConfigError, OSError) as exc:
        # The file on disk is gone, invalid, or cannot be written: nothing is applied either,
        # so that what runs and what a restart would load never differ.
        raise Conflict(f"the settings were not saved: {exc}", "config_file_conflict") from None
    before = {name: mgr.tunables(name) for name in mgr.slots}
    server_before = cfg.tunables_for("", {})
    cfg.defaults, cfg.model_overrides = new_defaults, new_models
    resilience = app[RESILIENCE]
    server_after = cfg.tunables_for("", {})
    resilience.configure_cache(server_after)
    mgr.configure_memory()
    # What waits: a resident model whose effective value of a load-time setting changed (not
    # every model for any such name sent: a server-wide one, a value shadowed by model.yaml, or
    # a model not loaded, which takes it at its next load anyway), and the server-wide settings
    # that wait for a restart, which unloading a model never applies.
    reload_needed = []
    for name, slot in mgr.slots.items():
        after = mgr.tunables(name)
        if after == before[name]:
            # A model the change leaves alone (most of them): its batcher's policy and breaker
            # already run these values. Rebuilding both for every model cost ~50 ms at 2,000.
            continue
        mgr.apply(name)
        resilience.configure(name, after)
        if slot.runtime is not None and any(
            s.reload and s.scope == "model" and before[name][s.name] != after[s.name]
            for s in settings.REGISTRY.values()
        ):
            reload_needed.append(name)
    restart_needed = [
        s.name
        for s in settings.REGISTRY.values()
        if s.reload and s.scope == "server" and server_before[s.name] != server_after[s.name]
    ]
    return reload_needed, restart_needed


def _unset(flat: dict[str, Any]) -> list[str]:
    return [k for k, v in flat.items() if v is None]


def _model(request: web.Request) -> str:
    """The model the path names: a folder copied in is found (as the data plane finds it), a
    broken model.yaml is named, anything else is a 404."""
    name = request.match_info["model"]
    _data(request)[MANAGER].find(name)
    return name


@routes.post("/admin/models/{model}/load")
async def load_model(request: web.Request) -> web.Response:
    name = _model(request)
    data = _data(request)
    if data[DRAINING][0]:
        # Carried out, a load opened a model (a chat model's GB) while the drain ran, and an open
        # still running at its end made the models' close miss the stop's deadline, the engine
        # left open at the exit. Refused as the data plane's requests are while it drains.
        raise Unavailable(
            f"the server is stopping (draining): the model '{name}' is not loaded; load it once "
            "the server is back",
            param="model",
            retry_after_s=5,  # as the data plane's 503 while draining
        )
    mgr = data[MANAGER]
    # Waited for up to LOAD_WAIT_S, not until the load ends (a load waits its turn behind every
    # other load, each bounded by its engine.load_timeout_s only): a client's wait that ran out
    # first said nothing of what became of it. Past it, a 202: the load goes on (its outcome is
    # the model's state and error in /admin/stats); only this request's wait on it is cancelled.
    loading = asyncio.ensure_future(mgr.load(name))
    done, _ = await asyncio.wait({loading}, timeout=LOAD_WAIT_S)
    if not done:
        loading.cancel()
        body = mgr.describe(name)
        body["message"] = (
            f"still loading after {LOAD_WAIT_S:g} s; the load goes on: follow the model's state "
            "(and error) in GET /admin/stats"
        )
        return web.json_response(body, status=202)
    loading.result()
    return web.json_response(mgr.describe(name))


@routes.post("/admin/models/{model}/unload")
async def unload_model(request: web.Request) -> web.Response:
    name = _model(request)
    mgr = _data(request)[MANAGER]
    loading = mgr.slots[name].load_task
    if loading is not None and not loading.done():
        # The unload is meant for what that load brings: answering "loading" at once and doing
        # nothing left the model resident. Waited for, not cancelled (requests may wait on it).
        done, _ = await asyncio.wait({loading}, timeout=UNLOAD_WAITS_FOR_LOAD_S)
        if not done:
            raise Conflict(
                f"the model '{name}' is still loading after {UNLOAD_WAITS_FOR_LOAD_S:g} s; "
                "unload it once it is resident",
                "model_loading",
                param="model",
            )
    if mgr.slots[name].state == ModelState.resident:
        before = mgr.describe(name)
        # The unload runs as its own task, waited for up to UNLOAD_DRAIN_WAIT_S: awaited whole,
        # a drain behind a long generation outlasted the console's 60 s (a timeout that said
        # nothing of the unload), and the request's end could cut the drain.
        unloading = asyncio.ensure_future(mgr.unload(name))
        _UNLOADS.add(unloading)
        unloading.add_done_callback(_UNLOADS.discard)
        unloading.add_done_callback(lambda task: _log_unload_failure(name, task))
        done, _ = await asyncio.wait({unloading}, timeout=UNLOAD_DRAIN_WAIT_S)
        if not done:
            body = {**before, "state": "unloading"}
            body["message"] = (
                f"still draining its running work after {UNLOAD_DRAIN_WAIT_S:g} s; the unload goes on "
                "(new requests for it are refused meanwhile): follow its state in GET /admin/stats"
            )
            return web.json_response(body, status=202)
        unloading.result()
        if name not in mgr.slots:
            # Its folder went (or its model.yaml broke) while it was resident: the unload's rescan
            # let it go. The unload happened; a 404 said it had not.
            why = mgr.broken.get(
                name, "it is no longer in the model repository (its folder or model.yaml went)"
            )
            kept = {k: before[k] for k in ("name", "kind", "description")}
            return web.json_response({**kept, "state": "removed", "error": why})
    return web.json_response(mgr.describe(name))


# Unloads that outlast their request (see unload_model): held here until done.
_UNLOADS: set[asyncio.Future[None]] = set()


def _log_unload_failure(name: str, task: asyncio.Future[None]) -> None:
    """An unload whose request stopped waiting still reports how it ended."""
    if not task.cancelled() and task.exception() is not None:
        log.error("unloading model %s failed", name, exc_info=task.exception())


@routes.post("/admin/breakers/{model}/{verb}")
async def breaker_action(request: web.Request) -> web.Response:
    name = _model(request)
    verb = request.match_info["verb"]
    fn = _data(request)[ACTIONS].get(f"breaker:{verb}")
    if fn is None:
        raise InvalidRequest(
            f"unknown breaker action '{verb}'; expected open, close, reset or disable", param="verb"
        )
    return web.json_response(await fn(name))


@routes.post("/admin/cache/purge")
async def cache_purge(request: web.Request) -> web.Response:
    body = await read_json(request) if request.can_read_body else {}
    unknown = set(body) - {"model"}
    if unknown:
        # A misspelt {"modle": m} purged every model's entries: the one key read was absent.
        raise InvalidRequest(
            f"unknown keys {sorted(unknown)}; expected only 'model' (or no body, to purge every model)",
            param=sorted(unknown)[0],
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"model: expected a model name, got {type(model).__name__}", param="model")
    if model is not None and model not in _data(request)[MANAGER].slots:
        raise ModelNotFound(f"no such model '{model}'", param="model")
    fn = _data(request)[ACTIONS].get("cache:purge")
    if fn is None:
        raise InvalidRequest("the response cache is not enabled")
    try:
        purged = await fn(model)
    except asyncio.TimeoutError:
        raise Unavailable(
            f"the response cache's writer has not answered in {cache.REQUEST_TIMEOUT_S:g} s (see "
            "cache.writer_stalled in /admin/stats); the purge stays queued and runs if it recovers",
            retry_after_s=cache.REQUEST_TIMEOUT_S,
        ) from None
    if purged is None:
        # Not "0 purged": the entries are still there (a probe was told so while an sqlite3 shell
        # held the file's lock).
        raise Unavailable(
            "the purge was not carried out: the response cache is off, or another process held its "
            "file's lock (see cache.enabled and cache.busy_writes in /admin/stats); retry",
            retry_after_s=5.0,
        )
    return web.json_response({"purged": purged})


def create_admin_app(data_app: web.Application) -> web.Application:
    # The data plane's body limit: aiohttp's own default (1 MiB) refused bodies with a message
    # that named server.max_body_bytes, whatever that was set to.
    app = web.Application(middlewares=[admin_guard], client_max_size=data_app[CONFIG].server.max_body_bytes)
    app.router.__class__ = MissRouter  # a 404 or 405 asks for no body (see MissRouter)
    app[DATA_APP] = data_app
    app[SETTINGS_LOCK] = asyncio.Lock()
    app[CONFIG] = data_app[CONFIG]
    app[METRICS] = data_app[METRICS]
    for route in routes:
        assert isinstance(route, web.RouteDef)
        if route.method == "GET":  # with HEAD, as add_get has it
            app.router.add_route("HEAD", route.path, route.handler, expect_handler=_expect)
        app.router.add_route(route.method, route.path, route.handler, expect_handler=_expect)
    return app
