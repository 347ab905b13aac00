"""The console's entries in Textual's command palette (ctrl+p): every action, per model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content
from textual.markup import escape

from tui import view

if TYPE_CHECKING:
    from tui.console import ConsoleApp

Command = tuple[str, str, Callable[[], object]]


class ConsoleCommands(Provider):
    def _commands(self) -> list[Command]:
        app = cast("ConsoleApp", self.app)
        models = [str(m) for m in view.models(app.snapshot.stats or {})]
        cmds: list[Command] = [
            ("Dashboard", "Show the dashboard", app.action_dashboard),
            (
                "Tune server-wide defaults",
                "Open the tuning form for every model's defaults",
                app.action_tuning,
            ),
            ("Refresh now", "Poll /admin/stats now", app.action_refresh),
            ("Pause or resume polling", "Stop or restart the refresh timer", app.action_pause),
            ("Refresh faster", "Shorten the refresh interval", app.action_faster),
            ("Refresh slower", "Lengthen the refresh interval", app.action_slower),
        ]
        cmds += [
            (f"Tune model {m}", f"Open the tuning form for {m}", partial(app.action_tuning, m))
            for m in models
        ]
        if app.read_only:
            return cmds
        for m in models:
            for verb, what in (
                ("open", "force the breaker open: no requests reach the engine"),
                ("close", "close the breaker: traffic flows again"),
                ("reset", "close the breaker and clear its failure window"),
                ("disable", "stop the breaker from ever tripping"),
            ):
                cmds.append(
                    (f"Breaker {verb}: {m}", what.capitalize(), partial(app.ask, f"breaker:{verb}", m))
                )
            cmds.append((f"Load model {m}", "Load the engine now", partial(app.ask, "model:load", m)))
            cmds.append(
                (f"Unload model {m}", "Free the engine's memory", partial(app.ask, "model:unload", m))
            )
            cmds.append(
                (
                    f"Purge cache: {m}",
                    "Drop this model's cached responses",
                    partial(app.ask, "cache:purge", m),
                )
            )
        cmds.append(
            ("Purge cache: all models", "Drop every cached response", partial(app.ask, "cache:purge", None))
        )
        return cmds

    # Titles and help name models, whose names are folder names: never read as markup (a "[/]"
    # in one crashed the palette, and "qwen[v2]" was shown as "qwen").

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands():
            yield DiscoveryHit(Content(title), callback, text=title, help=escape(help_text))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands():
            score = matcher.match(title)
            if score > 0:
                # The matcher's highlight reads its candidate as markup: only a plain title gets it.
                shown = Content(title) if "[" in title else matcher.highlight(title)
                yield Hit(score, shown, callback, text=title, help=escape(help_text))
