"""Structured logs: one JSON object per line on stdout, for journald and log shippers.

Records are formatted where they are logged (often on the event loop) but written to stdout by
one thread: a stdout nobody reads (a stuck journald, ``appliance serve | less`` left paused)
blocks that thread, not the loop. Its queue is bounded; past it records are dropped and counted
(``appliance_log_records_dropped_total``), and one line says how many once writing resumes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import logging.handlers
import queue
import sys
import threading
import time
import traceback
from typing import TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError


class JsonFormatter(logging.Formatter):
    """One JSON object per record. Every request writes one (the access log) on the event loop,
    so this is kept cheap: orjson, and the timestamp's seconds formatted once per second."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        doc = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc, default=str).decode()
        except orjson.JSONEncodeError:
            # A string UTF-8 cannot hold: a lone surrogate, as a client's bytes that are not UTF-8
            # decode to (aiohttp reads header values and paths with surrogateescape). The line is
            # still written, each such character escaped, rather than lost to logging's own
            # "--- Logging error ---" on stderr.
            return orjson.dumps({k: _encodable(v) for k, v in doc.items()}, default=_encodable).decode()


def _encodable(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return _encodable(str(value))


class MalformedRequests(logging.Filter):
    """aiohttp logs each request its parser refuses (a bad chunk size, a header line too long, a
    control character in a header, a body that does not decode) as an error with a traceback,
    after answering it 4xx. That is
    the client's fault, not the server's: here it is one info line, as any refused request is in
    the access log, and a fuzzer cannot flood the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError):
            # A body that does not decode (bad gzip, deflate or brotli data), met again when
            # aiohttp drains the rest of a body the route had already answered with a 4xx (no
            # longer for a compressed body, dropped undecoded: api.security._Unlingering).
            cause = exc.__cause__
            exc = (
                cause
                if isinstance(cause, HttpProcessingError)
                else HttpProcessingError(code=400, message=str(exc))
            )
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            first = (exc.message or type(exc).__name__).splitlines()[0][:200]
            record.msg, record.args = "malformed request refused (%d): %s", (exc.code, first)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


def quiet_malformed_requests() -> None:
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())


# Records waiting for the writer thread: a few seconds of a busy server's access lines, a few MB.
QUEUE_RECORDS = 10_000
STOP_TIMEOUT_S = 2.0  # shutdown waits this long for queued lines to reach a stdout that may be stuck

_drops_lock = threading.Lock()
_dropped_total = 0  # read by telemetry (appliance_log_records_dropped_total) through dropped()
_listener: _Listener | None = None


def dropped() -> int:
    """Log records dropped so far: the writer thread's queue was full (a stuck stdout), or the
    write failed (a closed or broken stdout)."""
    return _dropped_total


def _count_dropped() -> None:
    global _dropped_total
    with _drops_lock:
        _dropped_total += 1


class _Queued(logging.handlers.QueueHandler):
    """Formats on the logging thread (its args may change, its traceback is live) and hands the
    finished line to the writer thread; never blocks: a full queue drops the record, counts it,
    and the next record that fits is preceded by one line saying how many were dropped."""

    def __init__(self, q: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(q)
        self._unreported = 0  # guarded by the handler's lock (Handler.handle holds it around emit)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        line = self.format(record)
        done = copy.copy(record)
        done.msg, done.args = line, None
        done.exc_info = done.exc_text = done.stack_info = None
        return done

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self._unreported:
                notice = logging.LogRecord(
                    __name__,
                    logging.WARNING,
                    __file__,
                    0,
                    "%d log records dropped: stdout was not being read",
                    (self._unreported,),
                    None,
                )
                notice.fields = {"dropped": self._unreported}
                self.queue.put_nowait(self.prepare(notice))
                self._unreported = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self._unreported += 1
            _count_dropped()


class _Listener(logging.handlers.QueueListener):
    """The writer thread: writes each finished line to the stream. Not through a
    ``logging.Handler``: at exit ``logging.shutdown()`` takes every handler's lock, and a write
    stuck on an unread stdout holds it, so the process would hang there instead of exiting.

    It cannot die, so it is not supervised: ``handle`` catches whatever a write raises (a closed
    or broken pipe), counts the line as dropped, and says so on stderr once per broken spell,
    itself guarded: stderr may be the same dead pipe (``serve 2>&1 | tee`` after tee exited), and
    an exception out of ``handle`` would end the thread (``QueueListener`` catches nothing)."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None], stream: TextIO) -> None:
        super().__init__(records)
        self._records = records
        self._stream = stream
        self._broken = False

    def handle(self, record: logging.LogRecord) -> None:
        try:
            self._stream.write(f"{record.msg}\n")
            self._stream.flush()
        except Exception:
            _count_dropped()
            if not self._broken:
                self._broken = True
                with contextlib.suppress(Exception):
                    traceback.print_exc(file=sys.stderr)
        else:
            self._broken = False

    def stop(self) -> None:
        # QueueListener.stop() puts its sentinel with put_nowait (Full on a stuck stdout's full
        # queue) and joins without a bound: a shutdown must not hang on an unread pipe.
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._records.put(None, timeout=STOP_TIMEOUT_S)  # QueueListener's sentinel
        except queue.Full:
            return
        thread.join(STOP_TIMEOUT_S)


def shutdown() -> None:
    """Write what is queued and stop the writer thread, waiting at most about ``2 * STOP_TIMEOUT_S``.
    What is logged after it (atexit hooks, a late thread) is written directly, not queued for a
    thread that no longer reads."""
    global _listener
    listener, _listener = _listener, None
    if listener is None:
        return
    listener.stop()
    root = logging.getLogger()
    for i, handler in enumerate(root.handlers):
        if isinstance(handler, _Queued):
            direct = logging.StreamHandler(sys.stdout)
            direct.setFormatter(handler.formatter)
            root.handlers[i] = direct


def setup(level: str, fmt: str = "json") -> None:
    global _listener
    shutdown()
    records: queue.Queue[logging.LogRecord | None] = queue.Queue(QUEUE_RECORDS)
    handler = _Queued(records)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _listener = _Listener(records, sys.stdout)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither format shows where a record was logged from, nor its thread or process: skip
    # collecting them for every record (the logging HOWTO's "Optimization"); walking the stack
    # for the caller was a third of an access line's cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    setattr(logging, "logAsyncioTasks", False)  # noqa: B010 (3.12+: the record's asyncio task name)
    # aiohttp's own access log would duplicate ours, without the model and priority.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    quiet_malformed_requests()
    # A Python warning (a library's RuntimeWarning or DeprecationWarning) went to stderr as raw
    # text, outside the JSON lines a log shipper parses: it is a record of logger py.warnings.
    logging.captureWarnings(True)
