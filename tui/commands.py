"""The console's entries in Textual's command palette (ctrl+p): every action, per model."""

from __future__ import annotations

import asyncio
import heapq
import re
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content
from textual.markup import escape

from tui import view

if TYPE_CHECKING:
    from tui.console import ConsoleApp

Command = tuple[str, str, Callable[[], object]]


# Hits the palette lists at most. It built eight commands per model and listed them all as it
# opened (80,000 for 10,000 models, each a widget): now commands are made as they are searched,
# and only the best this many are listed.
PALETTE_HITS = 100
# Commands scored at most per search: Textual's matcher weighs every placement of the query in a
# title (up to 50 ms per thousand), and a short query fits most of 80,000. The first this many that fit
# are ranked; a longer query narrows them down to the one meant.
PALETTE_SCORED = 2000
# Titles looked at between two looks at the event loop: typing goes on during a search, and each
# key cancels the search it makes stale.
MATCHES_PER_YIELD = 500
# A title that starts with the query ranks above any fuzzy score (the shorter, the higher).
PREFIX_SCORE = 1e6


class ConsoleCommands(Provider):
    def _commands(self) -> Iterator[Command]:
        """Every command, made lazily: the app's own first, then each model's."""
        app = cast("ConsoleApp", self.app)
        models = [str(m) for m in view.models(app.snapshot.stats or {})]
        yield ("Dashboard", "Show the dashboard", app.action_dashboard)
        yield (
            "Tune server-wide defaults",
            "Open the tuning form for every model's defaults",
            app.action_tuning,
        )
        yield ("Refresh now", "Poll /admin/stats now", app.action_refresh)
        yield ("Pause or resume polling", "Stop or restart the refresh timer", app.action_pause)
        yield ("Refresh faster", "Shorten the refresh interval", app.action_faster)
        yield ("Refresh slower", "Lengthen the refresh interval", app.action_slower)
        if not app.read_only:
            yield (
                "Purge cache: all models",
                "Drop every cached response",
                partial(app.ask, "cache:purge", None),
            )
        for m in models:
            yield (f"Tune model {m}", f"Open the tuning form for {m}", partial(app.action_tuning, m))
            if app.read_only:
                continue
            for verb, what in (
                ("open", "force the breaker open: no requests reach the engine"),
                ("close", "close the breaker: traffic flows again"),
                ("reset", "close the breaker and clear its failure window"),
                ("disable", "stop the breaker from ever tripping"),
            ):
                yield (f"Breaker {verb}: {m}", what.capitalize(), partial(app.ask, f"breaker:{verb}", m))
            yield (f"Load model {m}", "Load the engine now", partial(app.ask, "model:load", m))
            yield (f"Unload model {m}", "Free the engine's memory", partial(app.ask, "model:unload", m))
            yield (
                f"Purge cache: {m}",
                "Drop this model's cached responses",
                partial(app.ask, "cache:purge", m),
            )

    # Titles and help name models, whose names are folder names: never read as markup (a "[/]"
    # in one crashed the palette, and "qwen[v2]" was shown as "qwen").

    async def discover(self) -> Hits:
        for title, help_text, callback in islice(self._commands(), PALETTE_HITS):
            yield DiscoveryHit(Content(title), callback, text=title, help=escape(help_text))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        candidate = _subsequence(query)
        # The best PALETTE_HITS so far, worst on top; (score, -order) never ties, so the
        # commands themselves are never compared.
        best: list[tuple[float, int, Command]] = []
        scored = 0
        wanted = query.lower().strip()
        for i, command in enumerate(self._commands()):
            title = command[0].lower()
            score = 0.0
            if wanted and title.startswith(wanted):
                # The title as typed, or its start: listed whatever comes before it, the shortest
                # (the exact one) first, above every fuzzy hit (the matcher's scores run to about
                # a hundred). The fuzzy cap below had hidden "Unload model m-9" among 10,000
                # models behind the 2,000 titles before it that merely contain its letters.
                score = PREFIX_SCORE - len(title)
            elif scored < PALETTE_SCORED and candidate(title):
                scored += 1
                score = matcher.match(command[0])
            if score > 0:
                (heapq.heappush if len(best) < PALETTE_HITS else heapq.heappushpop)(
                    best, (score, -i, command)
                )
            if i % MATCHES_PER_YIELD == MATCHES_PER_YIELD - 1:
                await asyncio.sleep(0)
        for score, _, (title, help_text, callback) in sorted(best, reverse=True):
            # The matcher's highlight reads its candidate as markup: only a plain title gets it.
            shown = Content(title) if "[" in title else matcher.highlight(title)
            yield Hit(score, shown, callback, text=title, help=escape(help_text))


def _subsequence(query: str) -> Callable[[str], object]:
    """A test a lower-cased title passes when the query's letters are in it in order: what
    Textual's fuzzy matcher needs before it scores, found by one regex instead of its search of
    every placement (most of 80,000 titles fail it; the matcher took seconds over them). Each
    letter matches its first place after the one before (``[^b]*b``): no backtracking."""
    letters = query.lower()
    if not letters:
        return lambda title: True
    pattern = re.escape(letters[0]) + "".join(f"[^{re.escape(c)}]*{re.escape(c)}" for c in letters[1:])
    return re.compile(pattern, re.DOTALL).search
