"""The tuning screen: a form generated from the server's settings registry.

Nothing about the settings is hard-coded here: names, types, bounds, help and scope all come from
GET /admin/settings, so a setting added to the server shows up in the console without a release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.validation import Integer, Number, Validator
from textual.widget import Widget
from textual.widgets import Button, Footer, Input, Label, Select, Static, Switch

from tui import view
from tui.client import ApiError
from tui.state import Snapshot
from tui.widgets import StatusBar

if TYPE_CHECKING:
    from tui.console import ConsoleApp

DEFAULTS = "__defaults__"  # the scope selector's value for the server-wide defaults
UNREADABLE_LINES = 5  # lines naming what the form cannot show of the server's answer
Editor = Input | Switch | Select[str]


def slug(name: str) -> str:
    """``name`` as the tail of a widget id: a dot is "--" (batching.max_batch_size is
    batching--max_batch_size); any other character an id cannot hold, "-" too, is its code point
    in hex between dashes, so no two names share an id (a space or a "[" in a name the server
    sent crashed the form, and "a.b" and "a--b" were one id)."""
    return "".join(
        c if c.isascii() and (c.isalnum() or c == "_") else "--" if c == "." else f"-{ord(c):x}-"
        for c in name
    )


class SettingRow(Vertical):
    """One setting: what it is, its current value, the pending value, and the server's verdict."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(id=f"row-{slug(spec['name'])}", classes="setting")
        self.spec = spec
        # Not "name": Widget.name is Textual's own attribute.
        self.name_ = str(spec["name"])
        self.kind = str(spec.get("type", "str"))
        self.current: Any = spec.get("default")
        self.editable = True
        # Why the server's value cannot be edited here (not of the setting's type), if it cannot.
        self.problem: str | None = None

    def compose(self) -> ComposeResult:
        bounds = _bounds(self.spec)
        about = Text.assemble(
            (self.name_, "bold"),
            (f"  {self.kind}", "dim"),
            (f"  {bounds}" if bounds else "", "dim italic"),
            ("  reload" if self.spec.get("reload") else "", "yellow"),
            ("  server-wide" if self.spec.get("scope") == "server" else "", "cyan"),
            "\n",
            (str(self.spec.get("help", "")), "dim"),
        )
        with Horizontal(classes="setting-line"):
            yield Static(about, classes="about")
            yield Static("", classes="current")
            yield self._editor()
        yield Static("", classes="field-error")
        yield Static("", classes="value-note")

    def _editor(self) -> Editor:
        eid = f"edit-{slug(self.name_)}"
        choices = self.spec.get("choices")
        if self.kind == "bool":
            return Switch(bool(self.current), id=eid, classes="editor")
        if choices:
            # A value outside the choices is no value of the Select's (it raised): the first
            # stands in until set_current shows the server's value, or says why it cannot.
            return Select(
                [(str(c), str(c)) for c in choices],
                value=self.current if self.current in choices else choices[0],
                allow_blank=False,
                id=eid,
                classes="editor",
            )
        lo, hi = self.spec.get("minimum"), self.spec.get("maximum")
        validators: list[Validator] = []
        if self.kind == "int":
            validators.append(Integer(lo, hi))
        elif self.kind == "float":
            validators.append(Number(lo, hi))
        # Validators only colour the box as you type; the server has the last word on Apply.
        return Input(view.fmt_value(self.current), id=eid, classes="editor", validators=validators)

    @property
    def editor(self) -> Editor:
        return cast(Editor, self.query_one(".editor"))

    def set_current(self, value: Any, origin: str, editable: bool, *, reset: bool) -> None:
        """Show the server's value; the editor follows it unless the operator has a pending edit.

        A value that is not of the setting's type (or not one of its choices) is shown as what it
        is, and not editable: the editor cannot hold it, and Apply would send what it is not.
        """
        pending_edit = self.changed
        self.problem = view.value_problem(self.spec, value)
        self.current = value
        self.editable = editable and self.problem is None
        shown = view.fmt_value(value) or "[]"
        if self.problem is not None:
            shown = view.json_kind(value) if isinstance(value, list | dict) else view.clip(shown, 40)
        self.query_one(".current", Static).update(Text.assemble((shown, "bold"), "\n", (origin, "dim")))
        note = self.query_one(".value-note", Static)
        note.update(
            Text(f"⚠ the server's value cannot be edited here: {self.problem}") if self.problem else ""
        )
        note.display = self.problem is not None
        editor = self.editor
        editor.disabled = not self.editable
        if self.problem is None and (reset or not pending_edit):
            self.set_pending(value)
        self._mark()

    def set_pending(self, value: Any) -> None:
        editor = self.editor
        if isinstance(editor, Switch):
            editor.value = bool(value)
        elif isinstance(editor, Select):
            editor.value = str(value)
        else:
            editor.value = view.fmt_value(value)

    def pending(self) -> tuple[Any, str | None]:
        """The editor's value as JSON, or why it cannot be one."""
        editor = self.editor
        if isinstance(editor, Switch):
            return editor.value, None
        if isinstance(editor, Select):
            return (None, "choose a value") if editor.value is Select.NULL else (editor.value, None)
        try:
            return view.parse_value(self.kind, editor.value), None
        except ValueError as exc:
            return None, str(exc)

    @property
    def changed(self) -> bool:
        if not self.editable or not self.is_mounted:
            return False
        value, error = self.pending()
        return error is not None or not view.same_value(value, self.current)

    def show_error(self, message: str | None) -> None:
        box = self.query_one(".field-error", Static)
        box.update(Text(f"✖ {message}") if message else "")
        box.display = bool(message)
        self.set_class(bool(message), "-invalid")

    def _mark(self) -> None:
        self.set_class(self.changed, "-changed")


def _bounds(spec: dict[str, Any]) -> str:
    if spec.get("choices"):
        return " | ".join(str(c) for c in spec["choices"])
    lo, hi = spec.get("minimum"), spec.get("maximum")
    if lo is None and hi is None:
        return ""
    return f"{'' if lo is None else view.fmt_value(lo)}..{'' if hi is None else view.fmt_value(hi)}"


class TuningScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "apply", "Apply"),
        Binding("ctrl+r", "revert", "Revert"),
        Binding("escape", "dashboard", "Dashboard"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.scope = DEFAULTS
        self.view: dict[str, Any] | None = None
        self._loading = False
        self._was_connected = False
        self._applying = False  # a PATCH is waiting for its answer

    @property
    def console(self) -> ConsoleApp:
        return cast("ConsoleApp", self.app)

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="tuning-bar"):
            yield Label("Scope", id="scope-label")
            yield Select([("server-wide defaults", DEFAULTS)], value=DEFAULTS, allow_blank=False, id="scope")
            yield Label("", id="pending")
            if not self.console.read_only:
                yield Button("Apply", id="apply", variant="primary")
                yield Button("Revert", id="revert")
        yield Static("loading settings…", id="form-message")
        yield Static("", id="unreadable")
        with Horizontal(id="form-header"):
            yield Label("setting", classes="about")
            yield Label("current", classes="current")
            yield Label("pending" if not self.console.read_only else "", classes="editor-head")
        yield VerticalScroll(id="form")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "snapshot", self._on_snapshot)

    def on_screen_resume(self) -> None:
        # Pick up changes made elsewhere (another console, the CLI) without touching pending edits.
        self.fetch_settings()

    def _on_snapshot(self, snap: Snapshot) -> None:
        # After a reconnect the server may be a new process with a new config: fetch again.
        if snap.connected and (self.view is None or not self._was_connected) and self.is_current:
            self.fetch_settings()
        self._was_connected = snap.connected

    def select_scope(self, scope: str | None) -> None:
        self.scope = scope or DEFAULTS
        if self.is_mounted and self.view is not None:
            self._set_scope_options()
            self._fill(reset=True)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (action in ("apply", "revert") and self.console.read_only)

    # -- data ------------------------------------------------------------------------------------

    @work(group="settings", exit_on_error=False)
    async def fetch_settings(self) -> None:
        if self._loading:
            return
        self._loading = True
        try:
            res = await self.console.client.settings()
        finally:
            self._loading = False
        if res.error is not None or res.value is None:
            if self.view is None:
                self._message(f"cannot load settings: {res.error.message if res.error else '?'}", "error")
            return
        try:
            await self._show_view(res.value, reset=False)
        except Exception as exc:
            # The worker does not exit the app on error: without this the form would go on
            # saying "loading settings…", or show the last answer as if it were this one.
            self.log.error("could not show the server's settings", exc)
            self._message(f"cannot show the settings: {type(exc).__name__}: {exc}", "error")

    async def _show_view(self, doc: dict[str, Any], *, reset: bool) -> None:
        first = self.view is None
        self.view, problems = view.clean_settings(doc)
        self._show_problems(problems)
        registry: list[dict[str, Any]] = self.view["registry"]
        names = [s["name"] for s in registry]
        if [r.name_ for r in self.query(SettingRow)] != names:
            form = self.query_one("#form", VerticalScroll)
            # Awaited: the old rows are gone and the new ones composed before they are filled
            # (filled after a refresh, a row half removed had no parts to fill and crashed).
            await form.remove_children()
            widgets: list[Widget] = []
            section = None
            for spec in registry:
                head = spec["name"].split(".", 1)[0]
                if head != section:
                    section = head
                    widgets.append(Label(head, classes="section", markup=False))
                widgets.append(SettingRow(spec))
            await form.mount_all(widgets)
            self._fill(reset=True)
        else:
            self._fill(reset=reset)
        self._set_scope_options()
        if first:
            where = self.view["config_file"]
            self._message(
                f"changes are saved to {where}" if where else "no config file: changes last until restart",
                "info",
            )

    def _show_problems(self, problems: list[str]) -> None:
        """Name what the form cannot show of the server's answer (first few lines, then a count)."""
        box = self.query_one("#unreadable", Static)
        box.display = bool(problems)
        if not problems:
            return
        shown = problems[:UNREADABLE_LINES]
        if len(problems) > len(shown):
            shown[-1] = f"… and {len(problems) - len(shown) + 1} more"
        head = f"✖ {len(problems)} part{'s' if len(problems) > 1 else ''} of the server's settings cannot be shown:"
        box.update(Text("\n  ".join([head, *shown])))

    def _set_scope_options(self) -> None:
        assert self.view is not None
        models = list(self.view["models"])
        if self.scope != DEFAULTS and self.scope not in models:
            self.scope = DEFAULTS
        select = cast("Select[str]", self.query_one("#scope", Select))
        # A model's name as written (rich Text, not markup: a "[/]" in one crashed the screen).
        options: list[tuple[Text | str, str]] = [("server-wide defaults", DEFAULTS)]
        options += [(Text(f"model {m}"), m) for m in models]
        with select.prevent(Select.Changed):
            select.set_options(options)
            select.value = self.scope

    def _fill(self, *, reset: bool) -> None:
        if self.view is None:
            return
        overrides = self.view["overrides"]
        if self.scope == DEFAULTS:
            values = self.view["defaults"]
            mine = overrides["defaults"]
        else:
            values = self.view["models"].get(self.scope, {})
            mine = overrides["models"].get(self.scope, {})
        flat_mine = _flatten(mine)
        defaults = self.view["defaults"]
        read_only = self.console.read_only
        for row in self.query(SettingRow):
            server_wide = row.spec.get("scope") == "server"
            value = values.get(row.name_, row.spec.get("default"))
            if self.scope == DEFAULTS:
                origin = "appliance.yaml" if row.name_ in flat_mine else "built-in"
            elif server_wide:
                origin = "server-wide"
            elif row.name_ in flat_mine:
                origin = "model override"
            elif view.same_value(value, defaults.get(row.name_, value)):
                origin = "inherited"
            else:
                # The API reports effective values only; one that differs from the server-wide
                # value without an override of its own can only come from the model's model.yaml.
                origin = "model.yaml"
            editable = not read_only and not (server_wide and self.scope != DEFAULTS)
            row.set_current(value, origin, editable, reset=reset)
            if reset:
                row.show_error(None)
        self._count()

    # -- events ----------------------------------------------------------------------------------

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "scope":
            self.select_scope(str(event.value))
            return
        self._changed(event.select)

    def on_input_changed(self, event: Input.Changed) -> None:
        self._changed(event.input)

    def on_switch_changed(self, event: Switch.Changed) -> None:
        self._changed(event.switch)

    def _changed(self, widget: Widget) -> None:
        for row in widget.ancestors:
            if isinstance(row, SettingRow):
                row._mark()
                break
        self._count()

    def _count(self) -> None:
        n = sum(1 for r in self.query(SettingRow) if r.changed)
        self.query_one("#pending", Label).update(
            Text(f"{n} pending change{'s' if n != 1 else ''}", style="bold yellow")
            if n
            else Text("no changes", "dim")
        )

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        elif event.button.id == "revert":
            self.action_revert()

    def action_dashboard(self) -> None:
        self.app.pop_screen()

    def action_revert(self) -> None:
        self._fill(reset=True)
        self._message("reverted to the server's values", "info")

    def action_apply(self) -> None:
        if self.console.read_only:
            return
        if self._applying:
            # As the actions do: the same request twice is not what a second press means.
            self.notify("already applying: not sent again", severity="warning")
            return
        self._applying = True
        self._apply_button("Applying…", disabled=True)
        self._apply()

    def _apply_button(self, label: str, *, disabled: bool) -> None:
        for button in self.query("#apply").results(Button):
            button.label = label
            button.disabled = disabled

    # Not exclusive: that cancelled the request in flight and sent another.
    @work(group="apply", exit_on_error=False)
    async def _apply(self) -> None:
        try:
            await self._send_changes()
        finally:
            self._applying = False
            self._apply_button("Apply", disabled=False)

    async def _send_changes(self) -> None:
        changes: dict[str, Any] = {}
        bad = 0
        for row in self.query(SettingRow):
            row.show_error(None)
            if not row.editable:
                continue
            value, error = row.pending()
            if error is not None:
                row.show_error(f"{row.name_}: {error}")
                bad += 1
            elif not view.same_value(value, row.current):
                changes[row.name_] = value
        if bad:
            self._message(f"not applied: {bad} field{'s' if bad > 1 else ''} cannot be read", "error")
            return
        if not changes:
            self._message("nothing to apply", "info")
            return
        try:
            tree = view.nest(changes)
        except ValueError as e:
            self._message(f"not applied: {e}", "error")
            return
        body = {"defaults": tree} if self.scope == DEFAULTS else {"models": {self.scope: tree}}
        res = await self.console.client.patch_settings(body)
        if res.value is not None:
            await self._show_view(res.value, reset=True)
            assert self.view is not None
            where = "server-wide defaults" if self.scope == DEFAULTS else f"model {self.scope}"
            text = f"applied {len(changes)} change{'s' if len(changes) > 1 else ''} to {where}"
            if self.view["config_file"]:
                text += f"; saved to {self.view['config_file']}"
            reload_needed = self.view["reload_needed"]
            if reload_needed:
                text += f"; takes effect when reloaded: {', '.join(reload_needed)}"
            restart_needed = self.view["restart_needed"]
            if restart_needed:
                text += f"; takes effect at restart: {', '.join(restart_needed)}"
            self._message(text, "ok")
            self.notify(text, title="settings", markup=False)
            return
        err = res.error
        if isinstance(err, ApiError):
            rows = {r.name_: r for r in self.query(SettingRow)}
            found, leftover = view.field_errors(err.message, err.param, rows)
            for name, message in found.items():
                rows[name].show_error(message)
            if found:
                first = rows[next(iter(found))]
                self.query_one("#form", VerticalScroll).scroll_to_widget(first, animate=False)
            summary = "; ".join(leftover) if leftover else "see the fields marked in red"
            self._message(f"not applied (HTTP {err.status}): {summary}", "error")
        else:
            self._message(f"not applied: {err.message if err else 'no answer'}", "error")

    def _message(self, text: str, kind: str) -> None:
        box = self.query_one("#form-message", Static)
        style = {"error": "bold red", "ok": "green", "info": "dim"}.get(kind, "")
        box.update(Text(text, style=style))


def _flatten(tree: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Setting names are a few levels deep: past 16, an answer nested hundreds deep would take the
    # stack (the JSON parser follows it to about a thousand) for no setting.
    if isinstance(tree, dict) and depth < 16:
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(_flatten(v, f"{prefix}{k}.", depth + 1))
            else:
                out[f"{prefix}{k}"] = v
    return out
