"""The server's own lifetime: what it keeps across reloads and settings changes."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ServerThread, make_repository
from tests.test_admin import slow_settings_saves

MODEL = "all-minilm-l6-v2"


def patch_settings(srv: ServerThread, body: dict[str, Any]) -> int:
    assert srv.server is not None
    req = urllib.request.Request(
        srv.admin_url + "/admin/settings",
        data=json.dumps(body).encode(),
        method="PATCH",
        headers={"Authorization": f"Bearer {srv.server.admin_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def finished_tasks_kept() -> int:
    """asyncio tasks that are done yet still referenced after a full collection."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Task) and o.done())


def test_reloads_queued_behind_settings_saves_leave_no_task_behind(
    tmp_path: Path, minilm_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a soak probe (PATCH /admin/settings and SIGHUP in cycles): each reload that came
    while a PATCH was saving queued a task that the server then kept for its whole life, done,
    with its coroutine: one more asyncio.Task per such reload, without bound (100 cycles, 100
    tasks). The queued reload still runs after the save, and once it has, nothing of it stays."""
    repo = make_repository(tmp_path, {MODEL: minilm_folder})
    path = tmp_path / "appliance.yaml"
    raw = {"admin": {"port": 0, "socket": ""}, "model_repository": str(repo), "data_dir": "data"}
    path.write_text(yaml.safe_dump(raw))
    saved, gate = slow_settings_saves(monkeypatch)
    caplog.set_level("INFO", logger="appliance.server")

    def reloads() -> int:
        return sum(r.getMessage().startswith("configuration reloaded") for r in caplog.records)

    srv = ServerThread(raw, path).start()
    try:
        assert srv.server is not None
        server = srv.server

        def cycle(aging_ms: int) -> None:
            before = reloads()
            saved.clear()
            gate.clear()
            answers: list[int] = []
            change = {"defaults": {"queue": {"aging_ms": aging_ms}}}
            patch = threading.Thread(target=lambda: answers.append(patch_settings(srv, change)))
            patch.start()
            assert saved.wait(10), "the PATCH never reached its save"
            assert srv.call(server.reload) is False, "a reload during the save is queued"
            gate.set()
            patch.join(30)
            assert answers == [200]
            deadline = time.monotonic() + 10
            while reloads() == before:
                assert time.monotonic() < deadline, "the queued reload never ran"
                time.sleep(0.01)

        cycle(1)  # the first one's lazily made objects (the executor's thread, say) in the baseline
        baseline = srv.call(finished_tasks_kept)
        for i in range(20):
            cycle(2 + i)
        kept = srv.call(finished_tasks_kept)
        assert kept - baseline < 5, f"{kept - baseline} finished tasks more after 20 reloads"
    finally:
        gate.set()
        srv.stop()
