"""Opt-in event trace for latency forensics (TEMPORARY, issue 15): ``APPLIANCE_TRACE=path``.

Off (the default) every hook is one global read. On, events (monotonic time first) are appended
to a list from any thread and written as JSON lines by a daemon thread once a second.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

PATH = os.environ.get("APPLIANCE_TRACE", "")
ON = bool(PATH)
_events: list[tuple[Any, ...]] = []
done: dict[int, tuple[int, float]] = {}  # id(request) -> (batch id, resolved at)
ctx: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("p1trace", default=None)


def ev(*fields: Any) -> None:
    _events.append((time.monotonic(), *fields))


def _writer() -> None:
    with open(PATH, "a") as f:
        while True:
            time.sleep(1.0)
            global _events
            batch, _events = _events, []
            for e in batch:
                f.write(json.dumps(e) + "\n")
            f.flush()


_gc_start = [0.0]


def _gc_cb(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.monotonic()
    else:
        ev("gc", info["generation"], time.monotonic() - _gc_start[0], info["collected"])


_beat = [0.0]


async def _probe() -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + 0.005
        _beat[0] = time.monotonic()
        await asyncio.sleep(0.005)
        lag = loop.time() - due
        if lag > 0.005:
            ev("lag", lag)


def _cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _watch(tid: int, ident: int) -> None:
    """While the loop is stalled past 40 ms: its thread's stack every 20 ms and its CPU time, so a
    stall reads as code running on the loop (CPU rising) or the thread kept off the cores."""
    import sys
    import traceback

    while True:
        time.sleep(0.02)
        beat = _beat[0]
        late = time.monotonic() - beat
        if beat and late > 0.04:
            frame = sys._current_frames().get(ident)
            stack = traceback.format_stack(frame, limit=12) if frame is not None else []
            ev("stall", beat, late, _cpu(tid), [ln.strip().replace("\n", " | ") for ln in stack[-8:]])


def start() -> None:
    if not ON:
        return
    threading.Thread(target=_writer, daemon=True, name="trace-writer").start()
    gc.callbacks.append(_gc_cb)
    task = asyncio.get_running_loop().create_task(_probe())
    args = (threading.get_native_id(), threading.get_ident())
    threading.Thread(target=_watch, args=args, daemon=True, name="trace-watch").start()
    _keep.append(task)


_keep: list[Any] = []
