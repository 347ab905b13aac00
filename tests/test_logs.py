"""Structured logs (appliance/logs.py): one JSON object per line, with the fields a record carries.

The formatter runs for every request (the access log, on the event loop), so it formats the
timestamp's seconds once per second and serialises with orjson; these tests pin what a log
shipper sees.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

from appliance.logs import JsonFormatter
from tests.conftest import ROOT

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


def test_a_python_warning_is_a_json_line_on_stdout() -> None:
    """Found by fuzzing: numpy's RuntimeWarning went to stderr as raw text, outside the JSON log.
    After logs.setup() a warning is a JSON line of logger py.warnings on stdout."""
    code = (
        "import warnings\n"
        "from appliance import logs\n"
        "logs.setup('info', 'json')\n"
        "warnings.warn('something odd', RuntimeWarning)\n"
        "logs.shutdown()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert "something odd" not in proc.stderr, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["logger"] for d in docs] == ["py.warnings"], docs
    assert docs[0]["level"] == "warning" and "RuntimeWarning: something odd" in docs[0]["msg"]


# A real server whose stdout is a pipe: logs.setup() as `appliance serve` does, no models (the
# loop and its logging are what is tested), and 10,000 lines logged on the event loop. The queue
# is cut to 1,000 records so that it fills within those lines.
UNREAD_STDOUT_SERVER = textwrap.dedent(
    """
    import asyncio, logging, sys
    from appliance import logs
    from appliance.config import parse
    from appliance.server import Server

    logs.QUEUE_RECORDS = 1_000
    logs.setup("info", "json")

    async def main() -> None:
        cfg = parse(
            {"model_repository": sys.argv[1], "data_dir": sys.argv[2],
             "server": {"host": "127.0.0.1", "port": int(sys.argv[3])}, "admin": {"port": -1}},
            None,
            env={},
        )
        server = Server(cfg, env={})
        await server.start()
        for i in range(10_000):
            logging.getLogger("appliance.test").info("line %d", i)
        sys.stderr.write("LOGGED\\n")
        sys.stderr.flush()
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_a_stdout_nobody_reads_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """journald stuck, or `appliance serve | less` left paused: a write to a full stdout pipe
    blocks. It blocked the event loop (the handler wrote on it), and after ~280 requests every
    request and /healthz timed out, with nothing saying why. Now lines are written by a thread
    from a bounded queue: the loop goes on, the records that do not fit are dropped and counted,
    and one line says how many once stdout is read again."""
    (tmp_path / "engines").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            UNREAD_STDOUT_SERVER,
            str(tmp_path / "engines"),
            str(tmp_path / "data"),
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        logged = threading.Event()
        threading.Thread(
            target=lambda: any(b"LOGGED" in line and not logged.set() for line in proc.stderr or ()),
            daemon=True,
        ).start()
        assert logged.wait(30), "the loop blocked on stdout while logging"
        started = time.monotonic()
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 1.0
        with urllib.request.urlopen(f"{url}/metrics", timeout=1) as resp:
            text = resp.read().decode()
        dropped = [
            line for line in text.splitlines() if line.startswith("appliance_log_records_dropped_total ")
        ]
        assert dropped and float(dropped[0].split()[1]) > 0, dropped

        # Read stdout again: the queued lines come out, then, before the next record, one line
        # saying how many were dropped.
        lines: list[str] = []
        threading.Thread(
            target=lambda: lines.extend(line.decode() for line in proc.stdout or ()), daemon=True
        ).start()
        deadline = time.monotonic() + 30
        notices: list[dict[str, object]] = []
        while not notices and time.monotonic() < deadline:
            urllib.request.urlopen(f"{url}/v1/models", timeout=5).close()  # an access line to write
            time.sleep(0.2)
            notices = [json.loads(line) for line in list(lines) if "log records dropped" in line]
        assert notices, lines[-3:]
        assert notices[0]["level"] == "warning"
        assert isinstance(notices[0]["dropped"], int) and notices[0]["dropped"] > 0
        assert notices[0]["msg"] == f"{notices[0]['dropped']} log records dropped: stdout was not being read"
    finally:
        proc.kill()
        proc.wait()


BROKEN_STDOUT = textwrap.dedent(
    """
    import logging, os, sys, time
    from appliance import logs

    logs.setup("info", "json")
    log = logging.getLogger("appliance.test")
    log.info("first")
    sys.stdin.readline()  # the parent has read "first" and closed its end of stdout
    for i in range(50):
        log.info("after the pipe broke %d", i)
    deadline = time.monotonic() + 10
    while logs.dropped() < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    thread = getattr(logs._listener, "_thread", None)
    sys.stderr.write(f"DROPPED {logs.dropped()} ALIVE {thread is not None and thread.is_alive()}\\n")
    sys.stderr.flush()
    logs.shutdown()
    os._exit(0)  # not the interpreter's own flush of the dead stdout, which says so on stderr
    """
)


def test_a_broken_stdout_drops_lines_says_so_once_and_the_writer_lives_on() -> None:
    """``appliance serve | head``, or a journald that went away: every write fails. Each failed
    line printed its own traceback, and an exception out of the writer would end its thread for
    good (it is not supervised). The lines are counted as dropped, stderr hears of it once per
    broken spell, and the writer thread lives on."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BROKEN_STDOUT],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert b'"msg":"first"' in proc.stdout.readline()
    proc.stdout.close()
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert proc.stderr is not None
    text = proc.stderr.read().decode()
    proc.wait(60)
    assert "ALIVE True" in text, text
    assert int(text.split("DROPPED ")[1].split()[0]) >= 50, text
    assert text.count("Traceback (most recent call last)") == 1, text
