"""Shared pieces of the HTTP layer: typed app keys, error shapes, request parameters."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from appliance.config import Config
from appliance.errors import ApplianceError, InvalidRequest
from appliance.inference import EmbeddingService, TensorService
from appliance.models import ModelManager
from appliance.telemetry import Metrics

CONFIG = web.AppKey("config", Config)
MANAGER = web.AppKey("manager", ModelManager)
METRICS = web.AppKey("metrics", Metrics)
EMBEDDINGS = web.AppKey("embeddings", EmbeddingService)
TENSORS = web.AppKey("tensors", TensorService)
STARTED = web.AppKey("started", float)
DRAINING = web.AppKey("draining", list)  # one-element list: a mutable flag shared by handlers

OPENAI, KSERVE, OTHER = "openai", "kserve", "other"


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
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(str(exc.text or "request body too large")) from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return doc


class BodyTooLarge(ApplianceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


def priority_of(request: web.Request, body_value: Any) -> int | None:
    """``priority`` from the body, else the ``X-Priority`` header; the batcher checks the range."""
    value = body_value
    if value is None and "X-Priority" in request.headers:
        text = request.headers["X-Priority"].strip()
        if not text.lstrip("-").isdigit():
            raise InvalidRequest("X-Priority must be an integer", param="priority")
        value = int(text)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("'priority' must be an integer", param="priority")
    return value


def timeout_ms_of(request: web.Request) -> float | None:
    text = request.headers.get("X-Timeout-Ms")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest("X-Timeout-Ms must be a number of milliseconds") from None
    if not value > 0:
        raise InvalidRequest("X-Timeout-Ms must be positive")
    return value
