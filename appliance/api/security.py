"""LAN security for the data plane: API keys, per-key rate limits and priority caps, and limits
that keep slow or greedy clients from holding the server (connections, body read deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import re
import socket
import ssl
import sys
import termios
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from appliance.api.common import (
    CONFIG,
    METRICS,
    OPENAI,
    api_of,
    encoded,
    error_response,
    unsupported_encoding,
)
from appliance.auth import KeyRateLimiter, KeyStore, Throttled, TokenBucket, presented_key
from appliance.errors import ApplianceError, Overloaded, Unavailable
from appliance.timeouts import within

log = logging.getLogger(__name__)

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
        record = await within(request.app[KEYS].authenticate_async(presented), limit)
    except asyncio.TimeoutError:
        raise Unavailable("the API key could not be checked in time; retry", retry_after_s=1.0) from None
    if isinstance(record, Throttled):
        err = Overloaded(
            f"too many keys with id '{record.key_id}' that were never verified: retry later",
            retry_after_s=record.retry_after_s,
        )
        err.code = "key_checks_throttled"
        raise err
    if record is None:
        raise Unauthorized("the API key is not valid or has been revoked")
    wait = request.app[LIMITER].check(record)
    if wait > 0:
        err = Overloaded(f"the rate limit of key '{record.name}' is exceeded", retry_after_s=wait)
        err.code = "rate_limited"
        raise err
    request[KEY] = record


_MAX_TRACKED = 4096
# The share of the global ceiling's burst (beyond one request) each X-Priority must leave behind: under a flood
# the bucket runs low, and what is left goes to the most urgent first (priority 1 takes the last
# token; a request without the header counts as the usual default, 2).
_KEEP_SHARE = {"1": 0.0, "2": 1 / 3, None: 1 / 3}
_LOW_KEEP_SHARE = 2 / 3  # priority 3 and below


class RateCeilings:
    """Global and per-connection request-rate ceilings, checked before the body is read: when even
    early shedding cannot keep up, a minimal 503 costs the loop next to nothing."""

    def __init__(self, rate: float, per_connection: float) -> None:
        # A burst of at least 3: with 1 there is nothing to hold back for priority 1 (a probe's
        # 5 requests/s ceiling let arrival order, not priority, decide).
        self.glob = TokenBucket(rate, max(rate / 10, 3)) if rate > 0 else None
        self.per_connection = per_connection
        # Keyed by the connection's handler object (hashed by identity): its bucket and when it
        # was last used. The data plane's server drops an entry as its connection closes
        # (forget(), from LimitedRunner); the prune when the table grows is for any other server.
        self._conns: dict[Any, list[Any]] = {}

    def check(self, request: web.Request) -> float:
        glob = self.glob
        wait = 0.0
        if glob is not None:
            header = request.headers.get("X-Priority")
            share = _KEEP_SHARE.get(header if header is None else header.strip(), _LOW_KEEP_SHARE)
            # A share of what the burst holds beyond one request: a full bucket admits anyone.
            wait = glob.try_take(1.0, share * (glob.burst - 1.0))
        conn = request.protocol
        if wait or self.per_connection <= 0 or conn is None:
            return wait
        now = time.monotonic()
        entry = self._conns.get(conn)
        if entry is None:
            if conn.transport is None:
                # Closed already (its forget() has run): a bucket stored now would stay, holding
                # the handler, until the prune. A fresh bucket admits one request anyway.
                return 0.0
            if len(self._conns) >= _MAX_TRACKED:
                # Closed connections go, whatever their age (more than _MAX_TRACKED within 10 s,
                # clients without keep-alive, kept the table growing and rebuilt on every newcomer);
                # open ones are at most server.max_connections, so this leaves room.
                self._conns = {
                    k: v for k, v in self._conns.items() if k.transport is not None and now - v[1] < 10.0
                }
            bucket = TokenBucket(self.per_connection, max(self.per_connection / 10, 1))
            entry = self._conns[conn] = [bucket, now]
        else:
            entry[1] = now
        taken: float = entry[0].try_take()
        return taken

    def forget(self, conn: Any) -> None:
        """Drop a closed connection's bucket: kept, it held the connection's handler (with its
        transport and buffers) until the table reached ``_MAX_TRACKED`` entries."""
        self._conns.pop(conn, None)


CEILINGS = web.AppKey("ceilings", RateCeilings)


def over_ceiling(request: web.Request) -> web.Response | None:
    """The 503 for a POST over a rate ceiling (before its body is read), in the API's own error
    shape (rendered once per distinct Retry-After), else None."""
    wait = request.app[CEILINGS].check(request)
    if wait <= 0:
        return None
    metrics = request.app[METRICS]
    metrics.child(metrics.shed, "rate_ceiling").inc()
    err = Unavailable("the server is over its request-rate ceiling; retry", retry_after_s=wait)
    err.code = "rate_ceiling"
    return error_response(api_of(request.path), err)


# Sent before the request is read, so its API is unknown: OpenAI's error object, whose
# ``error`` a KServe client (tritonclient) also reads, as the message.
_TOO_MANY_BODY = (
    b'{"error":{"message":"too many connections; retry","type":"service_unavailable",'
    b'"param":null,"code":"too_many_connections"}}'
)
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_TOO_MANY_BODY)
) + _TOO_MANY_BODY


class UnlingeringRunner(web.AppRunner):
    """An AppRunner whose connections drop undecoded, rather than decode, the rest of a compressed
    body not read to its end, and then close (see :class:`_Unlingering`), and answer a request
    the HTTP parser refuses in JSON (see :class:`_JsonErrors`): the admin plane's."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # _JsonErrors, not only _Unlingering: the admin plane answered a header line too long or
        # a malformed Content-Length in aiohttp's text/plain, a 400 where the data plane says 431.
        server.__class__ = _Server
        return server


class LimitedRunner(web.AppRunner):
    """An AppRunner whose server caps open connections and aborts the ones that stopped reading.

    aiohttp has no such knobs. At the cap a new connection takes the place of the one idle longest
    (waiting for its next request, or for the rest of a request's head), as nginx reuses idle
    keep-alive connections when it runs out: a client holding a thousand idle sockets cannot lock
    others out for the keep-alive timeout, and the client of an idle one just reconnects. Only
    when every connection has a request in flight does the newcomer get a plain 503 with
    Retry-After and close, instead of piling up until clients time out.

    On a TLS port a connection counts from its accept, not from its handshake's end (see
    :meth:`tls_protocol`): a client could otherwise hold any number of sockets half-way through
    their handshakes, each for ``server.keepalive_timeout_s``, unseen by the cap. One still
    handshaking is idle in the sense above (it has sent no request), so it is the first to go for
    a newcomer once it is the oldest; when nothing can go, the newcomer is closed at once (a 503
    would need the very handshake there is no room for).

    A connection is busy while its response is being written, and aiohttp awaits the socket's
    drain without a bound: a client that sends requests and never reads the answers would hold a
    busy slot, its handler and the buffered response forever (a slow-read attack, or a client
    stuck in a bug). :meth:`reap_stalled_sends` aborts a connection whose client has received
    nothing of its pending output for ``send_timeout_s``, as nginx's ``send_timeout`` does.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int,
        send_timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self.send_timeout_s = send_timeout_s
        # Per connection with output pending: (bytes pending, writing paused, since when no
        # progress, bytes the client acknowledged or None). Keyed by the handler object (hashed
        # by identity); pruned every sweep.
        self._pending: dict[Any, tuple[int, bool, float, int | None]] = {}
        self._admission: _Admission | None = None

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # its connections' handlers answer parser errors as JSON
        accept, pre_shutdown, lost = server.connection_made, server.pre_shutdown, server.connection_lost
        ceilings = self._app[CEILINGS]
        closed = self._app[METRICS].connections_closed
        admission = self._admission = _Admission(server, self._max_connections, closed)

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            admission.handshaking.pop(handler, None)  # a TLS one: its slot passes to the handler
            accept(handler, transport)
            if not admission.room_for(handler):
                transport.write(_TOO_MANY)
                transport.close()

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            ceilings.forget(handler)  # per connection, not per request: the check stays a dict lookup

        def close_all() -> None:
            pre_shutdown()
            admission.close_handshakes()  # aiohttp's shutdown knows nothing of them

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]
        server.pre_shutdown = close_all  # type: ignore[method-assign]
        return server

    def tls_protocol(
        self, ssl_context: ssl.SSLContext, handshake_timeout_s: float
    ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for a TLS listener (``create_server`` without ``ssl``): each
        connection takes a slot under the cap at its accept (see :class:`_TlsHandshake`) and
        has ``handshake_timeout_s`` to handshake."""
        admission = self._admission
        assert admission is not None, "setup() first"
        server = admission.server
        return lambda: _TlsHandshake(admission, server(), ssl_context, handshake_timeout_s)

    async def reap_stalled_sends(self) -> None:
        """Run for the server's life (a supervised task): every eighth of the timeout, abort the
        connections whose pending output made no progress for ``send_timeout_s``."""
        reaped = self._app[METRICS].connections_closed.labels("send_timeout")
        while True:
            await asyncio.sleep(self.send_timeout_s / 8)
            server = self.server
            if server is None:
                continue
            for handler in self.stalled_sends(server.connections, time.monotonic()):
                log.warning(
                    "aborting a connection whose client received nothing for %.0f s (server.send_timeout_s)",
                    self.send_timeout_s,
                )
                reaped.inc()
                # abort, not close: close() would wait to flush the very buffer nobody reads.
                handler.transport.abort()
                handler.force_close()

    def stalled_sends(self, connections: list[Any], now: float) -> list[Any]:
        """The connections (handlers) whose pending output made no progress for the timeout.

        Output is pending while the transport buffers some or the socket's send queue holds
        bytes the client has not acknowledged (Linux's SIOCOUTQ). The send queue matters on its
        own: on loopback or a LAN it grows to megabytes, so a whole chat stream fits in it, the
        transport's buffer stays empty, and a client that stopped reading its stream held a
        running sequence to its last token (a probe's went on decoding for its whole
        ``max_tokens`` past a 10 s send timeout).

        Progress is the client acknowledging bytes (``tcpi_bytes_acked`` from TCP_INFO: it only
        moves when the client's kernel takes data, whatever the server writes meanwhile). Where
        that count is not available it is the pending output shrinking: the transport's buffer
        plus the send queue. That output also grows when the handler writes more, which it can do
        while writing is not paused; once paused above the high-water mark, any change means the
        client drained it below the low-water mark. Without the count, output only the send queue
        holds is not watched: its growth could not be told from the handler writing more.
        """
        pending, stalled = {}, []
        for handler in connections:
            transport = handler.transport
            if transport is None:
                continue
            buffered = transport.get_write_buffer_size()
            unacked = _unacknowledged(transport)
            if buffered == 0 and unacked == 0:
                continue  # the client has taken everything written so far
            acked = _acknowledged(transport)
            if acked is None and buffered == 0:
                continue
            size = buffered + unacked
            paused = bool(getattr(handler, "writing_paused", False))
            last = self._pending.get(handler)
            if last is None or (
                acked != last[3] if acked is not None else size < last[0] or (last[1] and size != last[0])
            ):
                pending[handler] = (size, paused, now, acked)
                continue
            pending[handler] = (size, paused, last[2], acked)
            if now - last[2] >= self.send_timeout_s:
                stalled.append(handler)
        self._pending = pending
        return stalled


# Refusals of the body itself (too slow, too large): reading the rest of it is what they refuse,
# so they close the connection (RFC 9110, 15.5.9, for a 408) whatever the body's encoding.
_BODY_REFUSALS = frozenset({408, 413})


class _Unlingering(RequestHandler):
    """Discards undecoded the rest of a body that was not read to its end, then closes the
    connection, when the answer closes it anyway: a compressed body (a 415, 401, 404, 405 or 413
    answered before or while reading it), a 408 or 413 for any body, or an answer already marked
    ``Connection: close`` (a 503 while draining).

    aiohttp otherwise lingers for up to 10 s, reading and discarding the rest of the body so that
    the connection can serve another request. A compressed body is decoded as it is read, and the
    pieces come without the loop yielding between them: every other client waited 2.4 s at a
    stretch behind a 0.8 MB brotli body of 4 GiB of zeros, 0.9 s behind a 2 MB gzip one of 2 GiB,
    and that for up to those 10 s. And a body that trickles in held its connection for those 10 s
    past its 408 at ``server.read_timeout_s``, then kept it for another request if it did end.
    Here the answer goes with ``Connection: close`` and a FIN after it (on TLS its close_notify),
    and what the client still sends is dropped as it arrives, raw, for at most the same 10 s
    (closing at once, with the body unread, made the kernel reset the connection: the client
    lost the answer). Meanwhile the connection yields its slot to any newcomer at
    ``server.max_connections`` (see :func:`_close_idlest`). A plain body another answer leaves
    unread (a 401, a 429) is still drained as aiohttp does: reading it costs next to nothing and
    keeps the connection."""

    __slots__ = ("discarding",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.discarding = False  # answered, and dropping the rest of a body until it closes

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        unread = not request.content.is_eof() and (
            resp.status in _BODY_REFUSALS or resp.keep_alive is False or encoded(request)
        )
        if unread and not resp.prepared:
            resp.force_close()
        sent = await super().finish_response(request, resp, start_time)
        if unread:
            self._discard_the_rest()
        return sent

    def _discard_the_rest(self) -> None:
        # With _force_close set, aiohttp's data_received drops what arrives and its request loop
        # neither lingers (decoding) nor takes another request; unlike force_close(), this leaves
        # the transport open to read from.
        self._force_close = True
        self.discarding = True
        transport = self.transport
        if transport is None:
            return
        with contextlib.suppress(NotImplementedError, RuntimeError):  # a transport without flow control
            transport.resume_reading()  # flow control may have paused it, the body unread
        if transport.can_write_eof():
            transport.write_eof()  # after the answer, already in the transport's buffer
        else:
            # TLS has no half-close: its close sends close_notify after the answer, and the TLS
            # layer reads (and drops) what the client still sends until the client closes too.
            transport.close()
        # The client's close ends it sooner (aiohttp's eof_received closes the transport). An
        # abort, not a close: a TLS transport is already closing, and its shutdown waits for a
        # client that may never answer.
        self._loop.call_later(self._lingering_time, transport.abort)


# aiohttp's ContentEncodingError when the decoder of an encoding is not installed (its parser
# raises it as the headers end; a body that does not decode fails later, on the payload).
_DECODER_LACKING = re.compile(r"Can not decode content-encoding: [^(]*\((\w+)\)\. Please install")


class _JsonErrors(_Unlingering):
    """aiohttp answers a request its HTTP parser refuses (a bad chunk size, a header line too
    long, a malformed request line) here, before any route or middleware, in text/plain. This
    answers in the APIs' JSON error shape instead (the path is not known after a parse error, so
    the OpenAI shape), with 431 for a header too long. aiohttp still logs it (logs.py makes that
    one info line) and closes the connection."""

    __slots__ = ()  # as aiohttp's handler: no per-connection __dict__

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs; raises once sending began
        if isinstance(exc, LineTooLong):
            status = 431
        # An encoding aiohttp decodes only with a package that is not installed (zstd without
        # backports.zstd before Python 3.14; br without Brotli) fails in its parser, before the
        # app's 415 for an encoding it does not decode: the same 415 here, not a 400 telling the
        # client to install a package on the server.
        lacking = _DECODER_LACKING.match(exc.message) if isinstance(exc, ContentEncodingError) else None
        err: ApplianceError
        if lacking is not None:
            err = unsupported_encoding(lacking[1])
        else:
            text = (message or plain.reason or "").strip().splitlines()
            err = ApplianceError(f"the request could not be parsed: {text[0][:200] if text else status}")
            err.status = status
            if status < 500:
                err.type, err.code = "invalid_request_error", "malformed_request"
        resp = error_response(OPENAI, err)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


def _unacknowledged(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's send queue the client has not acknowledged (Linux's SIOCOUTQ);
    0 where the platform or the transport cannot say."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(raw, sys.byteorder, signed=True)


# struct tcp_info's tcpi_bytes_acked (a __u64 at byte 120 since Linux 4.1; the struct only grows).
_TCPI_BYTES_ACKED = slice(120, 128)


def _acknowledged(transport: asyncio.BaseTransport) -> int | None:
    """Bytes of output the client has acknowledged so far (Linux's ``tcpi_bytes_acked``); None
    where the platform or the transport cannot say."""
    sock = transport.get_extra_info("socket")
    # Linux's layout only: FreeBSD has a TCP_INFO whose byte 120 is another field.
    if sock is None or not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(raw) < _TCPI_BYTES_ACKED.stop:
        return None
    return int.from_bytes(raw[_TCPI_BYTES_ACKED], sys.byteorder)


async def cut_unsent(server: web.Server | None, until: float) -> int:
    """At shutdown, once the drain is over: wait until ``until`` (``time.monotonic()``) for the
    connections still sending an answer, then abort those left; how many were aborted.

    aiohttp's own shutdown (``runner.cleanup``) waits for such a connection up to its shutdown
    timeout twice (for its handler, then again after cancelling its request), and the handler of
    a client that stopped reading sits on the socket's drain all that while: with that timeout at
    ``server.drain_timeout_s``, after the drain had taken its own, a stop took up to three drain
    timeouts, past systemd's TimeoutStopSec, which then killed the process. Aborted (as the send
    timeout does: close() would wait to flush the very buffer nobody reads), the connection is
    gone and its handler cancelled before aiohttp's shutdown looks at it."""
    if server is None:
        return 0
    while True:
        # A request in progress: its handler runs or its answer is still being written (what
        # aiohttp's shutdown waits for). Where a release lacks the attribute, nothing is cut.
        sending = [h for h in server.connections if getattr(h, "_request_in_progress", False)]
        if not sending or time.monotonic() >= until:
            break
        await asyncio.sleep(0.05)
    for handler in sending:
        if handler.transport is not None:
            handler.transport.abort()
        handler.force_close()
    return len(sending)


class _Admission:
    """Who holds the server's ``max_connections`` slots: the connections aiohttp knows (its
    handlers) and the TLS connections still handshaking, counted from their accept."""

    def __init__(self, server: web.Server, limit: int, closed: Any) -> None:
        self.server = server
        self.limit = limit
        # By their handler (made at the accept, as the loop's own TLS listener makes it), in
        # accept order: the handler's connection_made takes the slot over.
        self.handshaking: dict[Any, _TlsHandshake] = {}
        self._over_cap, self._evicted = closed.labels("over_cap"), closed.labels("idle_evicted")

    def room_for(self, newcomer: Any) -> bool:
        """Whether ``newcomer`` (a handler, already counted) may stay: under the cap, or once the
        idlest other connection is closed for it. False counts it over the cap; its caller
        closes it."""
        if len(self.server.connections) + len(self.handshaking) <= self.limit:
            return True
        # (Walked only at the cap: one already closed may still be listed, see _held.)
        if _held(self.server.connections) + len(self.handshaking) <= self.limit:
            return True
        if _close_idlest(self.server.connections, self.handshaking, newcomer):
            self._evicted.inc()
            return True
        self._over_cap.inc()
        return False

    def close_handshakes(self) -> None:
        for pending in list(self.handshaking.values()):
            pending.close()


class _TlsHandshake(asyncio.Protocol):
    """A TLS connection's first protocol, on a listener that is plain TCP: it takes a slot under
    the cap at the accept, then hands the socket to the loop's own TLS protocol, as
    ``create_server(ssl=...)`` would have from the start.

    With ``create_server(ssl=...)`` the server only hears of a connection once its handshake is
    done: sockets stuck half-way were invisible to the cap. ``loop.start_tls`` is no way out: it
    takes the socket over a loop turn later, and uvloop starts reading at once, so a ClientHello
    could arrive in between, at the wrong protocol (a probe's first connection hung that way).
    Here the switch happens within ``connection_made``, before anything is read."""

    def __init__(
        self, admission: _Admission, handler: Any, ssl_context: ssl.SSLContext, timeout_s: float
    ) -> None:
        self._admission = admission
        self._handler = handler
        self._ssl_context = ssl_context
        self._timeout_s = timeout_s
        self.deadline = math.inf  # the handshake's (loop time), ordered with handlers' keep-alive ones
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = self._raw = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self._timeout_s
        self._admission.handshaking[self._handler] = self
        if not self._admission.room_for(self._handler):
            self.close()  # nothing but a FIN: a 503 in clear text is no answer to a ClientHello
            return
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_over)
        tls = _ssl_protocol(loop)(
            loop, self._handler, self._ssl_context, waiter, True, None, ssl_handshake_timeout=self._timeout_s
        )
        raw.set_protocol(tls)
        tls.connection_made(raw)  # on success it calls the handler's, which takes the slot over

    def _handshake_over(self, waiter: asyncio.Future[None]) -> None:
        self._admission.handshaking.pop(self._handler, None)
        # Read, or asyncio logs "exception was never retrieved" for every failed handshake.
        if (waiter.cancelled() or waiter.exception() is not None) and self._raw is not None:
            self._raw.abort()  # (the TLS protocol closes it too; the loop's listener makes sure)

    def close(self) -> None:
        """Close it now, its slot free at once (for a newcomer, or at shutdown)."""
        self._admission.handshaking.pop(self._handler, None)
        if self._raw is not None:
            self._raw.abort()  # what the handshake wrote so far is worth no flush


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol the loop's own ``create_server(ssl=...)`` uses: uvloop's (Cython, and what
    its start_tls uses too) on uvloop, else asyncio's."""
    if type(loop).__module__.partition(".")[0] == "uvloop":
        uv = sys.modules.get("uvloop.loop")
        if uv is not None and hasattr(uv, "SSLProtocol"):
            return uv.SSLProtocol
    return sslproto.SSLProtocol


def _close_idlest(connections: list[Any], handshaking: dict[Any, _TlsHandshake], newcomer: Any) -> bool:
    """Close the connection idle longest, other than ``newcomer``; False when none is idle.

    aiohttp's RequestHandler does not say whether it is idle, so this reads what its keep-alive
    check reads (``_process_keepalive``): a request in flight or queued makes it busy, and its
    keep-alive deadline orders the idle ones. Where an aiohttp release lacks those attributes,
    every connection reads as busy, which is the plain 503 above. A TLS connection still
    handshaking is idle too, ordered by its handshake's deadline (under the same timeout, so the
    one accepted first goes first). One already answered and dropping the rest of a refused
    body (see :class:`_Unlingering`) goes before all of them.
    """
    idlest: Any = None
    deadline = math.inf
    for handler in connections:
        if handler is newcomer:
            continue
        if getattr(handler, "discarding", False):
            # Answered, and only dropping the rest of a refused body until it closes: nothing
            # is lost by closing it now, so it goes before any connection a client may reuse.
            idlest, deadline = handler, -math.inf
            break
        if getattr(handler, "_force_close", True):
            continue
        if getattr(handler, "_request_in_progress", True) or getattr(handler, "_messages", True):
            continue
        due = getattr(handler, "_next_keepalive_close_time", math.inf)
        if due < deadline:
            idlest, deadline = handler, due
    oldest = next(
        (pending for key, pending in handshaking.items() if key is not newcomer), None
    )  # accept order
    if oldest is not None and oldest.deadline < deadline:
        idlest = oldest
    if idlest is None:
        return False
    if isinstance(idlest, _TlsHandshake):
        idlest.close()
        return True
    transport = idlest.transport
    if transport is not None and (
        getattr(idlest, "discarding", False)
        or (_tls(transport) and (transport.is_closing() or _nothing_unsent(transport)))
    ):
        # A TLS close is an exchange of close_notify that waits for the client (one discarding,
        # or one whose answer said Connection: close, has its close under way already): the
        # connection stayed counted meanwhile, and the newcomer it was closed for was refused a
        # 503 at its handshake's end all the same. Aborted before force_close(), whose close is
        # then a second one: asyncio's TLS transport drops its protocol at a second close, and
        # raised on every later call (this newcomer's connection died of it) or, for abort,
        # did nothing.
        transport.abort()
    idlest.force_close()
    return True


def _held(connections: list[Any]) -> int:
    """How many of aiohttp's connections still hold a socket. One closed (for a newcomer, or
    by its client) stays listed until its handler's task ends, a few loop turns later: a TLS
    newcomer whose handshake ended first, its slot freed for it at its accept, was refused a 503
    as one too many (within a few tries, on uvloop and on asyncio's loop)."""
    return sum(getattr(handler, "transport", True) is not None for handler in connections)


def _tls(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport`` is TLS. A plain one's close is a FIN and it goes at once; one
    closing already flushes what is left of its answer, which an abort would cut."""
    return transport.get_extra_info("sslcontext") is not None


def _nothing_unsent(transport: asyncio.BaseTransport) -> bool:
    """Every answer handed to the kernel: dropping the connection loses nothing."""
    size = getattr(transport, "get_write_buffer_size", None)
    return size is not None and size() == 0
