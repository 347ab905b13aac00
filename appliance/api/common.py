"""Shared pieces of the HTTP layer: typed app keys, error shapes, request parameters."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.web_urldispatcher import MatchInfoError, UrlMappingMatchInfo
from multidict import CIMultiDict

from appliance.api.jsonbody import parse_object
from appliance.config import Config
from appliance.errors import ApplianceError, InvalidRequest, NotFound, Unavailable
from appliance.gpu.nvml import GpuSampler
from appliance.inference import EmbeddingService, TensorService
from appliance.llm.service import ChatService
from appliance.models import ModelManager
from appliance.pipeline import Pipeline, Ticket, bounded
from appliance.resilience import SOURCE_HEADER, Answer, Resilience
from appliance.supervisor import Supervisor
from appliance.telemetry import Metrics, RollingStats
from appliance.timeouts import within

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

_R = TypeVar("_R")


# A request body larger than this has the work that grows with it (decoding an infer body's
# tensors, hashing an embeddings request's inputs for its cache key) done on the OffLoop's worker
# threads: a 16 MB one held the event loop for seconds. A smaller one is handled in place, which
# costs less than the hand-off.
OFFLOOP_BYTES = 256 * 1024


class OffLoop:
    """A bounded pool of worker threads for a request's CPU work that grows with its body (decoding
    a large tensor body: 8 MB of JSON numbers held the event loop 1.5 s, stalling every other
    client's probes and streams). Bounded twice: ``workers`` threads run such work, and at most
    ``limit`` jobs are held (running or waiting); past that a request is refused at once with a
    503 and Retry-After rather than queueing work without end behind a flood of large bodies."""

    def __init__(self, workers: int = 2, limit: int = 8) -> None:
        self.workers, self.limit = workers, limit
        self.pending = 0  # jobs submitted and not finished (a job outlives a caller that gave up)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # started on first use

    async def run(self, ticket: Ticket, what: str, fn: Callable[..., _R], *args: Any) -> _R:
        """``fn(*args)`` on a worker thread, awaited within the request's deadline."""
        with self._lock:
            if self.pending >= self.limit:
                raise Unavailable(
                    f"the server is busy with {self.pending} other large request bodies; retry shortly",
                    retry_after_s=1.0,
                )
            self.pending += 1
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="body")
            job: Future[_R] = self._pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        # Counted down when the job ends, not when its caller stops waiting: a job whose request
        # gave up still holds its place until its thread is free again.
        job.add_done_callback(self._done)
        return await bounded(asyncio.wrap_future(job), ticket.remaining(), what)

    def _done(self, _: Future[Any] | None) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


OFFLOOP = web.AppKey("offloop", OffLoop)
# After the drain's end, what a stop may still take in all: failing what still runs, sending its
# last bytes, closing both planes and the services (the models, the response cache).
STOP_GRACE_S = 3.0
# Of that grace, what the answers' end (failing what still runs, sending it) leaves to closing the
# services: with a hung engine those stages spent all of it, and the response cache was not
# closed at all (its queued writes lost, its writer and readers left running).
CLOSE_RESERVE_S = 1.0


class StopClock:
    """The one deadline of a stop, which every stage draws from: the drain, then the runners and
    the services' cleanup. Each stage used to get a bound of its own after the drain (the models'
    close and the cache's close drain_timeout_s + 1 each, on top of the drain's): with a hung
    engine and a stuck cache writer a stop took three times server.drain_timeout_s, past
    systemd's TimeoutStopSec. A second signal (:meth:`cut`) brings the deadline in to
    ``STOP_GRACE_S`` from then, and wakes every stage waiting on it."""

    def __init__(self) -> None:
        self.drain_ends: float | None = None  # time.monotonic(): when the drain's time is up
        self.ends: float | None = None  # when the whole stop's is
        self.cut = asyncio.Event()

    def start(self, drain_timeout_s: float) -> None:
        now = time.monotonic()
        self.drain_ends = now + drain_timeout_s
        self.ends = self.drain_ends + STOP_GRACE_S

    def cut_short(self) -> None:
        now = time.monotonic()
        self.drain_ends = min(self.drain_ends if self.drain_ends is not None else now, now)
        self.ends = min(self.ends if self.ends is not None else math.inf, now + STOP_GRACE_S)
        self.cut.set()

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left of the whole stop, less ``reserve`` kept for later stages (0 once past it)."""
        return max(0.0, self.ends - reserve - time.monotonic()) if self.ends is not None else math.inf

    async def wait(self, aw: Any, *, drain: bool = False) -> bool:
        """Wait for ``aw`` up to the stop's end (``drain``: the drain's end), or until a cut that
        comes meanwhile (what is waited for then is given up at once; a stage after the cut gets
        what is left of its grace); True when it finished. It is not cancelled."""
        task = asyncio.ensure_future(aw)
        end = self.drain_ends if drain else self.ends
        left = math.inf if end is None else end - time.monotonic()
        if task.done() or left <= 0:
            return task.done()
        cut = None if self.cut.is_set() else asyncio.ensure_future(self.cut.wait())
        try:
            await asyncio.wait(
                {task} if cut is None else {task, cut},
                timeout=None if left == math.inf else left,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if cut is not None:
                cut.cancel()
        return task.done()


STOP = web.AppKey("stop", StopClock)
GPU = web.AppKey("gpu", GpuSampler)
RESILIENCE = web.AppKey("resilience", Resilience)
PIPELINE = web.AppKey("pipeline", Pipeline)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
# Optional parts register here as they are enabled: name -> () -> JSON-able (cache, memory, gpu),
# and admin actions "breaker:<verb>" / "cache:purge" -> async callables.
EXTRA_STATS = web.AppKey("extra_stats", dict)
ACTIONS = web.AppKey("actions", dict)

TICKET = "ticket"  # request-scoped: the pipeline's Ticket
# Request-scoped: the error a stream ended with after its 200 went out (an error event). The
# front door counts the request as failed in Triton's statistics: its status says 200.
STREAM_ERROR = "stream_error"
# Request-scoped: the body as read, and as parsed, by the front door (see appliance.api.shedding).
RAW_BODY, BODY = "raw_body", "json_body"
OPENAI, KSERVE, OTHER = "openai", "kserve", "other"
_INTEGER = re.compile(r"-?[0-9]{1,18}")
# Milliseconds in ASCII decimal notation (an exponent allowed): float() would also take "1_000",
# "infinity" and other scripts' digits, which a proxy or a log reader would read differently.
_MILLISECONDS = re.compile(r"[0-9]{1,400}(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,4})?")
# The usual X-Priority values, parsed once (under a flood every request sends one).
_HEADER_PRIORITY = {str(n): n for n in range(1, 10)}


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


# Rendered error bodies and headers, by everything that goes into them: under overload the same
# few refusals are rendered thousands of times a second. Bounded; cleared when full.
_RENDERED: dict[tuple[Any, ...], tuple[bytes, CIMultiDict[str]]] = {}
_RENDERED_MAX = 512


def rendered_error(api: str, exc: ApplianceError) -> tuple[bytes, CIMultiDict[str]]:
    """The body and headers of ``exc``'s response in ``api``'s shape."""
    wait = exc.retry_after_s
    key = (
        api,
        exc.status,
        exc.message,
        exc.type,
        exc.param,
        exc.code,
        None if wait is None else max(1, math.ceil(wait)),
    )
    rendered = _RENDERED.get(key)
    if rendered is None:
        if api == KSERVE:
            body: dict[str, Any] = {"error": exc.message}
        else:
            body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
        # A CIMultiDict: what the response copies its headers into anyway (a dict costs a
        # conversion more per response).
        headers = CIMultiDict({"Content-Type": "application/json", **retry_after(wait)})
        if len(_RENDERED) >= _RENDERED_MAX:
            _RENDERED.clear()
        rendered = _RENDERED[key] = (orjson.dumps(body), headers)
    return rendered


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as JSON, written by orjson: a view of every model (2,000 of them: megabytes) took
    stdlib json ~90 ms of event loop, orjson a tenth of that. Keys that are not strings are
    written as strings, as stdlib json writes them, and numpy scalars as numbers."""
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, status=status, content_type="application/json")


def error_response(api: str, exc: ApplianceError) -> web.Response:
    body, headers = rendered_error(api, exc)
    return web.Response(body=body, status=exc.status, headers=headers)


def http_error(request: web.Request, exc: web.HTTPException) -> ApplianceError:
    """aiohttp's own refusal (no such route, a wrong method, a body too large) as the API error
    the data and admin planes render in their shapes."""
    if exc.status == 413:
        return BodyTooLarge(exc.text or "request body too large")
    if exc.status == 404:  # the router's: no such path (an unknown model is ModelNotFound)
        return NotFound(f"no route for {request.method} {request.path[:200]}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        err = InvalidRequest(
            f"{request.method[:20]} is not allowed on {request.path[:200]}; it takes "
            + ", ".join(sorted(exc.allowed_methods))
        )
        err.status = 405
        return err
    err = InvalidRequest(exc.text or exc.reason)
    err.status = exc.status
    return err


def unmet_expectation(request: web.Request) -> InvalidRequest | None:
    """The 417 for an ``Expect`` other than ``100-continue`` (aiohttp's own was text/plain), to be
    rendered in the plane's shape; None for ``100-continue``."""
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        return None
    err = InvalidRequest(f"Expect {expect[:40]!r} is not supported; only 100-continue is")
    err.status = 417
    return err


async def send_continue(request: web.Request, asked: bool) -> web.StreamResponse | None:
    """Tell a client that holds its body back to send it, when ``asked`` (nothing refuses it
    unread) and it speaks HTTP/1.1; a 499 if it hung up before its 100. aiohttp runs an Expect
    handler outside the middlewares, so a raise here was logged with a traceback per hang-up."""
    if asked and request.version >= (1, 1):
        try:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except ConnectionResetError:
            return web.Response(status=499)
        request.writer.output_size = 0  # the 100 is not part of the response's size
    return None


async def _never_continue(request: web.Request) -> None:
    """No 100 Continue, and no 417: the route's own 404 or 405 is the answer."""
    return None


class MissRouter(web.UrlDispatcher):
    """The router of both planes. A path with no route (404), or a method its path does not take
    (405), is answered by aiohttp's SystemRoute, whose Expect handler is aiohttp's default: it
    told a client that asked first to send its body (up to the body limit) only for the 404 or
    405 to refuse it unread, and it answered any other expectation in text/plain. Here such a
    request is not asked for its body, and gets its 404 or 405 in the API's shape."""

    async def resolve(self, request: web.Request) -> UrlMappingMatchInfo:
        match = await super().resolve(request)
        if isinstance(match, MatchInfoError):
            match.route._expect_handler = _never_continue  # its own route, made for this request
        return match


# Request bodies aiohttp decodes as they arrive (Triton's and KServe's clients can gzip or
# deflate a request); its decoder stops at the body size limit, so a zip bomb is a 413.
DECODED_ENCODINGS = frozenset({"identity", "gzip", "deflate"})


def body_refusal(request: web.Request) -> ApplianceError | None:
    """Why a request's body is refused before any of it is read, or None: a declared length over
    ``server.max_body_bytes`` (413: a client need not send gigabytes to learn that), or a
    Content-Encoding the server does not decode (415)."""
    length = request.content_length
    if length is not None and length > request.client_max_size:
        return BodyTooLarge(
            f"the request body is {length} bytes; the server accepts at most "
            f"{request.client_max_size} (server.max_body_bytes)"
        )
    encoding = _content_encoding(request)
    if encoding is not None and encoding not in DECODED_ENCODINGS:
        return unsupported_encoding(encoding)
    return None


def unsupported_encoding(encoding: str) -> UnsupportedEncoding:
    """The 415 for a Content-Encoding the server does not decode."""
    return UnsupportedEncoding(
        f"Content-Encoding {encoding[:40]!r} is not supported; send the body as identity, "
        "gzip or deflate, in one Content-Encoding header"
    )


def encoded(request: web.BaseRequest) -> bool:
    """Whether the body arrives compressed: its Content-Length then counts compressed bytes, and
    what has been decoded so far says nothing about whether all of it is here."""
    encoding = _content_encoding(request)
    return encoding is not None and encoding != "identity"


def _content_encoding(request: web.BaseRequest) -> str | None:
    """The Content-Encoding, its header lines joined as one list (RFC 9110, 5.3): aiohttp decodes
    by the last line, so reading only the first let ``identity`` then ``br`` past the allow-list."""
    lines = request.headers.getall("Content-Encoding", None)
    if lines is None:
        return None
    return (lines[0] if len(lines) == 1 else ", ".join(lines)).strip().lower()


async def read_body(request: web.Request) -> bytes:
    """The whole body, within ``server.read_timeout_s``: a trickling client cannot hold a slot."""
    raw: bytes | None = request.get(RAW_BODY)
    if raw is not None:
        return raw
    length = request.content_length
    compressed = encoded(request)
    try:
        if length is not None and request.content.total_bytes >= length and not compressed:
            # Already all here (the usual small request): nothing to wait for, so no timer
            # either (a timer costs; at thousands of refusals a second that shows).
            return await request.read()
        timeout = request.app[CONFIG].server.read_timeout_s
        try:
            return await within(_read_decoded(request) if compressed else request.read(), timeout)
        except asyncio.TimeoutError:
            err = ApplianceError(f"the request body did not arrive within {timeout:.0f} s")
            err.status, err.type, err.code = 408, "invalid_request_error", "request_timeout"
            raise err from None
    except web.RequestPayloadError as exc:
        # A body that does not decode (bad gzip or deflate data, a broken chunked framing).
        cause = exc.__cause__
        if isinstance(cause, ContentEncodingError):
            what = f"it is not valid {_content_encoding(request)} data, as its Content-Encoding says"
        elif isinstance(cause, HttpProcessingError):
            what = (cause.message or type(cause).__name__).strip().splitlines()[0][:200]
        else:
            what = type(exc).__name__
        raise InvalidRequest(f"the request body could not be read: {what}") from None


# A compressed body is decoded in pieces as it is read, each piece without yielding: a yield every
# this many decoded bytes keeps the loop serving others while a 16 MB body decodes.
_DECODED_YIELD_BYTES = 1 << 20


async def _read_decoded(request: web.Request) -> bytes:
    """A compressed body, decoded, yielding to the loop as it goes; 413 past ``client_max_size``
    decoded. (``request.read()`` decodes it in pieces of the whole limit, up to 220 ms of the
    loop for a 16 MB body.)"""
    content, limit = request.content, request.client_max_size
    body = bytearray()
    since_yield = 0
    while chunk := await content.readany():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(
                f"the request body decodes to more than {limit} bytes; the server accepts at most "
                f"{limit} (server.max_body_bytes)"
            )
        since_yield += len(chunk)
        if since_yield >= _DECODED_YIELD_BYTES:
            since_yield = 0
            await asyncio.sleep(0)
    raw = bytes(body)
    request[RAW_BODY] = raw
    return raw


async def read_json(request: web.Request) -> dict[str, Any]:
    parsed: dict[str, Any] | None = request.get(BODY)
    if parsed is not None:
        return parsed
    try:
        raw = await read_body(request)
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(str(exc.text or "request body too large")) from None
    return parse_object(raw)


class BodyTooLarge(ApplianceError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedEncoding(ApplianceError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


def requested_priority(request: web.Request, body_value: Any) -> int | None:
    """``priority`` from the body, else the ``X-Priority`` header, type-checked; the pipeline
    resolves the default, the key's cap and the range."""
    value = body_value
    if value is None:
        header = request.headers.get("X-Priority")
        if header is not None:
            value = _HEADER_PRIORITY.get(header)
            if value is None:
                text = header.strip()
                # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses,
                # and a bounded length keeps int() below its digit limit.
                if not _INTEGER.fullmatch(text):
                    raise InvalidRequest(
                        f"X-Priority must be an integer, got {text[:20]!r}", param="priority"
                    )
                value = int(text)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest("'priority' must be an integer", param="priority")
    return value


def admit(
    request: web.Request, model: Any, priority: int | None, *, items: int = 1, timeout_ms: float | None = None
) -> Ticket:
    """The pipeline's first stages for this request (see appliance.pipeline): cheap, before any
    tokenizing, hashing or cache lookup."""
    if isinstance(model, str) and model:
        request["model"] = model
    ticket = request.app[PIPELINE].admit(
        model,
        priority=priority,
        key=request.get("api_key"),
        timeout_ms=timeout_ms if timeout_ms is not None else timeout_ms_of(request),
        items=items,
        cache_control=request.headers.get("Cache-Control", ""),
    )
    request["priority"] = ticket.level
    request[TICKET] = ticket  # released by the middleware when the request ends
    return ticket


def render(answer: Answer, ticket: Ticket, extra: dict[str, str] | None = None) -> web.Response:
    headers = {"Content-Type": answer.content_type, SOURCE_HEADER: answer.source, **(extra or {})}
    if ticket.stored is False:
        headers["X-Appliance-Cache"] = "not-stored"  # FULL durability could not be kept
    return web.Response(body=answer.body, headers=headers)


def timeout_ms_of(request: web.Request) -> float | None:
    text = request.headers.get("X-Timeout-Ms")
    if text is None:
        return None
    digits = text.strip()
    value = float(digits) if _MILLISECONDS.fullmatch(digits) else 0.0
    if not (value > 0 and math.isfinite(value)):
        raise InvalidRequest(
            f"X-Timeout-Ms must be a positive, finite number of milliseconds in ASCII digits "
            f"(e.g. 2000 or 2.5), got {text[:20]!r}",
            param="X-Timeout-Ms",
        )
    return value
