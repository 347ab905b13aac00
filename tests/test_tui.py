"""The operator console (tui/) driven with Textual's Pilot against the real server.

The behaviour tests run the real in-process server with the real all-MiniLM-L6-v2 model and talk
to it over HTTP (TCP with the admin token, or the Unix socket), exactly as ``appliance tui`` does;
the server runs on its own loop in a thread while the console runs on pytest's loop.

Two exceptions. The scripted tests talk over HTTP to a scripted admin API on the test's own loop
(``ScriptedAdmin``), for what the real server never does on request: hundreds of models, numbers
JSON cannot hold, a stall, a restart, a load that lasts as long as the test wants. The snapshot
tests at the end need pixel-stable screens (no uptimes, no measured latencies, a GPU on a CPU-only
box), so they talk to a tiny fake admin server that serves fixed payloads; nothing else uses it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import textual.widgets._data_table as data_table_module
import yaml
from aiohttp import web
from textual.command import CommandList
from textual.pilot import Pilot
from textual.widgets import Button, Input, Label, Select, Static
from textual.widgets.data_table import ColumnKey

from appliance.api.common import RESILIENCE
from appliance.gpu import cuda
from tests.conftest import ServerThread, make_repository
from tui import view
from tui.app import discover
from tui.client import AdminClient, ApiError, Disconnected, TimedOut, Unauthorized
from tui.commands import ConsoleCommands
from tui.confirm import ConfirmScreen
from tui.console import ConsoleApp
from tui.state import CONNECTED, DISCONNECTED, ERROR
from tui.tuning import SettingRow, TuningScreen
from tui.widgets import (
    ModelsTable,
    Panel,
    StatusBar,
    bar_levels,
    breaker_lines,
    cache_lines,
    compute_lines,
    fmt_lag,
    generation_lines,
    gpu_lines,
    loop_lines,
    memory_lines,
    nice_ceiling,
    refusal_lines,
    worker_lines,
)

MODEL = "all-minilm-l6-v2"
SIZE = (120, 36)


async def wait_until(
    pilot: Pilot[Any], predicate: Callable[[], bool], what: str, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def admin_get(srv: ServerThread, path: str) -> Any:
    assert srv.server is not None
    req = urllib.request.Request(
        srv.admin_url + path, headers={"Authorization": f"Bearer {srv.server.admin_token}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def cell(app: ConsoleApp, column: str, model: str = MODEL) -> str:
    table = app.screen.query_one(ModelsTable)
    return str(table.get_cell(model, column))


def status_text(app: ConsoleApp) -> str:
    return str(app.screen.query_one(StatusBar).content)


def tcp_client(srv: ServerThread) -> AdminClient:
    assert srv.server is not None
    return AdminClient(srv.admin_url, token=srv.server.admin_token)


async def embed(srv: ServerThread, n: int) -> None:
    for i in range(n):
        status, body, _ = await asyncio.to_thread(
            srv.post, "/v1/embeddings", {"model": MODEL, "input": [f"console traffic {i}"]}
        )
        assert status == 200, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- against the real server -------------------------------------------------------------------


async def test_dashboard_shows_real_numbers_after_traffic(
    start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    srv = start_server({MODEL: minilm_folder})
    app = ConsoleApp(tcp_client(srv), interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
        assert cell(app, "state") == "resident"
        if not cuda.probe().ok:  # the backend, and why nothing faster: what /admin/stats says
            assert cell(app, "backend") == "ORT CPU ↓" and cell(app, "why") == "no CUDA device"
        await embed(srv, 8)
        await wait_until(pilot, lambda: float(cell(app, "rps")) > 0, "a non-zero request rate")
        assert float(cell(app, "p50")) > 0 and float(cell(app, "p99")) > 0
        # Three priority levels, nothing waiting once the traffic is over (a poll taken while a
        # request was queued may still be the one shown: waited for, not asserted at once).
        await wait_until(pilot, lambda: cell(app, "queue") == "0 / 0 / 0", "empty queues")
        text = status_text(app)
        assert "connected" in text and "CPU only" in text and srv.admin_url.removeprefix("http://") in text
        assert max(app.history.values("requests_per_s")) > 0
        # Graphs exist only for data the server has: no GPU graphs on a CPU-only server.
        assert app.screen.query_one("#graph-requests-per-s").display
        assert not app.screen.query_one("#graph-gpu-utilization").display
        assert not app.screen.query_one("#gpu-panel").display
        assert app.screen.query_one("#cache-panel").display  # the response cache is on by default

        # Refresh keys: faster/slower step through the intervals; pause stops the polls.
        await pilot.press("minus", "minus")  # slower: 0.2 -> 0.25 -> 0.5
        assert app.interval == 0.5
        await pilot.press("plus")
        assert app.interval == 0.25 and "every 0.25 s" in status_text(app)
        await pilot.press("p")
        await wait_until(pilot, lambda: not app._in_flight, "the last poll")
        polls = app.polls
        await pilot.pause(0.6)
        assert app.polls == polls and "paused" in status_text(app)
        await pilot.press("r")  # an explicit refresh polls even while paused
        await wait_until(pilot, lambda: app.polls == polls + 1, "the forced poll")

    # Polls never overlap: with a server slower than the interval (the real client and server,
    # with a delay in front of each poll) there is one request at a time and ticks are skipped.
    class SlowClient(AdminClient):
        in_flight = most = 0

        async def stats(self) -> Any:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            try:
                await asyncio.sleep(0.3)
                return await super().stats()
            finally:
                self.in_flight -= 1

    slow_client = SlowClient(srv.admin_url, token=srv.server.admin_token if srv.server else None)
    slow = ConsoleApp(slow_client, interval=0.05)
    async with slow.run_test(size=SIZE) as pilot:
        started = time.monotonic()
        # By polls, not by a fixed pause: on a loaded box one poll may take well over its 0.3 s.
        await wait_until(pilot, lambda: slow.polls >= 2, "two slow polls")
        elapsed = time.monotonic() - started
        assert slow_client.most == 1 and slow.skipped_ticks >= 3
        assert slow.polls <= elapsed / 0.3 + 1, "each poll took at least its 0.3 s: none overlapped"

    # The client's typed errors, against the same real server.
    wrong = await AdminClient(srv.admin_url, token="not-the-token").stats()
    assert isinstance(wrong.error, Unauthorized)
    nobody = AdminClient(f"http://127.0.0.1:{free_port()}", token="x")
    down = await nobody.stats()
    assert isinstance(down.error, Disconnected) and down.error.message == "connection refused"
    await nobody.close()


async def test_tuning_form_reaches_server_and_config_file(tmp_path: Path, minilm_folder: Path) -> None:
    repo = make_repository(tmp_path, {MODEL: minilm_folder})
    config: dict[str, Any] = {
        "model_repository": str(repo),
        "data_dir": "data",
        "admin": {"port": 0, "socket": "data/admin.sock"},
    }
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config))
    srv = ServerThread(config, path).start()
    try:
        assert srv.server is not None and srv.server.admin_socket is not None
        # discover() reads the socket from the same file the server was started with.
        client = discover(config=str(path))
        assert client.socket == srv.server.admin_socket
        app = ConsoleApp(client, interval=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            await pilot.press("t")
            assert isinstance(app.screen, TuningScreen)
            screen = app.screen

            def row(name: str) -> SettingRow:
                return screen.query_one(f"#row-{name.replace('.', '--')}", SettingRow)

            await wait_until(
                pilot,
                lambda: bool(screen.query(SettingRow)) and row("batching.max_batch_size").current == 32,
                "form",
            )

            async def type_into(name: str, text: str) -> None:
                box = row(name).query_one(Input)
                box.focus()
                box.value = ""
                await pilot.press(*text)

            # Out of bounds: the server refuses, and its message lands next to the field.
            await type_into("batching.max_batch_size", "5000")
            assert "1 pending change" in str(screen.query_one("#pending").content)
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: row("batching.max_batch_size").has_class("-invalid"), "the error")
            message = str(row("batching.max_batch_size").query_one(".field-error").content)
            assert "batching.max_batch_size" in message and "1024" in message, message
            assert admin_get(srv, "/admin/settings")["defaults"]["batching.max_batch_size"] == 32

            # Revert puts the server's value back in the editor.
            await pilot.press("ctrl+r")
            assert row("batching.max_batch_size").query_one(Input).value == "32"

            # A valid value: PATCHed (only it), applied by the server and written to the YAML file.
            await type_into("batching.max_batch_size", "8")
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: row("batching.max_batch_size").current == 8, "the applied value")
            settings = await asyncio.to_thread(admin_get, srv, "/admin/settings")
            assert settings["defaults"]["batching.max_batch_size"] == 8
            assert settings["overrides"]["defaults"] == {"batching.max_batch_size": 8}
            assert yaml.safe_load(path.read_text())["defaults"] == {"batching": {"max_batch_size": 8}}

            # One model's own value goes under models.<name>.
            scope = screen.query_one("#scope", Select)
            scope.value = MODEL
            await wait_until(pilot, lambda: screen.scope == MODEL, "the model scope")
            await type_into("queue.aging_ms", "5")
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: row("queue.aging_ms").current == 5.0, "the model's value")
            settings = await asyncio.to_thread(admin_get, srv, "/admin/settings")
            assert settings["models"][MODEL]["queue.aging_ms"] == 5.0
            # model.yaml's own max_batch_size (16) outranks the server-wide default set above.
            assert settings["models"][MODEL]["batching.max_batch_size"] == 16
            assert "model.yaml" in str(row("batching.max_batch_size").query_one(".current").content)
            saved = yaml.safe_load(path.read_text())
            assert saved["models"] == {MODEL: {"queue": {"aging_ms": 5.0}}}
            assert saved["defaults"] == {"batching": {"max_batch_size": 8}}

            await pilot.press("escape")
            assert not isinstance(app.screen, TuningScreen)
    finally:
        srv.stop()


def breaker_state(srv: ServerThread) -> str:
    def read() -> str:
        b = srv.app[RESILIENCE].breakers.get(MODEL)
        return "closed" if b is None else str(b.snapshot()["state"])

    return str(srv.call(read))


async def test_actions_after_confirmation(
    start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    srv = start_server({MODEL: minilm_folder})
    assert srv.server is not None and srv.server.admin_socket is not None
    app = ConsoleApp(AdminClient(socket=srv.server.admin_socket), interval=0.2)  # no token on the socket

    def cache_entries() -> int:
        return int(((app.snapshot.stats or {}).get("cache") or {}).get("entries", -1))

    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.screen.query_one(ModelsTable).row_count == 1, "the models table")
        await embed(srv, 2)
        await wait_until(pilot, lambda: cache_entries() == 2, "two cached responses")

        # Breaker, by key: declined first (nothing is sent), then confirmed.
        await pilot.press("o")
        assert isinstance(app.screen, ConfirmScreen)
        assert MODEL in str(app.screen.query_one("#question").content)
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.pause(0.3)
        assert breaker_state(srv) == "closed"
        await pilot.press("o", "y")
        await wait_until(pilot, lambda: cell(app, "breaker") == "forced open", "the breaker column")
        assert breaker_state(srv) == "forced_open"
        stats = await asyncio.to_thread(admin_get, srv, "/admin/stats")
        assert stats["models"][MODEL]["breaker"]["state"] == "forced_open"
        status, _, _ = await asyncio.to_thread(
            srv.post, "/v1/embeddings", {"model": MODEL, "input": ["never seen before"]}
        )
        assert status == 503  # the data plane refuses the model (no cache entry for this input)

        # The same actions from the command palette; choosing one still asks first.
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"close minilm")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the palette's confirmation")
        await pilot.press("y")
        await wait_until(pilot, lambda: cell(app, "breaker") == "closed", "the breaker to close")
        assert breaker_state(srv) == "closed"

        # Cache purge for the selected model.
        await pilot.press("x", "y")
        await wait_until(pilot, lambda: cache_entries() == 0, "the purge")

        # Unload, then load again.
        await pilot.press("u", "y")
        await wait_until(pilot, lambda: cell(app, "state") == "available", "the unload")
        await pilot.press("l", "y")
        await wait_until(pilot, lambda: cell(app, "state") == "resident", "the load")


async def test_read_only_hides_actions(
    start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    srv = start_server({MODEL: minilm_folder})
    app = ConsoleApp(tcp_client(srv), read_only=True, interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.screen.query_one(ModelsTable).row_count == 1, "the models table")
        keys = set(app.screen.active_bindings)
        assert not keys & {"o", "c", "b", "l", "u", "x", "X"}, keys
        assert {"q", "t", "r", "p"} <= keys
        assert "READ-ONLY" in status_text(app)
        await pilot.press("o", "l", "x")
        assert not isinstance(app.screen, ConfirmScreen)
        app.ask("breaker:open", MODEL)  # even called directly (the palette's path), it refuses
        assert not isinstance(app.screen, ConfirmScreen)
        titles = [title for title, _, _ in ConsoleCommands(app.screen)._commands()]
        assert not [t for t in titles if t.startswith(("Breaker", "Load", "Unload", "Purge"))], titles
        assert f"Tune model {MODEL}" in titles

        await pilot.press("t")
        screen = app.screen
        assert isinstance(screen, TuningScreen)
        await wait_until(pilot, lambda: bool(screen.query(SettingRow)), "the form")
        await pilot.pause()
        assert not screen.query("#apply") and not screen.query("#revert")
        assert all(r.query_one(".editor").disabled for r in screen.query(SettingRow))
        assert "ctrl+s" not in screen.active_bindings
    assert breaker_state(srv) == "closed"


async def test_console_survives_server_restart(tmp_path: Path, minilm_folder: Path) -> None:
    repo = make_repository(tmp_path, {MODEL: minilm_folder})

    def config(port: int) -> dict[str, Any]:
        return {
            "model_repository": str(repo),
            "data_dir": str(tmp_path / "data"),
            "admin": {"port": port, "socket": ""},
        }

    first = ServerThread(config(0)).start()
    second: ServerThread | None = None
    try:
        assert first.server is not None
        port = first.server.admin_port  # the second server takes the same port (and token file)
        app = ConsoleApp(tcp_client(first), interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            await embed(first, 3)
            await wait_until(pilot, lambda: float(cell(app, "rps")) > 0, "traffic on the first server")

            await asyncio.to_thread(first.stop)
            await wait_until(pilot, lambda: app.snapshot.status == DISCONNECTED, "the disconnect")
            assert "DISCONNECTED" in status_text(app)
            assert "connection refused" in status_text(app)
            assert app.screen.has_class("-stale")  # last numbers kept, dimmed
            failures = app.snapshot.failures
            await wait_until(pilot, lambda: app.snapshot.failures > failures, "another retry")

            second = ServerThread(config(port))
            await asyncio.to_thread(second.start)
            await wait_until(pilot, lambda: app.snapshot.status == CONNECTED, "the reconnect", timeout=30)
            assert "DISCONNECTED" not in status_text(app) and "connected" in status_text(app)
            assert not app.screen.has_class("-stale")
            await wait_until(pilot, lambda: cell(app, "state") == "resident", "the model on the new server")
            assert float(cell(app, "rps")) == 0  # a new process: its rolling window is empty
    finally:
        first.stop()
        if second is not None:
            second.stop()


def panel_text(app: ConsoleApp, panel: str) -> str:
    return str(app.screen.query_one(f"#{panel}-panel", Panel).content)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_health_panels_show_the_servers_loop_compute_workers_and_refusals(
    start_server: Callable[..., ServerThread], minilm_folder: Path
) -> None:
    """Event-loop lag, the compute arbiter, supervised workers and queue refusals, as the real
    server reports them in /admin/stats; then a worker that dies for good is named on top."""
    srv = start_server({MODEL: minilm_folder}, overrides={MODEL: {"queue": {"max_queue_size": 1}}})
    app = ConsoleApp(tcp_client(srv), interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        # A burst of concurrent requests against a one-place queue: some are refused (429) before
        # any work, and the arbiter grants engine time to the others.
        refused = 0
        for burst in range(5):

            def one(i: int, burst: int = burst) -> int:
                status, _, _ = srv.post("/v1/embeddings", {"model": MODEL, "input": [f"burst {burst} {i}"]})
                return status

            statuses = await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(12)))
            assert set(statuses) <= {200, 429}, statuses
            refused += statuses.count(429)
            if refused:
                break
        assert refused, "no request was refused by a one-place queue"

        def stats() -> dict[str, Any]:
            return app.snapshot.stats or {}

        def settled() -> bool:
            s = stats()
            return (
                s.get("loop", {}).get("samples", 0) > 0
                and s["models"][MODEL]["rejections"]["queue_full"] == refused
                and s["compute"]["granted"] > 0
            )

        await wait_until(pilot, settled, "loop samples, grants and refusals in the stats")
        await pilot.pause()
        s = stats()

        loop = s["loop"]
        text = panel_text(app, "loop")
        for key in ("p50", "p99", "max"):
            assert f"{key} {loop[f'{key}_ms']:.1f} ms" in text or loop[f"{key}_ms"] >= 100, text
        assert f"samples {loop['samples']} / 1 min" in text
        assert ("blocked" in text) == (loop["p99_ms"] > 50)

        compute = s["compute"]
        text = panel_text(app, "compute")
        assert f"running {compute['running']} / {compute['concurrency']}" in text, text
        assert f"granted {compute['granted']:,}" in text
        assert "wait P1 " in text and " P3 " in text  # every level of the model, waiting or not

        text = panel_text(app, "refused")
        assert f"{refused} queue full" in text, text

        text = panel_text(app, "workers")
        assert set(s["workers"]) >= {"cache-writer", "loop-lag"}
        for name in s["workers"]:
            assert f"● {name}" in text, text
        assert "workers down" not in status_text(app)

        # The cache writer thread dies, and cannot be started again (a thread the OS refuses):
        # the supervisor gives up on it, and the console says so on its top line.
        def break_the_writer() -> None:
            cache = srv.app[RESILIENCE].cache
            assert cache is not None

            class Injected(BaseException):
                pass

            def dying(batch: Any, sweep: bool) -> Any:
                raise Injected("injected writer death")

            def no_thread() -> None:
                raise RuntimeError("can't start new thread")

            cache._apply = dying  # type: ignore[method-assign]
            cache._start_writer = no_thread  # type: ignore[method-assign]

        srv.call(break_the_writer)
        await embed(srv, 1)  # a new answer to write: the writer takes it and dies
        # Down first, then (its restart refused after the backoff) given up.
        await wait_until(pilot, lambda: "(given up)" in status_text(app), "the dead worker on top")
        assert "workers down: cache-writer (given up)" in status_text(app)
        assert "✖ cache-writer given up" in panel_text(app, "workers")
        assert stats()["workers"]["cache-writer"] == {
            "up": False,
            "given_up": True,
            "recent_failures": 1,
            "critical": False,
        }


def test_health_views_read_what_the_server_sends() -> None:
    late = fake_stats(9)
    assert view.loop_lag(late) == view.LoopLag(240, 2.1, 58.0, 81.0) and view.loop_lag(late).slow  # type: ignore[union-attr]
    assert not view.LoopLag(10, 1.0, 50.0, 90.0).slow  # the alert is strictly above 50 ms
    c = view.compute(late)
    # The arbiter lists only levels with waiters ({"3": 4} here); the console shows every level.
    assert c == view.Compute(
        concurrency=1, running=1, waiting=((1, 0), (2, 0), (3, 4)), granted=11233, aging_ms=1000.0
    )
    assert view.compute({"compute": {"waiting": {"5": 2}}, "models": {}}).waiting == (  # type: ignore[union-attr]
        (1, 0),
        (2, 0),
        (3, 0),
        (4, 0),
        (5, 2),
    )
    # The urgent lane shows only where it is on (compute.urgent_lane).
    assert not any(str(t).startswith("urgent") for t in compute_lines(late))
    lane = {"compute": {"running": 1, "urgent_lane": 1, "urgent_running": 1}, "models": {}}
    assert view.compute(lane).urgent_running == 1  # type: ignore[union-attr]
    assert [str(t) for t in compute_lines(lane)][:2] == ["running 1 / 1", "urgent 1 / 1"]
    odd = {"compute": {"waiting": {"²": 1, "1000000": 3}}, "models": {"m": {"queue_depth": {"²": 0, "2": 1}}}}
    assert view.compute(odd).waiting == ((1, 0), (2, 0), (1000000, 3))  # type: ignore[union-attr]
    rows = view.worker_rows(late)
    assert [(w.name, w.state) for w in rows][:2] == [("cache-writer", "given up"), ("gpu-sampler", "up")]
    assert [w.name for w in view.workers_down(late)] == ["cache-writer"]
    assert view.workers_down(fake_stats(1)) == []
    r = view.refusals(late)
    assert r is not None and r.per_s == 3.0
    assert r.by_reason == (
        ("queue_full", 365),
        ("would_miss_deadline", 12),
        ("deadline", 3),
        ("cancelled", 1),
    )
    # An older server without these sections: nothing to draw, and no error.
    old = {"models": {"m": {"kind": "embedding"}}}
    assert view.loop_lag(old) is None and view.compute(old) is None
    assert view.worker_rows(old) == [] and view.refusals(old) is None
    assert loop_lines(old) == compute_lines(old) == worker_lines(old) == refusal_lines(old) == []
    assert [str(t) for t in refusal_lines(late)] == [
        "now 3.0/s",
        "365 queue full",
        "12 would miss deadline",
        "4 other",
    ]
    many = {"workers": {f"w{i}": {"up": True} for i in range(9)}}
    assert [str(t) for t in worker_lines(many)][-1] == "+4 more up"


def test_field_errors_attribute_server_messages() -> None:
    names = ["batching.max_batch_size", "queue.default_priority", "queue.priority_levels"]
    found, rest = view.field_errors(
        "defaults.batching.max_batch_size: expected an integer from 1 to 1024, got 5000; "
        "defaults.bogus: unknown setting",
        "defaults.batching.max_batch_size",
        names,
    )
    assert found == {
        "batching.max_batch_size": "defaults.batching.max_batch_size: expected an integer from 1 to 1024, got 5000"
    }
    assert rest == ["defaults.bogus: unknown setting"]
    # Cross-field checks name the leaf only (and mention other settings in passing).
    found, rest = view.field_errors(
        "model m: BatchPolicy.default_priority must be an integer from 1 to priority_levels (3), got 5",
        "BatchPolicy.default_priority",
        names,
    )
    assert list(found) == ["queue.default_priority"] and not rest


def test_changes_nest_into_the_patch_shape_and_a_setting_and_a_group_of_one_name_are_refused() -> None:
    assert view.nest({"batching.max_batch_size": 8, "batching.max_delay_ms": 1, "x": True}) == {
        "batching": {"max_batch_size": 8, "max_delay_ms": 1},
        "x": True,
    }
    # Only a server whose keys hold dots makes a form with both; either order is refused, naming
    # both, rather than one silently replacing the other (or a TypeError killing the apply).
    for flat in ({"a": 1, "a.b": 2}, {"a.b": 2, "a": 1}):
        with pytest.raises(ValueError, match=r"a\.b and .*cannot both be set|a and the settings"):
            view.nest(flat)


def test_backend_and_memory_pools_from_stats() -> None:
    rows = {r.name: r for r in view.model_rows(fake_stats(0))}
    assert view.backend_label(rows["yolov8n"].backend) == "ORT CUDA"
    assert view.short_reason(rows["yolov8n"].backend_reason) == "TensorRT failed: TensorRT build…"
    assert view.short_reason(rows["smollm2-135m-instruct"].backend_reason) == "the CUDA provider did not load"
    assert view.short_reason("TensorRT: no CUDA device (cudaErrorInsufficientDriver)") == "no CUDA device"
    assert rows["reranker"].backend is None and view.backend_label(None) == "—"
    pools = view.memory_pools(fake_stats(0))
    assert [(p.pool, p.models) for p in pools] == [("GPU", 2), ("host", 1)]
    # A CPU-only server has a host pool only; an older server's single budget still shows.
    cpu = {
        "memory": {
            "budget_bytes": 8,
            "used_bytes": 2,
            "device": None,
            "host": {"budget_bytes": 8, "used_bytes": 2},
        }
    }
    assert [p.pool for p in view.memory_pools(cpu)] == ["host"]
    assert [p.pool for p in view.memory_pools({"memory": {"budget_bytes": 8, "used_bytes": 2}})] == ["budget"]
    assert view.memory_pools({}) == []


def test_api_error_is_typed() -> None:
    err = ApiError(400, "x: bad", "x", "invalid")
    assert err.status == 400 and err.param == "x" and err.message == "x: bad"


# -- scripted admin API (what the real server does not do on request) -------------------------


class ScriptedAdmin:
    """An admin API on the test's own loop whose answers the test sets: ``body`` is the raw JSON
    text of /admin/stats (so ``1e400`` and ``Infinity`` reach the console's JSON parser as such)."""

    def __init__(self) -> None:
        self.body = "{}"
        self.stats_requests = 0
        self.stall = False  # /admin/stats never answers
        self.resets = 0  # this many next /admin/stats drop the connection without an answer
        self.loads: list[str] = []
        self.loaded = asyncio.Event()  # loads are answered once the test sets it
        # GET /admin/settings answers this raw JSON text; PATCH records its body and answers the
        # same, once ``patched`` is set.
        self.settings_body = json.dumps(fake_settings())
        self.patches: list[Any] = []
        self.patched = asyncio.Event()
        self.patched.set()
        # (status, content type, text): /admin/stats answers this instead (what a proxy sends).
        self.stats_answer: tuple[int, str, str] | None = None
        self.url = ""
        # A handler still stalled at the end is cancelled at once, not awaited for a minute.
        self._runner = web.AppRunner(self._app(), shutdown_timeout=0.1)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/admin/stats", self._stats)
        app.router.add_post("/admin/models/{model}/load", self._load)
        app.router.add_get("/admin/settings", self._settings)
        app.router.add_patch("/admin/settings", self._patch)
        return app

    def serve(self, doc: Any) -> None:
        self.body = json.dumps(doc)

    async def _stats(self, request: web.Request) -> web.Response:
        self.stats_requests += 1
        if self.resets and request.transport is not None:
            self.resets -= 1
            request.transport.close()  # what a keep-alive connection to a stopped server gets
            await asyncio.Event().wait()
        if self.stall:
            await asyncio.Event().wait()
        if self.stats_answer is not None:
            status, content_type, text = self.stats_answer
            return web.Response(status=status, text=text, content_type=content_type)
        return web.Response(text=self.body, content_type="application/json")

    async def _settings(self, request: web.Request) -> web.Response:
        return web.Response(text=self.settings_body, content_type="application/json")

    async def _patch(self, request: web.Request) -> web.Response:
        self.patches.append(await request.json())
        await self.patched.wait()
        return web.Response(text=self.settings_body, content_type="application/json")

    async def _load(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        self.loads.append(model)
        await self.loaded.wait()
        return web.json_response({"model": model, "state": "resident"})

    async def __aenter__(self) -> ScriptedAdmin:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def scripted_app(admin: ScriptedAdmin, **kw: Any) -> ConsoleApp:
    # An hour-long interval: the console polls once at start, then when the test presses "r".
    return ConsoleApp(AdminClient(admin.url, token="t"), interval=3600, **kw)


def notifications(app: ConsoleApp) -> list[str]:
    """The text of every notification the console sends from now on."""
    notes: list[str] = []
    notify = app.notify

    def record(message: str, **kwargs: Any) -> None:
        notes.append(message)
        notify(message, **kwargs)

    app.notify = record  # type: ignore[method-assign]
    return notes


async def poll(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, ConsoleApp)
    polls = app.polls
    await wait_until(pilot, lambda: not app._in_flight, "the poll in flight")
    await pilot.press("r")
    await wait_until(pilot, lambda: app.polls > polls and not app._in_flight, "the poll")
    await pilot.pause()  # the redraw, and the table's width updates when the loop is idle


def model_stats(n: int, rps: float = 1.0, changes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """/admin/stats with n models, ``model-0`` to ``model-{n-1}``, alike but for ``changes``."""
    models = {
        f"model-{i}": {
            "kind": "embedding",
            "state": "resident",
            "requests_per_s": rps,
            "p50_ms": 1.0,
            "p99_ms": 2.0,
            "queue_depth": {"1": 0, "2": 1, "3": 0},
            "breaker": {"state": "closed"},
            "cache": {"hits": 1, "misses": 1},
        }
        for i in range(n)
    }
    for name, fields in (changes or {}).items():
        models[name].update(fields)
    return {"version": "x", "started_at": 1000.0, "uptime_s": 100, "ready": True, "models": models}


async def test_300_models_refresh_in_one_pass_over_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each poll measures cells at most once per cell of the table, however many change (it was
    once per changed cell per cell of its column: 68 s of frozen UI per poll at 200 models);
    columns still grow to fit new content and shrink when it goes."""
    n, columns = 300, len(ModelsTable.COLUMNS)
    budget = n * columns
    measured = 0
    real_measure = data_table_module.measure

    def counting(*args: Any, **kwargs: Any) -> int:
        nonlocal measured
        measured += 1
        # Past the budget the test has failed already: do not spend minutes finding out by how much.
        return real_measure(*args, **kwargs) if measured <= budget else 1

    monkeypatch.setattr(data_table_module, "measure", counting)
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(n))
        app = scripted_app(admin)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one(ModelsTable)
            await wait_until(pilot, lambda: table.row_count == n, "the models table")
            await pilot.pause()
            p99 = table.columns[ColumnKey("p99")]
            assert p99.content_width == len("p99 ms")

            # Every rate changes and one p99 needs a wider column.
            admin.serve(model_stats(n, rps=2.0, changes={"model-7": {"p99_ms": 12345678.0}}))
            measured = 0
            await poll(pilot)
            assert measured <= budget, f"{measured} cells measured for a table of {budget}"
            assert cell(app, "rps", "model-0") == cell(app, "rps", f"model-{n - 1}") == "2.0"
            assert cell(app, "p99", "model-7") == "12345678" and p99.content_width == 8
            assert cell(app, "p99", "model-8") == "2.0"

            # The wide value goes: the column shrinks back to its label.
            admin.serve(model_stats(n, rps=2.0))
            measured = 0
            await poll(pilot)
            assert measured <= budget, f"{measured} cells measured for a table of {budget}"
            assert cell(app, "p99", "model-7") == "2.0" and p99.content_width == len("p99 ms")

            # Nothing changed: nothing is measured.
            measured = 0
            await poll(pilot)
            assert measured == 0


async def test_a_stalled_server_costs_one_timeout_and_a_reset_connection_is_retried() -> None:
    """A read is retried when its connection was reset (a keep-alive connection from before a
    restart), never after a timeout: that doubled the time a stalled server still looked
    connected, past the timeout the error names."""
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(1))
        client = AdminClient(admin.url, token="t", timeout_s=0.5)
        try:
            assert (await client.stats()).ok and admin.stats_requests == 1

            admin.stall = True
            res = await client.stats()
            assert isinstance(res.error, TimedOut) and isinstance(res.error, Disconnected)
            assert res.error.message == "no answer within 0.5 s"
            assert admin.stats_requests == 2, "one request, no retry after the timeout"

            # A reset connection, on the other hand, is answered on a new one.
            admin.stall, admin.resets = False, 1
            res = await client.stats()
            assert res.ok and admin.stats_requests > 3
        finally:
            await client.close()


async def test_an_action_says_it_started_and_is_not_sent_again_while_it_runs() -> None:
    """A load can take minutes before its answer: the console says at once that it is loading,
    and the same action asked for again meanwhile is refused with why, not sent in parallel."""
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(2))
        app = scripted_app(admin)
        notes = notifications(app)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.screen.query_one(ModelsTable).row_count == 2, "the table")
            # Two confirmations of one load open at once (palette and key): the first yes sends it.
            app.ask("model:load", "model-0")
            app.ask("model:load", "model-0")
            await pilot.press("y")
            await wait_until(pilot, lambda: admin.loads == ["model-0"], "the load request")
            assert "loading model-0…" in notes
            await pilot.press("y")
            assert notes[-1].startswith("already loading model-0 (for ") and notes[-1].endswith(
                "s): not sent again"
            )

            # Asked again while it runs: refused before any confirmation.
            notes.clear()
            await pilot.press("l")
            assert not isinstance(app.screen, ConfirmScreen)
            assert len(notes) == 1 and notes[0].startswith("already loading model-0")

            # Another model's load is another action: it runs alongside.
            await pilot.press("down", "l", "y")
            await wait_until(pilot, lambda: admin.loads == ["model-0", "model-1"], "the second load")
            assert "loading model-1…" in notes

            admin.loaded.set()
            await wait_until(
                pilot, lambda: {"model-0: resident", "model-1: resident"} <= set(notes), "both answers"
            )
            # Answered: the same load may be asked for again.
            await pilot.press("l")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
        assert admin.loads == ["model-0", "model-1"]


async def test_names_and_messages_from_the_server_are_shown_as_written_not_read_as_markup() -> None:
    """Model names are folder names, and the server's messages echo them. Read as Textual markup,
    a "[/]" in one crashed the console (its confirmation, command palette, toasts and tuning
    scope all parsed it) and "qwen[v2]" was shown as "qwen". Found by a probe with a fake admin
    API; here the scripted one serves such names."""
    from textual.widgets._toast import Toast

    row = model_stats(1)["models"]["model-0"]
    async with ScriptedAdmin() as admin:
        admin.serve({**model_stats(0), "models": {"[/]x": dict(row), "qwen[v2]": dict(row)}})
        app = scripted_app(admin)
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_until(pilot, lambda: app.screen.query_one(ModelsTable).row_count == 2, "the table")
            app.ask("model:unload", "[/]x")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            assert "[/]x" in str(app.screen.query_one("#question", Label).render())
            await pilot.press("n")
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press("q", "w", "e", "n")  # the palette's hits name the models
            await pilot.pause()
            await pilot.press("escape")
            await pilot.pause()
            admin.loaded.set()
            app.ask("model:load", "qwen[v2]")
            await pilot.pause()
            await pilot.press("y")

            def toasts() -> list[str]:
                return [str(t.render()) for t in app.screen.query(Toast)]

            await wait_until(pilot, lambda: any("qwen[v2]: resident" in t for t in toasts()), "the toast")
        assert admin.loads == ["qwen[v2]"]


async def test_a_restart_is_told_by_started_at_though_the_new_process_is_up_longer() -> None:
    """A process that restarted between polls and has been up longer than the old one was at the
    last poll is still a new process: warned about, graphs and remembered breakers cleared."""
    async with ScriptedAdmin() as admin:
        admin.serve({**model_stats(1, rps=5.0), "started_at": 1000.0, "uptime_s": 5})
        app = scripted_app(admin)
        notes = notifications(app)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            await poll(pilot)
            assert app.history.values("requests_per_s") == [5.0, 5.0]
            app.breaker_seen["model-0"] = "forced_open"  # what a breaker action answered

            admin.serve({**model_stats(1, rps=0.0), "started_at": 1100.0, "uptime_s": 60})
            await poll(pilot)
            assert "the server restarted" in notes
            assert app.history.values("requests_per_s") == [0.0] and app.breaker_seen == {}


def test_restarted_compares_started_at_and_falls_back_to_uptime() -> None:
    assert not view.restarted(None, {"started_at": 1.0})  # the first poll
    assert not view.restarted({"started_at": 1.0, "uptime_s": 5}, {"started_at": 1.0, "uptime_s": 6})
    assert view.restarted({"started_at": 1.0, "uptime_s": 5}, {"started_at": 2.0, "uptime_s": 60})
    # Without started_at on both sides (an older server): by uptime going down.
    assert view.restarted({"uptime_s": 60}, {"uptime_s": 5})
    assert view.restarted({"uptime_s": 60}, {"started_at": 2.0, "uptime_s": 5})
    assert not view.restarted({"uptime_s": 5}, {"uptime_s": 60})
    assert not view.restarted({"uptime_s": 5}, {"uptime_s": "soon"})


# Answers a probe sent the console, as raw JSON text: 1e400 and Infinity parse as inf.
ODD_STATS = [
    '{"models": [1, 2], "uptime_s": 5}',
    '{"models": "abc", "uptime_s": 5}',
    '{"models": {"m": {"p99_ms": 1e308, "requests_per_s": 1}, "n": {"p99_ms": 1e308}}}',
    '{"models": {"m": {"p99_ms": Infinity, "requests_per_s": 1e308}, "n": {"requests_per_s": 1e308}}}',
    '{"models": {"m": {"queue_depth": {"1": 1e400}}}, "uptime_s": 1e400}',
    '{"models": {"m": "resident"}, "uptime_s": "x", "version": null}',
    '{"gpu": {"available": true, "gpus": [{"index": "a", "memory_total_bytes": 1e400}]}}',
    '{"gpu": {"available": true, "gpus": 5}, "cache": {"enabled": true, "bytes": "x"}, "loop": []}',
    '{"memory": {"device": {"used_bytes": 1, "budget_bytes": 1e400}}, "uptime_s": 100000000000000000000}',
]


async def test_stats_it_cannot_fully_read_are_drawn_as_far_as_they_go() -> None:
    """Numbers past a float's range are missing and sections of the wrong type absent: the
    console draws the rest and stays connected, instead of crashing or freezing on old data."""
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(2))
        app = scripted_app(admin)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            for body in ODD_STATS:
                admin.body = body
                await poll(pilot)
                await pilot.pause()  # drawn: the graphs render here
                assert app.is_running, body
                assert app.snapshot.status == CONNECTED and "● connected" in status_text(app), body
                if body in ODD_STATS[:2]:  # no models: none in the table, nor their breakers
                    assert app.screen.query_one(ModelsTable).row_count == 0
                    assert not app.screen.query_one("#breaker-panel").display
                if body == ODD_STATS[2]:  # finite, only huge: shown as it is, graphed
                    assert cell(app, "p99", "m") == f"{1e308:.0f}"
                    assert app.history.values("p99_ms")[-1] == 1e308
                if body == ODD_STATS[4]:
                    assert cell(app, "queue", "m") == "0" and "up —" in status_text(app)
            assert app.screen.query_one(ModelsTable).row_count == 0  # the last one has no models


async def test_a_snapshot_the_console_cannot_take_shows_error() -> None:
    """Whatever still goes wrong while taking the stats is an ERROR on the status bar, over the
    last stats it could draw, until a poll succeeds again; not a worker dying in silence."""
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(1))
        app = scripted_app(admin)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            good = app.snapshot.stats

            def broken(stats: Any) -> None:
                raise RuntimeError("a view that cannot read this")

            app.history.record = broken  # type: ignore[method-assign]
            await poll(pilot)
            assert app.snapshot.status == ERROR and app.snapshot.stats == good
            text = status_text(app)
            assert "✖ ERROR" in text and "RuntimeError: a view that cannot read this" in text, text
            assert app.screen.has_class("-stale")

            del app.history.record
            await poll(pilot)
            assert app.snapshot.status == CONNECTED and "● connected" in status_text(app)


def test_clean_stats_drops_what_the_console_cannot_read() -> None:
    stats = fake_stats(3)
    assert view.clean_stats(stats) == stats  # what the server sends goes through unchanged
    odd = json.loads(
        '{"uptime_s": 1e400, "started_at": "x", "version": 3, "loop": [1], "cache": "on",'
        ' "models": {"m": {"p99_ms": Infinity, "queue_depth": {"1": -1e999, "2": 2},'
        ' "kv": [1, NaN, 1e308]}, "n": 7}, "memory": {"device": {"used_bytes": 1' + "0" * 400 + "}}}"
    )
    assert view.clean_stats(odd) == {
        "version": 3,
        "models": {"m": {"p99_ms": None, "queue_depth": {"1": None, "2": 2}, "kv": [1, None, 1e308]}},
        "memory": {"device": {"used_bytes": None}},
    }
    assert view.num(float("inf")) == view.num(10**400) == 0.0 and view.number(True) is None
    # The views stand on their own too.
    assert breaker_lines({"models": [1, 2]}) == breaker_lines({"models": "ab"}) == []
    assert nice_ceiling(1e308 * 1.25) == nice_ceiling(float("inf")) == sys.float_info.max
    assert nice_ceiling(45) == 50 and nice_ceiling(float("nan")) == 1
    assert bar_levels([0.0, 1e308, 1.7e308], 3) == [0, 13, 23]


def test_every_view_draws_any_value_of_any_type_once_cleaned() -> None:
    """Each value of a full /admin/stats (to four levels down) replaced by each of a set of
    wrong types and out-of-range numbers: every view and panel draws it without raising."""
    wrong: list[Any] = [None, "x", [1], {"a": 1}, True, -1, 1e308, float("inf"), 10**400]
    lines = (breaker_lines, cache_lines, gpu_lines, memory_lines, generation_lines)
    lines += (loop_lines, compute_lines, worker_lines, refusal_lines)

    def paths(node: Any, depth: int = 0) -> Iterator[tuple[Any, ...]]:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in items:
            yield (key,)
            if depth < 3:
                yield from ((key, *rest) for rest in paths(child, depth + 1))

    base = fake_stats(9)
    for path in [*paths(base), ("added",)]:
        for value in wrong:
            doc = json.loads(json.dumps(base))
            node = doc
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            try:
                stats = view.clean_stats(doc)
                for row in view.model_rows(stats, {"m": "open"}):
                    ModelsTable._cells(row)
                history = view.History()
                history.record(stats)
                for metric in history.series:
                    bar_levels(history.values(metric), 3)
                (
                    view.device_label(stats),
                    view.fmt_duration(stats.get("uptime_s")),
                    view.restarted(stats, stats),
                )
                for draw in lines:
                    draw(stats)
            except Exception as exc:
                raise AssertionError(f"{path} = {value!r}: {exc!r}") from exc


def test_durations_below_zero_are_shown_as_unknown() -> None:
    """A server clock that went back (uptime -5 s) or a negative lag is no duration: "—", as
    for a missing one, not "-1d 23h" (what divmod made of -5 s) or "-3.0 ms"."""
    assert view.fmt_duration(-5) == view.fmt_duration(-0.5) == "—"
    assert view.fmt_duration(float("nan")) == view.fmt_duration(float("inf")) == "—"
    assert view.fmt_duration(0) == "0s" and view.fmt_duration(3725) == "1h 02m"
    assert fmt_lag(-3.0) == "—" and fmt_lag(0.0) == "0.0 ms" and fmt_lag(250.0) == "250 ms"
    lines = [str(t) for t in loop_lines({"loop": {"samples": 3, "p50_ms": -1, "p99_ms": -2, "max_ms": 4}})]
    assert lines[:3] == ["p50 —", "p99 —", "max 4.0 ms"], lines


async def test_an_error_answered_in_plain_text_is_shown_with_its_status() -> None:
    """A proxy in front of the admin API answers a refusal in plain text or HTML: the console
    names the status and what to do, instead of "the answer is not JSON"."""
    async with ScriptedAdmin() as admin:
        client = AdminClient(admin.url, token="t")
        try:
            admin.stats_answer = (401, "text/plain", "401: Authorization Required\n")
            res = await client.stats()
            assert isinstance(res.error, Unauthorized)
            assert res.error.message == (
                "401 Unauthorized: check the admin token (the answer: 401: Authorization Required)"
            )
            admin.stats_answer = (401, "application/json", '["no"]')  # JSON, but not the API's
            res = await client.stats()
            assert isinstance(res.error, Unauthorized) and res.error.message.startswith("401 Unauthorized: ")
            admin.stats_answer = (502, "text/html", "<html><body>\n<h1>502 Bad Gateway</h1>\n</body></html>")
            res = await client.stats()
            assert isinstance(res.error, ApiError) and res.error.status == 502
            assert res.error.message == "502 Bad Gateway (the answer: 502 Bad Gateway)"
            admin.stats_answer = (503, "text/plain", "")
            res = await client.stats()
            assert (
                isinstance(res.error, ApiError)
                and res.error.message == "503 Service Unavailable (no answer body)"
            )
            # A success that is not JSON is still the protocol error it was.
            admin.stats_answer = (200, "text/plain", "hello")
            res = await client.stats()
            assert res.error is not None and res.error.message == "HTTP 200: the answer is not JSON"
            # Nor one nested past what the JSON parser follows: that raised out of the client, and
            # the poll died with "connected" still on screen.
            admin.stats_answer = (200, "application/json", "[" * 100_000 + "]" * 100_000)
            res = await client.stats()
            assert res.error is not None and res.error.message == "HTTP 200: the answer is nested too deep"
        finally:
            await client.close()

        admin.stats_answer = (401, "text/plain", "Unauthorized")
        app = scripted_app(admin)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.failures > 0, "the refused poll")
            await pilot.pause()
            text = status_text(app)
            assert "UNAUTHORIZED" in text and "401 Unauthorized: check the admin token" in text, text


async def test_apply_says_it_is_applying_and_is_not_sent_again_meanwhile() -> None:
    """Apply waits for the server's answer: meanwhile the button says so and is disabled, and
    Apply asked for again (ctrl+s) is refused with why, not sent a second time."""
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(1))
        admin.patched.clear()  # the PATCH is answered when the test says so
        app = scripted_app(admin)
        notes = notifications(app)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            await pilot.press("t")
            screen = app.screen
            assert isinstance(screen, TuningScreen)
            await wait_until(pilot, lambda: len(screen.query(SettingRow)) == len(FAKE_REGISTRY), "the form")
            await pilot.pause()
            screen.query_one("#edit-batching--max_batch_size", Input).value = "8"
            button = screen.query_one("#apply", Button)
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: len(admin.patches) == 1, "the PATCH")
            assert admin.patches == [{"defaults": {"batching": {"max_batch_size": 8}}}]
            assert button.disabled and str(button.label) == "Applying…"
            await pilot.press("ctrl+s")
            await pilot.click("#apply")
            await pilot.pause(0.3)
            assert len(admin.patches) == 1, admin.patches
            assert notes and notes[-1] == "already applying: not sent again", notes
            admin.patched.set()
            await wait_until(pilot, lambda: not button.disabled, "the answer")
            assert str(button.label) == "Apply" and len(admin.patches) == 1


async def test_10000_models_refresh_in_bounded_time_and_the_palette_finds_any_of_them() -> None:
    """With 10,000 models the panels draw their first lines and count the rest, and the command
    palette ranks the model commands as they are searched (it built eight per model, all of them
    listed when it opened): a poll draws in seconds, and the palette finds the last model."""
    n = 10_000
    odd = {"model-9999": {"breaker": {"state": "open"}}}
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(n, changes=odd))
        app = scripted_app(admin)
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one(ModelsTable)
            await wait_until(pilot, lambda: table.row_count == n, "the models table", timeout=60)
            admin.serve(model_stats(n, rps=2.0, changes=odd))
            started = time.monotonic()
            await poll(pilot)
            assert time.monotonic() - started < 15
            assert cell(app, "rps", "model-0") == cell(app, "rps", "model-9999") == "2.0"
            # The open breaker first, however far down the list it is; then a count of the rest.
            lines = panel_text(app, "breaker").splitlines()
            assert len(lines) == 6 and lines[0].startswith("open") and lines[0].endswith("model-9999")
            assert lines[-1] == "… and 9,995 more", lines
            # The generation panel, a few lines per model, likewise.
            generating = {
                f"m{i}": {"generation": {"tokens_per_s": 1.0, "active_sequences": 1}} for i in range(n)
            }
            assert [str(t) for t in generation_lines({"models": generating})] == [
                "m0",
                "tokens per s 1",
                "active sequences 1",
                "m1",
                "tokens per s 1",
                "… and 9,998 more models",
            ]

            started = time.monotonic()
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press(*"close model-9999")

            def first_hit() -> str:
                palette = app.screen.query(CommandList)
                if not palette or not palette.first().option_count:
                    return ""
                return str(palette.first().get_option_at_index(0).prompt)

            await wait_until(pilot, lambda: first_hit().startswith("Breaker close: model-9999"), "the hit")
            assert palette_count(app) <= 100
            # Generous: the keys and the hit took over a minute when the palette listed everything.
            assert time.monotonic() - started < 20
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
            assert "model-9999" in str(app.screen.query_one("#question", Label).render())
            await pilot.press("n")


async def test_a_title_typed_as_it_is_is_the_first_hit_among_10000_models() -> None:
    """Found by a regression probe: with 10,000 models in the order the server scans their
    folders, "Unload model m-9" was not listed at all (only the first 2,000 titles holding its
    letters in order were scored), and the top hit offered to unload another model."""
    import types

    from textual.fuzzy import Matcher

    from tui.commands import ConsoleCommands

    names = sorted(f"m-{i}" for i in range(10_000))
    app = types.SimpleNamespace(
        snapshot=types.SimpleNamespace(stats={"models": {n: {} for n in names}}),
        read_only=False,
        **{a: (lambda *_: None) for a in ("action_dashboard", "action_tuning", "action_refresh")},
        **{a: (lambda *_: None) for a in ("action_pause", "action_faster", "action_slower", "ask")},
    )
    palette = types.SimpleNamespace(app=app, matcher=lambda q: Matcher(q, case_sensitive=False))
    palette._commands = types.MethodType(ConsoleCommands._commands, palette)
    for query in ("Unload model m-9", "Load model m-7", "Tune model m-5"):
        hits = [hit.text async for hit in ConsoleCommands.search(palette, query)]  # type: ignore[arg-type]
        assert hits[:2] == [query, query + "0"], (query, hits[:3])


def palette_count(app: ConsoleApp) -> int:
    return app.screen.query_one(CommandList).option_count


def setting(name: str, **fields: Any) -> dict[str, Any]:
    """A registry entry as the server writes it: an int from 1 to 9 unless ``fields`` say else."""
    spec = {"name": name, "type": "int", "default": 1, "minimum": 1, "maximum": 9, "choices": None}
    return {**spec, "help": "", "reload": False, "scope": "model", **fields}


# Registry entries the tuning form cannot read, and what it says of each.
UNREADABLE_SETTINGS: list[tuple[Any, str]] = [
    ("batching", "setting 1: expected an object, got a string"),
    ([1, 2], "setting 2: expected an object, got a list"),
    ({"type": "int", "default": 1}, "setting 3: no name"),
    (setting(""), "setting 4: no name"),
    (
        {"name": "no.type", "default": 1},
        "no.type: type: expected one of bool, int, float, str, list[int], got null",
    ),
    (setting("odd.type", type="complex"), "odd.type: type: expected one of"),
    (setting("odd.choices", type="str", default="a", choices="abc"), "odd.choices: choices: expected"),
    (setting("odd.items", type="str", default="a", choices=[["a"]]), "odd.items: choices: expected"),
    (setting("odd.bounds", minimum="one"), "odd.bounds: minimum: expected a number, got a string"),
    (setting("odd.help", help=[1] * 10), "odd.help: help: expected a string, got a list"),
    (setting("good.int", default=2), "good.int: listed twice; the first is shown"),
]
# Entries it can read, under names a widget id cannot hold as they are (and "a.b" and "a--b" were
# the same id), and values that are not of their setting's type: shown, not editable.
ODD_NAMES = ["good.int", "with space.x", "mark[/]up.x", "a.b", "a--b", "dots..x", "ünï.x", "[b]", "x" * 300]
WRONG_VALUES = {
    "wrong.int": ("int", "abc"),
    "wrong.float": ("float", None),
    "wrong.list": ("list[int]", [[1, [2, [3] * 1000]]] * 1000),
    "wrong.choice": ("str", "z"),
    "wrong.bool": ("bool", "yes"),
}
# Whole answers of the wrong shape, and the line the form shows for each.
ODD_SETTINGS_DOCS: list[tuple[dict[str, Any], str]] = [
    ({"registry": 5}, "registry: expected a list, got a number"),
    ({"registry": {"a": 1}, "defaults": [], "models": "m"}, "registry: expected a list, got an object"),
    (
        {
            "registry": [setting("a.b")],
            "defaults": [],
            "models": {"m": 5, "n": {"a.b": None}},
            "overrides": [],
        },
        "defaults: expected an object, got a list",
    ),
    ({"registry": [setting("a.b")], "models": {"m": 5}}, "model m: expected an object, got a number"),
    (
        {"registry": [setting("a.b")], "overrides": {"defaults": 5, "models": {"m": 3}}, "config_file": 7},
        "overrides.defaults: expected an object, got a number",
    ),
]


async def test_tuning_form_draws_what_it_can_of_any_settings_answer() -> None:
    """GET /admin/settings entries with missing keys or keys of the wrong type, of unknown types,
    listed twice, or whole sections of the wrong shape: the form draws every entry it can read,
    says which it cannot and why, and never crashes (an entry that was not an object, a name
    with a space, or choices that were not a list crashed the console; a default outside its
    choices, too)."""
    unreadable = [entry for entry, _ in UNREADABLE_SETTINGS]
    registry: list[Any] = [*unreadable[:-1], *(setting(n) for n in ODD_NAMES)]
    registry += [
        setting(name, type=kind, minimum=None, maximum=None) for name, (kind, _) in WRONG_VALUES.items()
    ]
    registry[-2]["choices"] = ["a", "b"]
    registry.append(unreadable[-1])  # good.int again
    doc = fake_settings()
    doc["registry"] = registry
    doc["defaults"] = {name: value for name, (_, value) in WRONG_VALUES.items()}
    doc["models"] = {"model-0": {}}
    async with ScriptedAdmin() as admin:
        admin.serve(model_stats(1))
        admin.settings_body = json.dumps(doc)
        app = scripted_app(admin)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.snapshot.connected, "the first poll")
            await pilot.press("t")
            screen = app.screen
            assert isinstance(screen, TuningScreen)
            names = [*ODD_NAMES, *WRONG_VALUES]
            await wait_until(pilot, lambda: [r.name_ for r in screen.query(SettingRow)] == names, "the form")
            await settle(pilot)
            # Each entry it cannot read is named with why; the form lists the first few.
            problems = view.clean_settings(doc)[1]
            assert len(problems) == len(UNREADABLE_SETTINGS)
            for problem, (_, said) in zip(problems, UNREADABLE_SETTINGS, strict=True):
                assert problem.startswith(said), (problem, said)
            assert screen.query_one("#unreadable").display
            assert str(screen.query_one("#unreadable", Static).content).splitlines() == [
                f"✖ {len(problems)} parts of the server's settings cannot be shown:",
                *(f"  {p}" for p in problems[:4]),
                f"  … and {len(problems) - 4} more",
            ]
            rows = {r.name_: r for r in screen.query(SettingRow)}
            for name in ODD_NAMES:
                assert not rows[name].editor.disabled, name
            for name in WRONG_VALUES:
                assert rows[name].editor.disabled and not rows[name].changed, name
                note = str(rows[name].query_one(".value-note", Static).content)
                assert note.startswith("⚠ the server's value cannot be edited here: expected"), note
            assert "a list of 1000 items" in str(rows["wrong.list"].query_one(".current", Static).content)
            assert "no changes" in str(screen.query_one("#pending").content)

            # What it can read, it can change.
            rows["with space.x"].query_one(Input).value = "5"
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: bool(admin.patches), "the PATCH")
            assert admin.patches == [{"defaults": {"with space": {"x": 5}}}]

            # Whole answers of the wrong shape: a line says what, the rest is drawn.
            for odd, said in ODD_SETTINGS_DOCS:
                admin.settings_body = json.dumps(odd)
                screen.fetch_settings()
                await wait_until(
                    pilot,
                    lambda said=said: said in str(screen.query_one("#unreadable", Static).content),
                    said,
                )
                await settle(pilot)
                assert app.is_running

            # Back to what the server sends: nothing to say.
            admin.settings_body = json.dumps(fake_settings())
            screen.fetch_settings()
            await wait_until(
                pilot, lambda: len(screen.query(SettingRow)) == len(FAKE_REGISTRY), "the good form"
            )
            await settle(pilot)
            assert not screen.query_one("#unreadable").display


# -- snapshots (fixed payloads from a fake admin server) ---------------------------------------

GIB = 1024**3
RATES = [12.0, 18.5, 25.0, 31.0, 27.5, 35.0, 41.0, 38.0, 44.5, 40.0, 47.0, 52.5]


def fake_stats(n: int) -> dict[str, Any]:
    """The n-th poll's payload: a deterministic ramp so the history graphs have a shape."""
    i = n % len(RATES)
    rate = RATES[i]
    slow, late = min(n, 12), n >= 9
    return {
        "version": "0.1.0",
        "uptime_s": 3725.0,
        "ready": True,
        "draining": False,
        "models": {
            "all-minilm-l6-v2": {
                "name": "all-minilm-l6-v2",
                "kind": "embedding",
                "state": "resident",
                "requests_per_s": rate,
                "p50_ms": 6.5 + i / 4,
                "p99_ms": 18.0 + 3 * i,
                "queue_depth": {"1": 0, "2": i % 4, "3": 1},
                "backend": "tensorrt",
                "backend_reason": None,
                "breaker": {"state": "closed", "failure_rate": 0.0, "calls_in_window": 240},
                "cache": {"hits": 30, "stale_hits": 2, "misses": 90},
                "rejected_per_s": 2.5,
                "rejections": {
                    "queue_full": 40 * i,
                    "deadline": 3,
                    "would_miss_deadline": 12,
                    "cancelled": 1,
                    "closed": 0,
                },
            },
            "smollm2-135m-instruct": {
                "name": "smollm2-135m-instruct",
                "kind": "generate",
                "state": "resident",
                "requests_per_s": 1.5,
                "p50_ms": 420.0,
                "p99_ms": 1310.0,
                "queue_depth": {"1": 0, "2": 2, "3": 0},
                "backend": "onnxruntime-cpu",
                "backend_reason": "ONNX Runtime CUDA: the CUDA provider did not load "
                "(missing CUDA/cuDNN libraries; see ONNX Runtime's log)",
                "breaker": {"state": "half_open", "failure_rate": 0.25, "calls_in_window": 20},
                "generation": {"tokens_per_s": 41.5, "active_sequences": 2, "kv_cache_bytes": 48 * 1024**2},
                "rejected_per_s": 0.5,
                "rejections": {"queue_full": 5, "deadline": 0},
            },
            "yolov8n": {
                "name": "yolov8n",
                "kind": "tensor",
                "state": "resident",
                "requests_per_s": 0.0,
                "p50_ms": 0.0,
                "p99_ms": 0.0,
                "queue_depth": {"1": 0, "2": 0, "3": 0},
                "backend": "onnxruntime-cuda",
                "backend_reason": "TensorRT: TensorRT failed: TensorRT build of model.onnx failed (exit 3)",
                "breaker": {"state": "forced_open", "failure_rate": 0.0, "calls_in_window": 0},
            },
            "reranker": {
                "name": "reranker",
                "kind": "embedding",
                "state": "evicted",
                "requests_per_s": 0.0,
                "p50_ms": 0.0,
                "p99_ms": 0.0,
                "breaker": {"state": "disabled", "failure_rate": 0.0, "calls_in_window": 0},
            },
        },
        "cache": {
            "enabled": True,
            "entries": 1234,
            "bytes": 52_428_800,
            "max_bytes": 268_435_456,
            "hits": 30,
            "stale_hits": 2,
            "misses": 90,
        },
        "memory": {
            "budget_bytes": 20 * GIB,
            "used_bytes": 3 * GIB,
            "loads": 4,
            "evictions": 1,
            "device": {"budget_bytes": 20 * GIB, "used_bytes": 3 * GIB, "arena_bytes": GIB, "models": 2},
            "host": {"budget_bytes": 96 * GIB, "used_bytes": 600 * 1024**2, "arena_bytes": 0, "models": 1},
        },
        # The event loop grows slower poll by poll, past the console's alert (p99 > 50 ms) from
        # the 9th on, when the cache writer is also down for good (given up after five deaths).
        "loop": {
            "samples": 240,
            "p50_ms": 1.2 + slow / 10,
            "p99_ms": 4.0 + 6 * slow,
            "max_ms": 9.0 + 8 * slow,
        },
        "compute": {
            "concurrency": 1,
            "aging_ms": 1000.0,
            "running": 1,
            "waiting": {"2": i % 3, "3": 4} if i % 3 else {"3": 4},
            "granted": 10_000 + 137 * i,
        },
        "workers": {
            "cache-writer": {"up": not late, "given_up": late, "recent_failures": 5 if late else 0},
            "gpu-sampler": {"up": True, "given_up": False, "recent_failures": 1},
            "loop-lag": {"up": True, "given_up": False, "recent_failures": 0},
            "keep-alive": {"up": True, "given_up": False, "recent_failures": 0},
        },
        "gpu": {
            "available": True,
            "driver_version": "550.54.15",
            "gpus": [
                {
                    "index": 0,
                    "name": "NVIDIA L4",
                    "utilization_ratio": min(1.0, rate / 60),
                    "memory_used_bytes": int((3 + i / 4) * GIB),
                    "memory_total_bytes": 24 * GIB,
                    "temperature_celsius": 57.0,
                    "power_watts": 41.0,
                }
            ],
        },
    }


FAKE_REGISTRY = [
    {
        "name": "batching.max_batch_size",
        "type": "int",
        "default": 32,
        "minimum": 1,
        "maximum": 1024,
        "choices": None,
        "help": "Largest batch sent to the engine.",
        "reload": False,
        "scope": "model",
    },
    {
        "name": "batching.max_queue_delay_ms",
        "type": "float",
        "default": 2.0,
        "minimum": 0,
        "maximum": 10000,
        "choices": None,
        "help": "How long a partial batch may wait for company.",
        "reload": False,
        "scope": "model",
    },
    {
        "name": "batching.preferred_batch_sizes",
        "type": "list[int]",
        "default": [],
        "minimum": 1,
        "maximum": 1024,
        "choices": None,
        "help": "Batch sizes dispatched as soon as they can be formed.",
        "reload": False,
        "scope": "model",
    },
    {
        "name": "queue.allow_timeout_override",
        "type": "bool",
        "default": True,
        "minimum": None,
        "maximum": None,
        "choices": None,
        "help": "Whether a request may set a shorter deadline of its own.",
        "reload": False,
        "scope": "model",
    },
    {
        "name": "engine.instances",
        "type": "int",
        "default": 1,
        "minimum": 1,
        "maximum": 16,
        "choices": None,
        "help": "Engine worker threads per model.",
        "reload": True,
        "scope": "model",
    },
    {
        "name": "cache.synchronous",
        "type": "str",
        "default": "NORMAL",
        "minimum": None,
        "maximum": None,
        "choices": ["NORMAL", "FULL"],
        "help": "SQLite durability of the response cache.",
        "reload": False,
        "scope": "server",
    },
]


def fake_settings() -> dict[str, Any]:
    """GET /admin/settings as the server sends it, for the registry above."""
    defaults = {s["name"]: s["default"] for s in FAKE_REGISTRY}
    return {
        "registry": FAKE_REGISTRY,
        "defaults": defaults,
        "models": {m: dict(defaults) for m in fake_stats(0)["models"]},
        "overrides": {"defaults": {}, "models": {}},
        "config_file": "/etc/appliance/appliance.yaml",
    }


class FakeAdmin:
    """A fixed-payload admin API for the snapshot tests only, on its own loop in a thread
    (snap_compare runs the app with its own event loop)."""

    def __init__(self) -> None:
        self.polls = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/admin/stats", self._stats)
        app.router.add_get("/admin/settings", self._settings)
        app.router.add_patch("/admin/settings", self._patch)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stats(self, request: web.Request) -> web.Response:
        self.polls += 1
        return web.json_response(fake_stats(self.polls))

    async def _settings(self, request: web.Request) -> web.Response:
        return web.json_response(fake_settings())

    async def _patch(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": "defaults.batching.max_batch_size: expected an integer from 1 to 1024, got 5000",
                    "type": "invalid_request_error",
                    "param": "defaults.batching.max_batch_size",
                    "code": None,
                }
            },
            status=400,
        )

    def start(self) -> FakeAdmin:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def down() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def fake_admin() -> Iterator[FakeAdmin]:
    fake = FakeAdmin().start()
    yield fake
    fake.close()


def snapshot_app(fake: FakeAdmin, **kw: Any) -> ConsoleApp:
    # A fixed address label: the fake's port changes from run to run. An hour-long interval:
    # only the polls the test asks for ("r") happen, so every run draws the same history.
    client = AdminClient(f"http://127.0.0.1:{fake.port}", token="t", label="127.0.0.1:8001")
    return ConsoleApp(client, interval=3600, **kw)


async def settle(pilot: Pilot[Any]) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def poll_times(pilot: Pilot[Any], n: int) -> None:
    await settle(pilot)
    for _ in range(n):
        await pilot.press("r")
        await settle(pilot)


def test_snapshot_dashboard(snap_compare: Any, fake_admin: FakeAdmin) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await poll_times(pilot, 11)

    assert snap_compare(snapshot_app(fake_admin), terminal_size=SIZE, run_before=run_before)


def test_snapshot_tuning_with_server_error(snap_compare: Any, fake_admin: FakeAdmin) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        await pilot.press("t")
        await settle(pilot)
        box = pilot.app.screen.query_one("#edit-batching--max_batch_size", Input)
        box.cursor_blink = False  # a blinking cursor made the picture depend on timing
        box.focus()
        box.value = ""
        await pilot.press(*"5000")
        await pilot.press("ctrl+s")
        await settle(pilot)

    assert snap_compare(snapshot_app(fake_admin), terminal_size=SIZE, run_before=run_before)


def test_snapshot_confirm_dialog(snap_compare: Any, fake_admin: FakeAdmin) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await poll_times(pilot, 2)
        await pilot.press("o")
        await settle(pilot)

    assert snap_compare(snapshot_app(fake_admin), terminal_size=(100, 30), run_before=run_before)


def test_snapshot_disconnected(snap_compare: Any, fake_admin: FakeAdmin) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await poll_times(pilot, 3)
        fake_admin.stop()
        await poll_times(pilot, 2)

    assert snap_compare(snapshot_app(fake_admin), terminal_size=(100, 30), run_before=run_before)


def test_snapshot_read_only(snap_compare: Any, fake_admin: FakeAdmin) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await poll_times(pilot, 2)

    assert snap_compare(
        snapshot_app(fake_admin, read_only=True), terminal_size=(100, 30), run_before=run_before
    )
