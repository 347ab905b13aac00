"""The dashboard's building blocks: status bar, models table, optional panels, history graphs."""

from __future__ import annotations

import math
import sys
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
        down = view.workers_down(stats)
        if down:
            # A dead worker is the one thing on this line that needs someone: it goes first.
            names = ", ".join(f"{w.name} (given up)" if w.given_up else w.name for w in down)
            parts[1:1] = [sep, Text(f" ✖ workers down: {names} ", style="bold reverse red")]
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
        ("backend", "backend"),
        ("rps", "req/s"),
        ("p50", "p50 ms"),
        ("p99", "p99 ms"),
        ("queue", "queue P1/P2/…"),
        ("breaker", "breaker"),
        ("cache", "cache hit"),
        ("why", "why not faster"),
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
            self._update(cells)
            return
        selected = self.selected_model
        self.clear()
        for name, values in cells.items():
            self.add_row(*values, key=name)
        if selected in cells:
            self.move_cursor(row=list(cells).index(selected))

    def _update(self, cells: dict[str, tuple[Text, ...]]) -> None:
        """Write only the cells whose value changed, and re-measure each column at most once.

        DataTable re-measures a whole column for every cell updated with ``update_width`` that got
        narrower than the column: all cells of every poll made that quadratic in the models (a
        2.6 s frozen loop per poll at 50 models, a minute at 200). Per column, only the widest
        changed cell asks for a width update: wider than the column, the column grows to it; else
        the column is measured once and shrinks to its widest cell.
        """
        widest: dict[str, tuple[int, str, Text]] = {}  # column -> (width, model, cell)
        for name, values in cells.items():
            for (key, _), value in zip(self.COLUMNS, values, strict=True):
                if _same_cell(self.get_cell(name, key), value):
                    continue
                self.update_cell(name, key, value)
                if key not in widest or value.cell_len > widest[key][0]:
                    widest[key] = (value.cell_len, name, value)
        for key, (_, name, value) in widest.items():
            self.update_cell(name, key, value, update_width=True)

    @staticmethod
    def _backend(r: view.ModelRow) -> Text:
        """The backend; a yellow arrow when a faster one was skipped (the last column says why)."""
        if not r.backend:
            return Text("—", style="dim")
        cell = Text(view.backend_label(r.backend), style=view.BACKEND_STYLES.get(r.backend, ""))
        if r.backend_reason:
            cell.append(" ↓", style="yellow")
        return cell

    @staticmethod
    def _cells(r: view.ModelRow) -> tuple[Text, ...]:
        # Text, never str: a str cell is read as markup, and the widths above are Text's cell_len.
        breaker = (
            Text(r.breaker.replace("_", " "), style=view.BREAKER_STYLES.get(r.breaker, ""))
            if r.breaker
            else Text("—", style="dim")
        )
        return (
            Text(r.name, style="bold"),
            Text(r.kind),
            Text(r.state, style=view.STATE_STYLES.get(r.state, "")),
            ModelsTable._backend(r),
            Text(view.fmt_rate(r.requests_per_s), justify="right"),
            Text(view.fmt_ms(r.p50_ms), justify="right"),
            Text(view.fmt_ms(r.p99_ms), justify="right"),
            Text(" / ".join(str(d) for d in r.queue)) if r.queue else Text("—", style="dim"),
            breaker,
            Text(view.fmt_percent(r.cache_hit_rate), justify="right"),
            Text(view.short_reason(r.backend_reason), style="yellow"),
        )


def _same_cell(old: object, new: Text) -> bool:
    # Text's == compares the characters and spans only, not the style of the whole cell.
    return isinstance(old, Text) and old == new and old.style == new.style and old.justify == new.justify


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


# A panel's lines, less its border (.panel's max-height in console.tcss). Panels with a line per
# model show this many at most, the last saying how many more: 10,000 models drew 10,000 lines.
PANEL_LINES = 6


def more_line(n: int, noun: str = "") -> Text:
    plural = f" {noun}{'s' if n != 1 else ''}" if noun else ""
    return Text(f"… and {n:,} more{plural}", style="dim")


def breaker_lines(stats: Mapping[str, Any]) -> list[Text]:
    # State first, in a fixed width: a long model name is cut by the panel, the state never is.
    breakers = [
        (name, m["breaker"])
        for name, m in view.models(stats).items()
        if isinstance(m, Mapping) and isinstance(m.get("breaker"), Mapping)
    ]
    more = 0
    if len(breakers) > PANEL_LINES:
        # Not all fit: the breakers holding traffic back first, however far down the list.
        breakers.sort(key=lambda nb: nb[1].get("state") in ("closed", "disabled"))
        more = len(breakers) - (PANEL_LINES - 1)
        breakers = breakers[: PANEL_LINES - 1]
    out = []
    for name, b in breakers:
        state = str(b.get("state", "?"))
        fail = view.num(b.get("failure_rate"))
        out.append(
            Text.assemble(
                (f"{state.replace('_', ' '):<12}", view.BREAKER_STYLES.get(state, "")),
                (str(name), "bold"),
                (f" {view.fmt_percent(fail)} fail" if fail else "", "dim"),
            )
        )
    if more:
        out.append(more_line(more))
    return out


def cache_lines(stats: Mapping[str, Any]) -> list[Text]:
    c = stats.get("cache")
    if not isinstance(c, Mapping) or not c.get("enabled"):
        return []
    return [
        _kv("hit rate", view.fmt_percent(view.hit_rate(c))),
        _kv("entries", str(c.get("entries", 0))),
        _kv("size", view.fmt_bytes(view.number(c.get("bytes"))))
        + _kv(" /", view.fmt_bytes(view.number(c.get("max_bytes"))), ""),
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


def memory_lines(stats: Mapping[str, Any]) -> list[Text]:
    """Each budget (the GPU's for GPU-engine models, host RAM for CPU-engine ones) used / total,
    then the load and eviction counts."""
    memory = stats.get("memory")
    pools = view.memory_pools(stats)
    if not pools:
        return generic_lines(memory)
    out = []
    for p in pools:
        # Narrow panel: "GPU 15% / 20 GiB" (the share of that pool's budget, and the budget).
        share = view.fmt_percent(p.used / p.budget) if p.budget else view.fmt_bytes(p.used)
        out.append(_kv(p.pool, f"{share} / {view.fmt_bytes(p.budget).replace('.0 ', ' ')}"))
    if isinstance(memory, Mapping):
        for key in ("loads", "evictions"):
            if isinstance(memory.get(key), int | float):
                out.append(_kv(key, str(int(memory[key]))))
    return out


def fmt_lag(ms: float) -> str:
    if ms < 0:  # no lag is below zero: unknown (a server clock that went back)
        return "—"
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def loop_lines(stats: Mapping[str, Any]) -> list[Text]:
    """p50/p99/max of the event loop's lag over the last minute; red when p99 is past the alert."""
    lag = view.loop_lag(stats)
    if lag is None:
        return []
    if not lag.samples:
        return [Text("no samples yet", style="dim")]
    alert = "bold red" if lag.slow else "bold"
    return [
        _kv("p50", fmt_lag(lag.p50_ms)),
        _kv("p99", fmt_lag(lag.p99_ms), alert) + (Text(" blocked", style="red") if lag.slow else Text()),
        _kv("max", fmt_lag(lag.max_ms), "bold red" if lag.max_ms > view.LOOP_LAG_ALERT_MS else "bold"),
        _kv("samples", f"{lag.samples} / 1 min", ""),
    ]


def compute_lines(stats: Mapping[str, Any]) -> list[Text]:
    """Engine grants running out of the arbiter's concurrency, waiters per priority, grants."""
    c = view.compute(stats)
    if c is None:
        return []
    busy = "bold yellow" if c.running >= c.concurrency else "bold"
    waiting = Text(" ").join(
        Text.assemble((f"P{level} ", "dim"), (str(n), "bold yellow" if n else "")) for level, n in c.waiting
    )
    lines = [
        _kv("running", f"{c.running} / {c.concurrency}", busy),
        Text.assemble(("wait ", "dim"), waiting if c.waiting else Text("0", style="bold")),
        _kv("granted", f"{c.granted:,}"),
        _kv("aging", f"{c.aging_ms:g} ms" if c.aging_ms > 0 else "off", ""),
    ]
    if c.urgent_lane:  # shown only where an operator turned the lane on
        lines.insert(1, _kv("urgent", f"{c.urgent_running} / {c.urgent_lane}", "bold"))
    return lines


WORKER_LINES = PANEL_LINES


def worker_lines(stats: Mapping[str, Any]) -> list[Text]:
    """Down workers first, red, with their recent failures; then the ones that are up."""
    rows = view.worker_rows(stats)
    out = []
    for w in rows:
        if w.down:
            out.append(
                Text.assemble(
                    ("✖ ", "bold red"),
                    (w.name, "bold red"),
                    (f" {w.state}", "red"),
                    (f" ×{w.recent_failures}" if w.recent_failures else "", "red"),
                )
            )
        else:
            out.append(
                Text.assemble(
                    ("● ", "green"),
                    w.name,
                    (f" ×{w.recent_failures}" if w.recent_failures else "", "yellow"),
                )
            )
    if len(out) > WORKER_LINES:
        rest = out[WORKER_LINES - 1 :]
        out = [*out[: WORKER_LINES - 1], Text(f"+{len(rest)} more up", style="dim")]
    return out


REFUSAL_REASONS = 3  # lines for reasons, under the rate


def refusal_lines(stats: Mapping[str, Any]) -> list[Text]:
    """The models' queue refusals (early shedding included): rate now, counts since start."""
    r = view.refusals(stats)
    if r is None:
        return []
    out = [_kv("now", f"{view.fmt_rate(r.per_s)}/s", "bold yellow" if r.per_s else "bold")]
    shown = list(r.by_reason)
    if len(shown) > REFUSAL_REASONS:  # the rarest reasons share one line: the row stays 4 high
        rest = shown[REFUSAL_REASONS - 1 :]
        shown = [*shown[: REFUSAL_REASONS - 1], ("other", sum(n for _, n in rest))]
    # Count first: a narrow panel cuts the reason's words, never the number.
    out += [Text.assemble((f"{n:,} ", "bold"), (reason.replace("_", " "), "dim")) for reason, n in shown]
    if not r.by_reason:
        out.append(Text("none since start", style="dim"))
    return out


def generic_lines(section: Any) -> list[Text]:
    if not isinstance(section, Mapping):
        return []
    return [_kv(k, v) for k, v in view.fmt_generic(section)]


def generation_lines(stats: Mapping[str, Any]) -> list[Text]:
    out: list[Text] = []
    more = 0  # models past the panel's lines: counted, not drawn
    for name, m in view.models(stats).items():
        gen = m.get("generation") if isinstance(m, Mapping) else None
        if not isinstance(gen, Mapping):
            continue
        if more:
            more += 1
            continue
        lines = generic_lines(gen)
        block = [Text(str(name), style="bold"), *lines[:4]] if lines else []
        prefix = gen.get("prefix_cache")
        if isinstance(prefix, Mapping):
            block.append(prefix_cache_line(prefix))
        if out and len(out) + len(block) > PANEL_LINES:
            more = 1
            continue
        out.extend(block)
    if more:
        out = [*out[: PANEL_LINES - 1], more_line(more, "model")]
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
        levels = bar_levels(shown, height, self.ceiling)
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


def bar_levels(values: list[float], height: int, ceiling: float | None = None) -> list[int]:
    """How many eighths of a cell each sample fills, in a graph ``height`` rows high."""
    peak = ceiling or nice_ceiling(max(values, default=0.0) * 1.25)
    return [round(max(0.0, v) / peak * height * 8) for v in values]


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 5 × 10^n that is >= x (1 for x <= 0 or NaN); the largest float for
    x past 1e308, where the next round number is not a float."""
    if not x > 0:
        return 1.0
    if x > 1e308:
        return sys.float_info.max
    # A float scale: an int 10**308 times 2 is past every float, and dividing by it raises.
    scale = 10.0 ** math.floor(math.log10(x))
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
