"""LAN security for the data plane: API keys, per-key rate limits and priority caps, and limits
that keep slow or greedy clients from holding the server (connections, body read deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

from aiohttp import web

from appliance.api.common import CONFIG, METRICS
from appliance.auth import KeyRateLimiter, KeyStore, TokenBucket, presented_key
from appliance.errors import ApplianceError, Overloaded, Unavailable

KEYS = web.AppKey("keys", KeyStore)
LIMITER = web.AppKey("limiter", KeyRateLimiter)
AUTH_TIMEOUT_S = 5.0
KEY = "api_key"  # request-scoped: the authenticated ApiKeyRecord
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


class Unauthorized(ApplianceError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


def keystore(records: list[dict[str, Any]]) -> KeyStore:
    return KeyStore.from_records(records)


def keys_required(app: web.Application) -> bool:
    required = app[CONFIG].file.auth.required
    return app[KEYS].active_count() > 0 if required is None else required


def needs_key(request: web.Request) -> bool:
    """Whether this request must present an API key (cheap: most boxes run without keys)."""
    path = request.path
    cfg = request.app[CONFIG].file.auth
    return not (
        path in OPEN_PATHS or (path == "/metrics" and cfg.metrics_public) or not keys_required(request.app)
    )


async def authenticate(request: web.Request) -> None:
    """Check the presented key and its rate limit (raises the API error); remembers the key on the
    request for the pipeline's priority cap. Call only when :func:`needs_key` says so."""
    presented = presented_key(request.headers)
    if presented is None:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'")
    try:
        # Bounded: the key check (scrypt on a worker thread) must never hold a request forever.
        # ... and within the client's own deadline when it set one.
        limit = AUTH_TIMEOUT_S
        with contextlib.suppress(ValueError):
            limit = min(limit, max(float(request.headers.get("X-Timeout-Ms", "inf")) / 1000, 0.001))
        record = await asyncio.wait_for(request.app[KEYS].authenticate_async(presented), limit)
    except asyncio.TimeoutError:
        raise Unavailable("the API key could not be checked in time; retry", retry_after_s=1.0) from None
    if record is None:
        raise Unauthorized("the API key is not valid or has been revoked")
    wait = request.app[LIMITER].check(record)
    if wait > 0:
        err = Overloaded(f"the rate limit of key '{record.name}' is exceeded", retry_after_s=wait)
        err.code = "rate_limited"
        raise err
    request[KEY] = record


_MAX_TRACKED = 4096
_RATE_503 = b'{"error":"the server is over its request-rate ceiling; retry"}'


class RateCeilings:
    """Global and per-connection request-rate ceilings, checked before the body is read: when even
    early shedding cannot keep up, a minimal 503 costs the loop next to nothing."""

    def __init__(self, rate: float, per_connection: float) -> None:
        self.glob = TokenBucket(rate, max(rate / 10, 1)) if rate > 0 else None
        self.per_connection = per_connection
        # Keyed by the connection's handler object (hashed by identity): its bucket and when it
        # was last used; idle entries are pruned when the table grows (a bucket idle 10 s is full).
        self._conns: dict[Any, list[Any]] = {}

    def check(self, request: web.Request) -> float:
        wait = self.glob.try_take() if self.glob is not None else 0.0
        conn = request.protocol
        if wait or self.per_connection <= 0 or conn is None:
            return wait
        now = time.monotonic()
        entry = self._conns.get(conn)
        if entry is None:
            if len(self._conns) >= _MAX_TRACKED:
                self._conns = {k: v for k, v in self._conns.items() if now - v[1] < 10.0}
            bucket = TokenBucket(self.per_connection, max(self.per_connection / 10, 1))
            entry = self._conns[conn] = [bucket, now]
        else:
            entry[1] = now
        taken: float = entry[0].try_take()
        return taken


CEILINGS = web.AppKey("ceilings", RateCeilings)


def over_ceiling(request: web.Request) -> web.Response | None:
    """The minimal 503 for a POST over a rate ceiling (before its body is read), else None."""
    wait = request.app[CEILINGS].check(request)
    if wait <= 0:
        return None
    metrics = request.app[METRICS]
    metrics.child(metrics.shed, "rate_ceiling").inc()
    return web.Response(
        status=503,
        body=_RATE_503,
        headers={"Retry-After": str(max(1, math.ceil(wait))), "Content-Type": "application/json"},
    )


_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 40\r\nConnection: close\r\n\r\n{"error": "too many connections, retry"}'
)


class LimitedRunner(web.AppRunner):
    """An AppRunner whose server caps open connections.

    aiohttp has no such knob. At the cap a new connection takes the place of the one idle longest
    (waiting for its next request, or for the rest of a request's head), as nginx reuses idle
    keep-alive connections when it runs out: a client holding a thousand idle sockets cannot lock
    others out for the keep-alive timeout, and the client of an idle one just reconnects. Only
    when every connection has a request in flight does the newcomer get a plain 503 with
    Retry-After and close, instead of piling up until clients time out.
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
            if len(server.connections) > limit and not _close_idlest(server.connections, handler):
                transport.write(_TOO_MANY)
                transport.close()

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server


def _close_idlest(connections: list[Any], newcomer: Any) -> bool:
    """Close the connection idle longest, other than ``newcomer``; False when none is idle.

    aiohttp's RequestHandler does not say whether it is idle, so this reads what its keep-alive
    check reads (``_process_keepalive``): a request in flight or queued makes it busy, and its
    keep-alive deadline orders the idle ones. Where an aiohttp release lacks those attributes,
    every connection reads as busy, which is the plain 503 above.
    """
    idlest, deadline = None, math.inf
    for handler in connections:
        if handler is newcomer or getattr(handler, "_force_close", True):
            continue
        if getattr(handler, "_request_in_progress", True) or getattr(handler, "_messages", True):
            continue
        due = getattr(handler, "_next_keepalive_close_time", math.inf)
        if due < deadline:
            idlest, deadline = handler, due
    if idlest is None:
        return False
    idlest.force_close()
    if idlest.transport is not None:
        idlest.transport.close()
    return True
