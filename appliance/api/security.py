"""LAN security for the data plane: API keys, per-key rate limits and priority caps, and limits
that keep slow or greedy clients from holding the server (connections, body read deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appliance.api.common import CONFIG
from appliance.auth import KeyRateLimiter, KeyStore, presented_key
from appliance.errors import ApplianceError, Overloaded

KEYS = web.AppKey("keys", KeyStore)
LIMITER = web.AppKey("limiter", KeyRateLimiter)
KEY = "api_key"  # request-scoped: the authenticated ApiKeyRecord
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unauthorized(ApplianceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


def keystore(records: list[dict[str, Any]]) -> KeyStore:
    return KeyStore.from_records(records)


def keys_required(app: web.Application) -> bool:
    required = app[CONFIG].file.auth.required
    return app[KEYS].active_count() > 0 if required is None else required


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    cfg = request.app[CONFIG].file.auth
    if path in OPEN_PATHS or (path == "/metrics" and cfg.metrics_public) or not keys_required(request.app):
        return await handler(request)
    presented = presented_key(request.headers)
    if presented is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'")
    record = await request.app[KEYS].authenticate_async(presented)
    if record is None:
        raise Unauthorized("the API key is not valid or has been revoked")
    wait = request.app[LIMITER].check(record)
    if wait > 0:
        err = Overloaded(f"the rate limit of key '{record.name}' is exceeded", retry_after_s=wait)
        err.code = "rate_limited"
        raise err
    request[KEY] = record
    return await handler(request)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within ``server.read_timeout_s``: a trickling client cannot hold a slot."""
    timeout = request.app[CONFIG].server.read_timeout_s
    try:
        # wait_for, not asyncio.timeout (3.11+); on 3.10 its timeout is asyncio.TimeoutError.
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        err = ApplianceError(f"the request body did not arrive within {timeout:.0f} s")
        err.status, err.type, err.code = 408, "invalid_request_error", "request_timeout"
        raise err from None


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 40\r\nConnection: close\r\n\r\n{"error": "too many connections, retry"}'
)


class LimitedRunner(web.AppRunner):
    """An AppRunner whose server caps open connections.

    aiohttp has no such knob; past the cap a new connection gets a plain 503 with Retry-After and
    is closed, instead of piling up until clients time out.
    """

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        accept = server.connection_made
        limit = self._max_connections

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            accept(handler, transport)
            if len(server.connections) > limit:
                transport.write(_TOO_MANY)
                transport.close()

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server
