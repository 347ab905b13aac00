"""Structured logs: one JSON object per line on stdout, for journald and log shippers."""

from __future__ import annotations

import logging
import sys
import time

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


def setup(level: str, fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
