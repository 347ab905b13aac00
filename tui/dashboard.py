"""The main screen: status bar, optional panels, the models table and the history graphs."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, cast

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from tui import view
from tui.state import Snapshot
from tui.widgets import (
    HistoryGraph,
    ModelsTable,
    Panel,
    StatusBar,
    breaker_lines,
    cache_lines,
    compute_lines,
    generation_lines,
    gpu_lines,
    loop_lines,
    memory_lines,
    refusal_lines,
    worker_lines,
)

if TYPE_CHECKING:
    from tui.console import ConsoleApp

# Actions that change the server; read-only mode hides their keys and refuses them.
MUTATING = frozenset({"breaker", "load", "unload", "purge", "purge_all"})
# Grouped keys share one footer label ("o c b breaker"), so every binding fits in 120 columns.
BREAKER_KEYS = Binding.Group("breaker", compact=True)
MODEL_KEYS = Binding.Group("load/unload", compact=True)
CACHE_KEYS = Binding.Group("purge", compact=True)


class DashboardScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "breaker('open')", "Open breaker", group=BREAKER_KEYS),
        Binding("c", "breaker('close')", "Close breaker", group=BREAKER_KEYS),
        Binding("b", "breaker('reset')", "Reset breaker", group=BREAKER_KEYS),
        Binding("l", "load", "Load model", group=MODEL_KEYS),
        Binding("u", "unload", "Unload model", group=MODEL_KEYS),
        Binding("x", "purge", "Purge cache (model)", group=CACHE_KEYS),
        Binding("X", "purge_all", "Purge cache (all)", group=CACHE_KEYS),
    ]

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="panels"):
            yield Panel("GPU", id="gpu-panel")
            yield Panel("Breakers", id="breaker-panel")
            yield Panel("Cache", id="cache-panel")
            yield Panel("Memory", id="memory-panel")
            yield Panel("Generation", id="generation-panel")
        with Horizontal(id="health"):
            yield Panel("Event loop lag", id="loop-panel")
            yield Panel("Compute", id="compute-panel")
            yield Panel("Workers", id="workers-panel")
            yield Panel("Refused", id="refused-panel")
        yield ModelsTable(id="models")
        with Grid(id="history"):
            yield HistoryGraph("requests_per_s", "req/s", view.fmt_rate, "cyan")
            yield HistoryGraph("p99_ms", "worst p99 ms", view.fmt_ms, "magenta")
            yield HistoryGraph("queue_depth", "queued", lambda x: f"{x:.0f}", "yellow")
            yield HistoryGraph("gpu_utilization", "GPU util", lambda x: f"{x:.0f}%", "green", 100.0)
            yield HistoryGraph("gpu_memory", "GPU mem", view.fmt_bytes, "blue")
            yield HistoryGraph("loop_p99_ms", "loop lag p99 ms", view.fmt_ms, "red")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "snapshot", self._redraw)
        self.query_one(ModelsTable).focus()

    def _redraw(self, snap: Snapshot) -> None:
        self.set_class(not snap.connected and snap.stats is not None, "-stale")
        stats = snap.stats
        if stats is None:
            return
        app = self.console
        self.query_one(ModelsTable).show(view.model_rows(stats, app.breaker_seen))
        self.query_one("#gpu-panel", Panel).show_lines(gpu_lines(stats))
        self.query_one("#breaker-panel", Panel).show_lines(breaker_lines(stats))
        self.query_one("#cache-panel", Panel).show_lines(cache_lines(stats))
        self.query_one("#memory-panel", Panel).show_lines(memory_lines(stats))
        self.query_one("#generation-panel", Panel).show_lines(generation_lines(stats))
        self.query_one("#loop-panel", Panel).show_lines(loop_lines(stats))
        self.query_one("#compute-panel", Panel).show_lines(compute_lines(stats))
        self.query_one("#workers-panel", Panel).show_lines(worker_lines(stats))
        self.query_one("#refused-panel", Panel).show_lines(refusal_lines(stats))
        for row in ("#panels", "#health"):
            self.query_one(row).display = any(p.display for p in self.query_one(row).query(Panel))
        for graph in self.query(HistoryGraph):
            graph.show(app.history.values(graph.metric))

    @property
    def selected_model(self) -> str | None:
        return self.query_one(ModelsTable).selected_model

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (action in MUTATING and self.console.read_only)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        # Enter on a model drills into its tuning form.
        if event.row_key.value is not None:
            self.console.action_tuning(str(event.row_key.value))

    def _model(self) -> str | None:
        model = self.selected_model
        if model is None:
            self.notify("no model selected", severity="warning")
        return model

    def action_breaker(self, verb: str) -> None:
        if model := self._model():
            self.console.ask(f"breaker:{verb}", model)

    def action_load(self) -> None:
        if model := self._model():
            self.console.ask("model:load", model)

    def action_unload(self) -> None:
        if model := self._model():
            self.console.ask("model:unload", model)

    def action_purge(self) -> None:
        if model := self._model():
            self.console.ask("cache:purge", model)

    def action_purge_all(self) -> None:
        self.console.ask("cache:purge", None)
