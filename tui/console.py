"""The console application: polling, connection state, actions and their confirmations."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.notifications import SeverityLevel
from textual.reactive import reactive
from textual.screen import Screen
from textual.timer import Timer

from tui import view
from tui.client import AdminClient, Disconnected, Result, Unauthorized
from tui.commands import ConsoleCommands
from tui.confirm import ConfirmScreen
from tui.dashboard import DashboardScreen
from tui.state import CONNECTED, CONNECTING, DISCONNECTED, ERROR, UNAUTHORIZED, Snapshot
from tui.tuning import TuningScreen

RATE_KEYS = Binding.Group("rate", compact=True)
INTERVALS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# verb -> (question, what it does); "{m}" is the model, or "every model" for a purge of all.
ACTIONS: dict[str, tuple[str, str]] = {
    "breaker:open": (
        "Force the circuit breaker of {m} open?",
        "Requests are answered from the cache or refused with 503 until the breaker is closed.",
    ),
    "breaker:close": ("Close the circuit breaker of {m}?", "Traffic reaches the engine again."),
    "breaker:reset": (
        "Reset the circuit breaker of {m}?",
        "It closes and forgets the failures in its window.",
    ),
    "breaker:disable": (
        "Disable the circuit breaker of {m}?",
        "It will never trip until it is reset; failures reach clients directly.",
    ),
    "model:load": ("Load {m}?", "Builds the engine session now (seconds; uses memory)."),
    "model:unload": ("Unload {m}?", "Frees its memory; the next request loads it again (cold start)."),
    "cache:purge": (
        "Purge the response cache of {m}?",
        "Cached answers are deleted; later requests recompute them.",
    ),
}
# verb -> what the console says while it runs: a load may take minutes before its answer.
RUNNING: dict[str, str] = {
    "breaker:open": "opening the breaker of {m}",
    "breaker:close": "closing the breaker of {m}",
    "breaker:reset": "resetting the breaker of {m}",
    "breaker:disable": "disabling the breaker of {m}",
    "model:load": "loading {m}",
    "model:unload": "unloading {m}",
    "cache:purge": "purging the cache of {m}",
}


class ConsoleApp(App[None]):
    """The operator console for one appliance server, driven only through its admin API."""

    TITLE = "appliance console"
    CSS_PATH = "console.tcss"
    COMMANDS: ClassVar = App.COMMANDS | {ConsoleCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("t", "tuning", "Tuning"),
        Binding("r", "refresh", "Refresh"),
        Binding("p", "pause", "Pause"),
        Binding("plus,equals_sign", "faster", "Refresh faster", group=RATE_KEYS),
        Binding("minus", "slower", "Refresh slower", group=RATE_KEYS),
        Binding("question_mark", "help", "Keys", show=False),
    ]

    snapshot: reactive[Snapshot] = reactive(Snapshot, always_update=True)
    interval: reactive[float] = reactive(1.0)
    paused: reactive[bool] = reactive(False)

    def __init__(self, client: AdminClient, *, read_only: bool = False, interval: float = 1.0) -> None:
        super().__init__()
        self.client = client
        self.read_only = read_only
        self.history = view.History()
        # Breaker states the actions answered with, for servers whose stats carry no breakers.
        self.breaker_seen: dict[str, str] = {}
        self.polls = 0
        self.skipped_ticks = 0
        self._in_flight = False
        # Actions sent and not answered yet, (verb, model) -> when: the same one is not sent twice.
        self._pending_actions: dict[tuple[str, str | None], float] = {}
        self._timer: Timer | None = None
        self.set_reactive(ConsoleApp.interval, max(0.05, float(interval)))
        if read_only:
            self.sub_title = "read-only"

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Plain text unless asked otherwise: messages carry model names (folder names) and the
        server's error messages, and read as markup a "[/]" in one crashed the console."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def get_default_screen(self) -> Screen[Any]:
        return DashboardScreen()

    def on_mount(self) -> None:
        self.install_screen(TuningScreen(), name="tuning")
        self._timer = self.set_interval(self.interval, self._tick)
        self._tick()

    async def on_unmount(self) -> None:
        await self.client.close()

    # -- polling ---------------------------------------------------------------------------------

    def watch_interval(self, interval: float) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = self.set_interval(interval, self._tick)

    def _tick(self) -> None:
        if not self.paused:
            self.poll_now()

    def poll_now(self) -> None:
        if self._in_flight:
            # A slow server gets no second request on top of the first: skip this tick.
            self.skipped_ticks += 1
            return
        self._in_flight = True
        self.run_worker(self._poll(), group="poll", exit_on_error=False)

    async def _poll(self) -> None:
        try:
            res = await self.client.stats()
            prev = self.snapshot
            try:
                self._take(res)
            except Exception as exc:
                # The worker does not exit the app on error: without this the status bar would
                # go on saying "connected" over the last numbers it could draw, forever.
                self.log.error("could not take the server's stats", exc)
                self.snapshot = Snapshot(
                    stats=prev.stats,
                    status=ERROR,
                    error=f"cannot show the server's stats: {type(exc).__name__}: {exc}",
                    failures=prev.failures + 1,
                )
        finally:
            self._in_flight = False

    def _take(self, res: Result[dict[str, Any]]) -> None:
        prev = self.snapshot
        self.polls += 1
        if res.value is not None:
            stats = view.clean_stats(res.value)
            if view.restarted(prev.stats, stats):
                # A new server process: its breakers and rolling windows started from scratch.
                self.history.clear()
                self.breaker_seen.clear()
                self.notify("the server restarted", title="reconnected", severity="warning")
            elif prev.status not in (CONNECTED, CONNECTING):
                self.notify(f"connected to {self.client.address}", title="reconnected")
            self.history.record(stats)
            self.snapshot = Snapshot(stats=stats, status=CONNECTED)
            return
        err = res.error
        status = (
            DISCONNECTED
            if isinstance(err, Disconnected)
            else UNAUTHORIZED
            if isinstance(err, Unauthorized)
            else ERROR
        )
        self.snapshot = Snapshot(
            stats=prev.stats,
            status=status,
            error=err.message if err else "no answer",
            failures=prev.failures + 1,
        )

    # -- key actions -----------------------------------------------------------------------------

    def action_refresh(self) -> None:
        # An explicit refresh polls even while paused.
        self.poll_now()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.notify("polling paused" if self.paused else "polling resumed", timeout=2)

    def action_faster(self) -> None:
        self.interval = max((i for i in INTERVALS if i < self.interval), default=self.interval)

    def action_slower(self) -> None:
        self.interval = min((i for i in INTERVALS if i > self.interval), default=self.interval)

    def action_help(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_dashboard(self) -> None:
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def action_tuning(self, model: str | None = None) -> None:
        tuning = self.get_screen("tuning")
        assert isinstance(tuning, TuningScreen)
        tuning.select_scope(model)
        if self.screen is not tuning:
            self.push_screen(tuning)

    # -- server-changing actions -----------------------------------------------------------------

    def ask(self, verb: str, model: str | None) -> None:
        """Confirm, then run one server-changing action; refused outright in read-only mode."""
        if self.read_only:
            self.notify("read-only console: actions are disabled", severity="warning")
            return
        if self._still_running(verb, model):
            return
        question, detail = ACTIONS[verb]
        target = model if model is not None else "every model"

        def answered(yes: bool | None) -> None:
            # Checked again: two confirmations of the same action may have been open at once.
            if yes and not self._still_running(verb, model):
                self._pending_actions[(verb, model)] = time.monotonic()
                self.run_worker(self._perform(verb, model), group="actions", exit_on_error=False)

        self.push_screen(ConfirmScreen(question.format(m=target), detail), answered)

    def _still_running(self, verb: str, model: str | None) -> bool:
        """Say so, and refuse, when the same action is still waiting for its answer."""
        started = self._pending_actions.get((verb, model))
        if started is None:
            return False
        doing = RUNNING[verb].format(m=model or "every model")
        self.notify(
            f"already {doing} (for {time.monotonic() - started:.0f} s): not sent again",
            severity="warning",
        )
        return True

    async def _perform(self, verb: str, model: str | None) -> None:
        try:
            self.notify(RUNNING[verb].format(m=model or "every model") + "…")
            await self._send(verb, model)
        finally:
            self._pending_actions.pop((verb, model), None)

    async def _send(self, verb: str, model: str | None) -> None:
        client = self.client
        kind, _, what = verb.partition(":")
        call: Callable[[], Awaitable[Result[dict[str, Any]]]]
        if kind == "breaker" and model is not None:
            call = lambda: client.breaker(model, what)  # noqa: E731
        elif verb == "model:load" and model is not None:
            call = lambda: client.load_model(model)  # noqa: E731
        elif verb == "model:unload" and model is not None:
            call = lambda: client.unload_model(model)  # noqa: E731
        elif verb == "cache:purge":
            call = lambda: client.purge_cache(model)  # noqa: E731
        else:
            raise ValueError(verb)
        res = await call()
        target = model or "every model"
        if res.error is not None:
            self.notify(res.error.message, title=f"{verb} {target} failed", severity="error", timeout=8)
            return
        value = res.value or {}
        if kind == "breaker" and model is not None and "state" in value:
            self.breaker_seen[model] = str(value["state"])
            text = f"breaker of {model}: {str(value['state']).replace('_', ' ')}"
        elif kind == "model":
            text = f"{model}: {value.get('state', 'done')}"
        else:
            text = f"purged {value.get('purged', 0)} cached responses of {target}"
        self.notify(text, title="done")
        self.action_refresh()
