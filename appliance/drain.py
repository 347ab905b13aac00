"""How fast each priority level's queue is observed to drain, for admission's wait prediction.

A batcher predicts a new item's wait from its compute rate: items ahead / items per second of
engine time. That is the wait only while the level gets the engine. A level that more urgent work
(of this model, or of another one through the compute arbiter) keeps from the engine drains far
slower, and its items would be admitted, sit, and time out. What the level actually gets is
observed here: the items taken from its queue into batches per second that the level had items
queued (Little's law: a queue of Q items draining at r per second holds a newcomer about Q / r).

The estimate covers the current window and the one before (one to two windows of history), so it
follows a change within about two windows, and costs a few additions per event, with no timer:
windows roll when an event or a question comes. A level that drains nothing is credited one item
per window of backlog (``(taken + 1) / busy``), so its prediction stays finite (an honest
Retry-After) and a queue short enough for its deadline is still admitted: a starved level keeps a
trickle of probes, and recovers as soon as its queue drains again.

Two guards keep it from refusing what would have been served. A level with nothing queued adds
nothing. And the prediction counts only for a level whose items have recently timed out in the
queue (within ``EVIDENCE_WINDOWS`` windows): a level served in bursts (its whole queue taken
whenever it gets the engine) drains only as fast as it fills, so ``queued / drain`` is the age of
its backlog, longest just before the engine comes back; without missed deadlines that is a stall,
not starvation, and refusing then would refuse exactly the requests about to be served.
"""

from __future__ import annotations

WINDOW_S = 1.0
EVIDENCE_WINDOWS = 5  # a level's last queue timeout counts as evidence of starvation this long


class DrainMeter:
    """Per level (1-based): items taken into batches per second of that level having items queued.

    The owner reports four events, each with its loop time: ``backlogged`` (the level's queue went
    from empty to non-empty), ``emptied`` (back to empty, whatever removed the last item),
    ``taken`` (items of the level went into a batch) and ``expired`` (an item of the level timed
    out in the queue)."""

    __slots__ = (
        "_busy",
        "_expired_at",
        "_prev_busy",
        "_prev_taken",
        "_since",
        "_start",
        "_taken",
        "evidence_s",
        "window_s",
    )

    def __init__(self, levels: int, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.evidence_s = EVIDENCE_WINDOWS * window_s
        self._expired_at = [float("-inf")] * levels  # when an item of the level last timed out
        self._start = float("-inf")  # the current window's start; the first event starts one
        self._taken = [0] * levels  # in the current window
        self._busy = [0.0] * levels  # closed backlog seconds in the current window
        self._prev_taken = [0] * levels  # the window before
        self._prev_busy = [0.0] * levels
        self._since: list[float | None] = [None] * levels  # backlogged since (None: empty)

    def backlogged(self, level: int, now: float) -> None:
        self._roll(now)
        self._since[level - 1] = now

    def emptied(self, level: int, now: float) -> None:
        self._roll(now)
        i = level - 1
        since = self._since[i]
        if since is not None:
            self._busy[i] += now - max(since, self._start)
            self._since[i] = None

    def taken(self, level: int, count: int, now: float) -> None:
        self._roll(now)
        self._taken[level - 1] += count

    def expired(self, level: int, now: float) -> None:
        self._expired_at[level - 1] = now

    def rate(self, level: int, now: float) -> float | None:
        """Items per second the level drains while backlogged, over the last one to two windows;
        None without any backlog observed (no evidence either way)."""
        self._roll(now)
        i = level - 1
        busy = self._prev_busy[i] + self._busy[i]
        since = self._since[i]
        if since is not None:
            busy += now - max(since, self._start)
        if busy <= 0.0:
            return None
        return (self._prev_taken[i] + self._taken[i] + 1) / busy

    def wait(self, ahead: list[int], now: float) -> float:
        """Seconds before a newcomer behind ``ahead[l - 1]`` items at each level ``l`` (its own and
        the more urgent ones) is taken, as observed: the longest of the levels' ``items / rate``
        (under strict priority it waits for each of those levels' queues to drain), over the
        levels that missed deadlines lately. 0 when nothing is ahead."""
        worst = 0.0
        expired_at, horizon = self._expired_at, now - self.evidence_s
        for i, n in enumerate(ahead):
            if n and expired_at[i] > horizon:
                r = self.rate(i + 1, now)
                if r is not None and n / r > worst:
                    worst = n / r
        return worst

    def rates(self, now: float) -> dict[int, float | None]:
        """Every level's ``rate`` (for snapshots)."""
        return {i + 1: self.rate(i + 1, now) for i in range(len(self._since))}

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
            self._prev_taken, self._prev_busy = self._taken, self._busy
        else:
            # No event for over a window: nothing was taken meanwhile and each level stayed as it
            # was, so the last window is known exactly (and older evidence is stale).
            self._prev_taken = [0] * n
            self._prev_busy = [0.0 if since is None else w for since in self._since]
        self._taken, self._busy = [0] * n, [0.0] * n
        self._start = now
