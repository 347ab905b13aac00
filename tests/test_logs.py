"""Structured logs (appliance/logs.py): one JSON object per line, with the fields a record carries.

The formatter runs for every request (the access log, on the event loop), so it formats the
timestamp's seconds once per second and serialises with orjson; these tests pin what a log
shipper sees.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from appliance.logs import JsonFormatter

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(msg: str, args: tuple[object, ...], **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("appliance.access", logging.INFO, __file__, 1, msg, args, None)
    rec.fields = fields
    return rec


def test_an_access_line_is_one_json_object_with_its_fields() -> None:
    fmt = JsonFormatter()
    rec = record("%s %s %d", ("POST", "/v1/embeddings", 200), model="m", priority=None, duration_ms=1.5)
    line = fmt.format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "POST /v1/embeddings 200"
    assert (doc["level"], doc["logger"]) == ("info", "appliance.access")
    assert doc["model"] == "m" and doc["duration_ms"] == 1.5
    assert "priority" not in doc  # unset fields are left out, not written as null
    assert TS.fullmatch(doc["ts"]), doc["ts"]


def test_the_timestamp_follows_the_clock_across_seconds() -> None:
    fmt = JsonFormatter()
    first = record("a", ())
    first.created, first.msecs = 1_796_000_000.25, 250.0
    later = record("b", ())
    later.created, later.msecs = 1_796_000_001.5, 500.0
    assert json.loads(fmt.format(first))["ts"] == "2026-11-30T00:53:20.250Z"
    assert json.loads(fmt.format(later))["ts"] == "2026-11-30T00:53:21.500Z"
    assert json.loads(fmt.format(first))["ts"] == "2026-11-30T00:53:20.250Z"  # and back


def test_exceptions_and_fields_json_cannot_hold_are_kept_as_text() -> None:
    fmt = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("appliance", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.fields = {"path": Path("engines/m"), "ok": True}
    doc = json.loads(fmt.format(rec))
    assert doc["level"] == "error" and "ValueError: boom" in doc["exc"]
    assert doc["path"] == "engines/m" and doc["ok"] is True


def test_a_string_utf8_cannot_hold_is_escaped_and_the_line_still_written() -> None:
    """A client's bytes that are not UTF-8 reach strings as lone surrogates (aiohttp decodes with
    surrogateescape), which orjson refuses: the line was lost to a logging error."""
    fmt = JsonFormatter()
    rec = record("%s %s %d", ("GET", "/v1/\udcff", 404), request_id="a\udcfeb", status=404, model="-")
    doc = json.loads(fmt.format(rec))
    assert doc["msg"] == "GET /v1/\\udcff 404" and doc["request_id"] == "a\\udcfeb"
    assert doc["status"] == 404 and doc["model"] == "-" and doc["level"] == "info"
