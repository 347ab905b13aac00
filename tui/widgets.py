"""The dashboard's building blocks: status bar, models table, optional panels, history graphs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import DataTable, Label, Static

from tui import view
from tui.state import CONNECTED, CONNECTING, DISCONNECTED, UNAUTHORIZED, Snapshot

if TYPE_CHECKING:
    from tui.console import ConsoleApp


def console(widget: Widget) -> ConsoleApp:
    return cast("ConsoleApp", widget.app)


class StatusBar(Static):
    """One line on top of every screen: where, what, how long, and whether it is still talking.

    Disconnection turns the whole bar red and says so in words: a stale dashboard that merely
    stops changing is the failure mode this bar exists to prevent.
    """

    def on_mount(self) -> None:
        app = console(self)
        self.watch(app, "snapshot", self._redraw)
        self.watch(app, "interval", self._redraw)
        self.watch(app, "paused", self._redraw)

    def _redraw(self, _: object = None) -> None:
        app = console(self)
        snap: Snapshot = app.snapshot
        sep = Text(" │ ", style="dim")
        every = "paused" if app.paused else f"every {view.fmt_value(app.interval)} s"
        self.set_class(snap.status != CONNECTED and snap.status != CONNECTING, "-alert")
        if snap.status in (DISCONNECTED, UNAUTHORIZED) or (snap.status != CONNECTED and snap.error):
            word = {
                DISCONNECTED: "DISCONNECTED",
                UNAUTHORIZED: "UNAUTHORIZED (check --token)",
            }.get(snap.status, "ERROR")
            line = Text.assemble(
                (f" ✖ {word} ", "bold reverse"),
                "  ",
                (app.client.address, "bold"),
                sep,
                snap.error or "",
                sep,
                f"retrying {every} (attempt {snap.failures})" if not app.paused else "paused",
            )
            self.update(line)
            return
        stats = snap.stats or {}
        status = (
            Text("● connected", style="bold green")
            if snap.status == CONNECTED
            else Text("○ connecting…", style="yellow")
        )
        parts: list[Text | str] = [
            Text(f" appliance {stats.get('version', '?')}", style="bold"),
            sep,
            app.client.address,
            sep,
            f"up {view.fmt_duration(stats.get('uptime_s'))}",
            sep,
            Text(view.device_label(stats), style="bold"),
            sep,
            status,
        ]
        if stats.get("draining"):
            parts += [sep, Text("draining", style="bold yellow")]
        elif stats and not stats.get("ready", True):
            parts += [sep, Text("not ready", style="yellow")]
        parts += [sep, every]
        if app.read_only:
            parts += [sep, Text("READ-ONLY", style="bold magenta")]
        self.update(Text.assemble(*parts))


class ModelsTable(DataTable[Any]):
    """One row per model; rows are keyed by model name and updated in place between polls."""

    COLUMNS = (
        ("model", "model"),
        ("kind", "kind"),
        ("state", "state"),
        ("rps", "req/s"),
        ("p50", "p50 ms"),
        ("p99", "p99 ms"),
        ("queue", "queue P1/P2/…"),
        ("breaker", "breaker"),
        ("cache", "cache hit"),
    )

    def on_mount(self) -> None:
        self.border_title = "models"
        self.cursor_type = "row"
        self.zebra_stripes = True
        for key, label in self.COLUMNS:
            self.add_column(label, key=key)

    @property
    def selected_model(self) -> str | None:
        if not self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        return None if key.value is None else str(key.value)

    def show(self, rows: list[view.ModelRow]) -> None:
        cells = {r.name: self._cells(r) for r in rows}
        existing = [str(k.value) for k in self.rows]
        if existing == list(cells):
            for name, values in cells.items():
                for (key, _), value in zip(self.COLUMNS, values, strict=True):
                    self.update_cell(name, key, value, update_width=True)
            return
        selected = self.selected_model
        self.clear()
        for name, values in cells.items():
            self.add_row(*values, key=name)
        if selected in cells:
            self.move_cursor(row=list(cells).index(selected))

    @staticmethod
    def _cells(r: view.ModelRow) -> tuple[Text | str, ...]:
        breaker = (
            Text(r.breaker.replace("_", " "), style=view.BREAKER_STYLES.get(r.breaker, ""))
            if r.breaker
            else Text("—", style="dim")
        )
        return (
            Text(r.name, style="bold"),
            r.kind,
            Text(r.state, style=view.STATE_STYLES.get(r.state, "")),
            Text(view.fmt_rate(r.requests_per_s), justify="right"),
            Text(view.fmt_ms(r.p50_ms), justify="right"),
            Text(view.fmt_ms(r.p99_ms), justify="right"),
            " / ".join(str(d) for d in r.queue) if r.queue else Text("—", style="dim"),
            breaker,
            Text(view.fmt_percent(r.cache_hit_rate), justify="right"),
        )


class Panel(Static):
    """A bordered box that is only displayed while the stats carry its section."""

    def __init__(self, title: str, *, id: str) -> None:
        super().__init__(id=id, classes="panel")
        self.border_title = title
        self.display = False

    def show_lines(self, lines: list[Text] | None) -> None:
        self.display = bool(lines)
        if lines:
            self.update(Text("\n").join(lines))


def _kv(key: str, value: str, value_style: str = "bold") -> Text:
    return Text.assemble((f"{key} ", "dim"), (value, value_style))


def breaker_lines(stats: Mapping[str, Any]) -> list[Text]:
    # State first, in a fixed width: a long model name is cut by the panel, the state never is.
    out = []
    for name, m in (stats.get("models") or {}).items():
        b = m.get("breaker") if isinstance(m, Mapping) else None
        if not isinstance(b, Mapping):
            continue
        state = str(b.get("state", "?"))
        fail = view.num(b.get("failure_rate"))
        out.append(
            Text.assemble(
                (f"{state.replace('_', ' '):<12}", view.BREAKER_STYLES.get(state, "")),
                (str(name), "bold"),
                (f" {view.fmt_percent(fail)} fail" if fail else "", "dim"),
            )
        )
    return out


def cache_lines(stats: Mapping[str, Any]) -> list[Text]:
    c = stats.get("cache")
    if not isinstance(c, Mapping) or not c.get("enabled"):
        return []
    return [
        _kv("hit rate", view.fmt_percent(view.hit_rate(c))),
        _kv("entries", str(c.get("entries", 0))),
        _kv("size", view.fmt_bytes(c.get("bytes"))) + _kv(" /", view.fmt_bytes(c.get("max_bytes")), ""),
        _kv("hit/stale/miss", f"{c.get('hits', 0)}/{c.get('stale_hits', 0)}/{c.get('misses', 0)}"),
    ]


def gpu_lines(stats: Mapping[str, Any]) -> list[Text]:
    out = []
    for g in view.gpu_rows(stats):
        out.append(Text(f"{g.index} {g.name}", style="bold"))
        out.append(_kv("util", view.fmt_percent(g.utilization)))
        if g.memory_total:
            used = view.fmt_bytes(g.memory_used).split()[0] if g.memory_used is not None else "?"
            out.append(_kv("mem", f"{used} / {view.fmt_bytes(g.memory_total)}"))
        elif g.memory_used is not None:
            out.append(_kv("mem", view.fmt_bytes(g.memory_used)))
        sensors = []
        if g.temperature_c is not None:
            sensors.append(_kv("temp", f"{g.temperature_c:.0f}°C"))
        if g.power_w is not None:
            sensors.append(_kv("power", f"{g.power_w:.0f} W"))
        if sensors:
            out.append(Text("  ").join(sensors))
    return out


def generic_lines(section: Any) -> list[Text]:
    if not isinstance(section, Mapping):
        return []
    return [_kv(k, v) for k, v in view.fmt_generic(section)]


def generation_lines(stats: Mapping[str, Any]) -> list[Text]:
    out: list[Text] = []
    for name, m in (stats.get("models") or {}).items():
        gen = m.get("generation") if isinstance(m, Mapping) else None
        lines = generic_lines(gen)
        if lines:
            out.append(Text(str(name), style="bold"))
            out.extend(lines[:4])
        prefix = gen.get("prefix_cache") if isinstance(gen, Mapping) else None
        if isinstance(prefix, Mapping):
            out.append(prefix_cache_line(prefix))
    return out


def prefix_cache_line(p: Mapping[str, Any]) -> Text:
    """The prefix cache of one model: token hit rate, blocks held, evictions."""
    rate = p.get("hit_rate")
    shown = "–" if not isinstance(rate, int | float) else f"{rate * 100:.0f}%"
    return _kv("prefix cache", f"hit {shown} · {p.get('blocks', 0)} blocks · {p.get('evictions', 0)} evicted")


class Graph(Widget):
    """A bar graph of a history ring, newest sample at the right, one column per sample.

    Textual's Sparkline scales from the minimum to the maximum and stretches a short series to the
    full width; for "how busy is it" the bars must start at zero and keep a fixed time per column,
    as nvitop's and btop's history graphs do.
    """

    DEFAULT_CSS = "Graph { height: 3; }"
    BARS = " ▁▂▃▄▅▆▇█"

    def __init__(self, colour: str, ceiling: float | None = None) -> None:
        super().__init__()
        self.colour = colour
        # A fixed top (100 for a percentage); otherwise a round number above the visible peak,
        # so a steady load draws as a steady line at mid height instead of a solid block.
        self.ceiling = ceiling
        self.values: list[float] = []

    def plot(self, values: list[float]) -> None:
        self.values = values
        self.refresh()

    def render(self) -> Text:
        width, height = max(1, self.size.width), max(1, self.size.height)
        shown = self.values[-width:]
        peak = self.ceiling or nice_ceiling(max(shown, default=0.0) * 1.25)
        levels = [round(max(0.0, v) / peak * height * 8) for v in shown]
        rows = []
        for row in reversed(range(height)):
            line = Text(" " * (width - len(shown)))
            for level in levels:
                fill = level - row * 8
                if fill > 0:
                    line.append(self.BARS[min(fill, 8)], style=self.colour)
                elif row == 0:
                    line.append("▁", style="dim")  # a sample of zero: a baseline, not a gap
                else:
                    line.append(" ")
            rows.append(line)
        return Text("\n").join(rows)


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 5 × 10^n that is >= x (1 for x <= 0)."""
    if x <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(x))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= x)


class HistoryGraph(Vertical):
    """A titled graph of one history ring; hidden until that metric has samples."""

    def __init__(
        self, metric: str, title: str, fmt: Callable[[float], str], colour: str, ceiling: float | None = None
    ) -> None:
        super().__init__(id=f"graph-{metric.replace('_', '-')}", classes="graph")
        self.metric = metric
        self.title = title
        self.fmt = fmt
        self.colour = colour
        self.ceiling = ceiling
        self.display = False

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="graph-title")
        yield Graph(self.colour, self.ceiling)

    def show(self, values: list[float]) -> None:
        self.display = bool(values)
        if not values:
            return
        self.query_one(Label).update(
            Text.assemble(
                (self.title, "bold"), " ", self.fmt(values[-1]), ("  max ", "dim"), self.fmt(max(values))
            )
        )
        self.query_one(Graph).plot(values)
