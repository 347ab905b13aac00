"""Shared pieces of the HTTP layer: typed app keys, error shapes, request parameters."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from appliance.api.jsonbody import parse_object
from appliance.config import Config
from appliance.errors import ApplianceError, InvalidRequest
from appliance.gpu.nvml import GpuSampler
from appliance.inference import EmbeddingService, TensorService
from appliance.llm.service import ChatService
from appliance.models import ModelManager
from appliance.resilience import SOURCE_HEADER, Compute, Default, Resilience
from appliance.telemetry import Metrics, RollingStats

CONFIG = web.AppKey("config", Config)
MANAGER = web.AppKey("manager", ModelManager)
METRICS = web.AppKey("metrics", Metrics)
EMBEDDINGS = web.AppKey("embeddings", EmbeddingService)
TENSORS = web.AppKey("tensors", TensorService)
CHAT = web.AppKey("chat", ChatService)
STARTED = web.AppKey("started", float)
DRAINING = web.AppKey("draining", list)  # one-element list: a mutable flag shared by handlers
ROLLING = web.AppKey("rolling", RollingStats)


class Inflight:
    """Requests being handled, so that a drain can wait for the last one to finish."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


INFLIGHT = web.AppKey("inflight", Inflight)
GPU = web.AppKey("gpu", GpuSampler)
RESILIENCE = web.AppKey("resilience", Resilience)
# Optional parts register here as they are enabled: name -> () -> JSON-able (cache, memory, gpu),
# and admin actions "breaker:<verb>" / "cache:purge" -> async callables.
EXTRA_STATS = web.AppKey("extra_stats", dict)
ACTIONS = web.AppKey("actions", dict)

OPENAI, KSERVE, OTHER = "openai", "kserve", "other"
_INTEGER = re.compile(r"-?[0-9]{1,18}")


def api_of(path: str) -> str:
    if path.startswith("/v1/"):
        return OPENAI
    if path == "/v2" or path.startswith("/v2/"):
        return KSERVE
    return OTHER


def retry_after(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_response(api: str, exc: ApplianceError) -> web.Response:
    if api == KSERVE:
        body: dict[str, Any] = {"error": exc.message}
    else:
        body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return web.json_response(body, status=exc.status, headers=retry_after(exc.retry_after_s))


async def read_json(request: web.Request) -> dict[str, Any]:
    from appliance.api.security import read_body

    try:
        raw = await read_body(request)
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(str(exc.text or "request body too large")) from None
    return parse_object(raw)


class BodyTooLarge(ApplianceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


def priority_of(request: web.Request, body_value: Any) -> int | None:
    """``priority`` from the body, else the ``X-Priority`` header; the batcher checks the range."""
    value = body_value
    if value is None and "X-Priority" in request.headers:
        text = request.headers["X-Priority"].strip()
        # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses, and a
        # bounded length keeps int() below its digit limit.
        if not _INTEGER.fullmatch(text):
            raise InvalidRequest(f"X-Priority must be an integer, got {text[:20]!r}", param="priority")
        value = int(text)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest("'priority' must be an integer", param="priority")
    # A key may be capped: a LAN app cannot claim a more urgent level than its key allows.
    record = request.get("api_key")
    cap = getattr(record, "max_priority", None)
    if cap is not None:
        if value is None:
            value = int(request.app[CONFIG].tunables_for("", {})["queue.default_priority"])
        value = max(value, cap)
    request["priority"] = value
    return value


def cache_policy(request: web.Request) -> tuple[bool, bool]:
    """(read, write) from ``Cache-Control``: ``no-cache`` skips reading, ``no-store`` writing."""
    directives = {d.strip().lower() for d in request.headers.get("Cache-Control", "").split(",")}
    return "no-cache" not in directives, "no-store" not in directives


async def guarded(
    request: web.Request,
    model: str,
    compute: Compute,
    *,
    canonical: dict[str, Any] | None,
    blobs: list[bytes] | tuple[bytes, ...] = (),
    default: Default | None = None,
    headers: Callable[[bytes, str], dict[str, str]] | None = None,
    priority: int | None = None,
) -> web.Response:
    """Run ``compute`` behind the model's breaker and the response cache (see resilience.py).

    The priority is checked first: a bad request is a 400 even when the cache could answer it.
    """
    mgr = request.app[MANAGER]
    runtime = await mgr.runtime(model)
    if priority is not None:
        levels = int(mgr.tunables(model)["queue.priority_levels"])
        if not 1 <= priority <= levels:
            raise InvalidRequest(
                f"priority must be an integer from 1 to {levels}, got {priority}", param="priority"
            )
    read, write = cache_policy(request)
    answer = await request.app[RESILIENCE].answer(
        model,
        runtime.identity,
        mgr.tunables(model),
        compute,
        canonical=canonical,
        blobs=blobs,
        read_cache=read,
        write_cache=write,
        default=default,
    )
    extra = headers(answer.body, answer.content_type) if headers else {}
    return web.Response(
        body=answer.body,
        headers={"Content-Type": answer.content_type, SOURCE_HEADER: answer.source, **extra},
    )


def timeout_ms_of(request: web.Request) -> float | None:
    text = request.headers.get("X-Timeout-Ms")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest("X-Timeout-Ms must be a number of milliseconds", param="X-Timeout-Ms") from None
    if not (value > 0 and math.isfinite(value)):
        raise InvalidRequest(
            f"X-Timeout-Ms must be a positive, finite number of milliseconds, got {text[:20]!r}",
            param="X-Timeout-Ms",
        )
    return value
