"""How often each priority level's queue is observed to get the engine, for admission's wait
prediction.

A batcher predicts a new item's wait from its compute rate: items ahead / items per second of
engine time. That is the wait only while the level gets the engine. A level that more urgent work
(of this model, or of another one through the compute arbiter) keeps from the engine is served far
more rarely, and its items would be admitted, sit, and time out. What the level actually gets is
observed here, as the gap between the batches that take its items: the seconds it had items
queued per take, over the current window and the one before, and the seconds it has had items
queued since its last take (not windowed: that one grows for as long as the level is starved). A
newcomer behind ``n`` items needs ``ceil(n / batch size)`` takes, each one such gap away.

Why takes, not items per second (Little's law's ``queued / drain``): a level served in bursts (its
whole queue taken whenever it gets the engine) drains only as fast as it fills, so ``queued /
drain`` is the age of its backlog, longest just before the engine comes back: it would refuse the
very requests about to be served, and admit those that will wait the longest. The gap between
takes does not depend on how full the queue is.

Guards, so that nothing servable is refused for long: a level with nothing queued adds nothing (a
starved level so keeps one probe in its queue at a time, and recovers at its first take: the
gap since the last take starts over); and the prediction counts only for a level whose items
have recently timed out in the queue (within ``EVIDENCE_WINDOWS`` windows): without a missed
deadline, a slow level is stalled, not starved. Costs a few additions per event, with no timer:
windows roll when an event or a question comes.
"""

from __future__ import annotations

import math

WINDOW_S = 1.0
EVIDENCE_WINDOWS = 5  # a level's last queue timeout counts as evidence of starvation this long


class DrainMeter:
    """Per level (1-based): takes, items taken and seconds with items queued, over one to two
    windows; seconds with items queued since the last take; when an item last timed out.

    The owner reports four events, each with its loop time: ``backlogged`` (the level's queue went
    from empty to non-empty), ``emptied`` (back to empty, whatever removed the last item),
    ``taken`` (items of the level went into a batch) and ``expired`` (an item of the level timed
    out in the queue)."""

    __slots__ = (
        "_busy",
        "_expired_at",
        "_items",
        "_last_take",
        "_prev_busy",
        "_prev_items",
        "_prev_takes",
        "_since",
        "_start",
        "_takes",
        "_unserved",
        "evidence_s",
        "window_s",
    )

    def __init__(self, levels: int, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.evidence_s = EVIDENCE_WINDOWS * window_s
        self._start = float("-inf")  # the current window's start; the first event starts one
        self._takes = [0] * levels  # in the current window
        self._items = [0] * levels
        self._busy = [0.0] * levels  # closed backlog seconds in the current window
        self._prev_takes = [0] * levels  # the window before
        self._prev_items = [0] * levels
        self._prev_busy = [0.0] * levels
        self._since: list[float | None] = [None] * levels  # backlogged since (None: empty)
        self._last_take = [float("-inf")] * levels
        self._unserved = [0.0] * levels  # closed backlog seconds since the last take
        self._expired_at = [float("-inf")] * levels  # when an item of the level last timed out

    def backlogged(self, level: int, now: float) -> None:
        self._roll(now)
        self._since[level - 1] = now

    def emptied(self, level: int, now: float) -> None:
        self._roll(now)
        i = level - 1
        since = self._since[i]
        if since is not None:
            self._busy[i] += now - max(since, self._start)
            self._unserved[i] += now - max(since, self._last_take[i])
            self._since[i] = None

    def taken(self, level: int, count: int, now: float) -> None:
        """``count`` items of ``level`` went into one batch."""
        self._roll(now)
        i = level - 1
        self._takes[i] += 1
        self._items[i] += count
        self._last_take[i] = now
        self._unserved[i] = 0.0

    def expired(self, level: int, now: float) -> None:
        self._expired_at[level - 1] = now

    def rate(self, level: int, now: float) -> float | None:
        """Items per second the level drained while it had items queued, over the last one to two
        windows; None without any backlog observed (for snapshots: far below the compute rate,
        the level is starved)."""
        busy = self._backlog(level - 1, now)
        if busy <= 0.0:
            return None
        i = level - 1
        return (self._prev_items[i] + self._items[i]) / busy

    def gap(self, level: int, now: float) -> float:
        """Seconds the level waits for a take, as observed: the longer of the mean backlog
        seconds per take over the windows (a level never taken is credited one take) and the
        backlog seconds since its last take."""
        i = level - 1
        busy = self._backlog(i, now)
        mean = busy / max(1, self._prev_takes[i] + self._takes[i])
        unserved = self._unserved[i]
        since = self._since[i]
        if since is not None:
            unserved += now - max(since, self._last_take[i])
        return max(mean, unserved)

    def wait(self, ahead: list[int], level: int, batch: int, now: float) -> float:
        """Seconds before a newcomer at ``level``, behind ``ahead[l - 1]`` items at each level
        ``l`` up to its own, is taken, as observed: for each of those levels that missed deadlines
        lately, the takes needed to clear its items ahead (``batch`` items a take), one ``gap``
        each, and the longest of those (under strict priority it waits for each such queue).
        0 when nothing is ahead."""
        worst = 0.0
        expired_at, horizon = self._expired_at, now - self.evidence_s
        for i, n in enumerate(ahead):
            if n and expired_at[i] > horizon:
                takes = math.ceil((n + (i + 1 == level)) / batch)
                worst = max(worst, takes * self.gap(i + 1, now))
        return worst

    def rates(self, now: float) -> dict[int, float | None]:
        """Every level's ``rate`` (for snapshots)."""
        return {i + 1: self.rate(i + 1, now) for i in range(len(self._since))}

    def _backlog(self, i: int, now: float) -> float:
        self._roll(now)
        busy = self._prev_busy[i] + self._busy[i]
        since = self._since[i]
        if since is not None:
            busy += now - max(since, self._start)
        return busy

    def _roll(self, now: float) -> None:
        start, w = self._start, self.window_s
        if now < start + w:
            return
        n = len(self._since)
        if now < start + 2 * w:
            # Close the current window (now - start long) and make it the previous one.
            for i, since in enumerate(self._since):
                if since is not None:
                    self._busy[i] += now - max(since, start)
            self._prev_takes, self._prev_items, self._prev_busy = self._takes, self._items, self._busy
        else:
            # No event for over a window: nothing was taken meanwhile and each level stayed as it
            # was, so the last window is known exactly (and older evidence is stale).
            self._prev_takes, self._prev_items = [0] * n, [0] * n
            self._prev_busy = [0.0 if since is None else w for since in self._since]
        self._takes, self._items, self._busy = [0] * n, [0] * n, [0.0] * n
        self._start = now
