"""Specification of the observed drain of priority levels (``appliance.drain``), on a fake clock:
the meter is pure arithmetic over the events its owner reports, each with its time."""

from __future__ import annotations

import pytest

from appliance.drain import EVIDENCE_WINDOWS, DrainMeter


def test_no_backlog_is_no_evidence_and_predicts_no_wait() -> None:
    meter = DrainMeter(2, window_s=1.0)
    assert meter.rate(1, 0.0) is None and meter.wait([0, 0], 0.0) == 0.0
    # Items that come and go within the same instant leave no backlog time either.
    meter.backlogged(1, 5.0)
    meter.taken(1, 1, 5.0)
    meter.emptied(1, 5.0)
    assert meter.rate(1, 5.0) is None
    assert meter.wait([0, 0], 5.5) == 0.0  # nothing queued: whatever the history, no wait added


def test_a_level_served_as_fast_as_it_fills_drains_at_its_rate() -> None:
    meter = DrainMeter(1, window_s=1.0)
    meter.backlogged(1, 0.0)
    for k in range(1, 100):  # 100 items/s for ~1 s, the queue never empty
        meter.taken(1, 1, k / 100)
    rate = meter.rate(1, 1.0)
    assert rate is not None and 99 <= rate <= 101
    assert meter.wait([10], 1.0) == 0.0  # no deadline missed: no evidence it is starved
    meter.expired(1, 1.0)
    assert meter.wait([10], 1.0) == pytest.approx(10 / rate)


def test_a_starved_level_predicts_a_long_but_finite_wait() -> None:
    """Nothing taken for 1.9 s of backlog: credited one item per 1.9 s (the history covers one to
    two windows), so 5 queued items predict about 9.5 s, not infinity."""
    meter = DrainMeter(2, window_s=1.0)
    meter.backlogged(2, 0.0)
    meter.expired(2, 0.5)
    meter.rate(2, 1.0)  # the first window closes here
    assert meter.rate(2, 1.9) == pytest.approx(1 / 1.9)
    assert meter.wait([0, 5], 1.9) == pytest.approx(9.5)
    assert meter.wait([0, 5], 2.0) == pytest.approx(5.0)  # the older window just went
    # A newcomer at level 3 would wait at least for level 2's backlog; one at level 1 not at all.
    meter3 = DrainMeter(3, window_s=1.0)
    meter3.backlogged(2, 0.0)
    meter3.expired(2, 0.5)
    assert meter3.wait([0, 5, 0], 0.9) == pytest.approx(4.5)
    assert meter3.wait([0], 0.9) == 0.0


def test_starvation_evidence_is_forgotten_within_two_windows_of_draining() -> None:
    meter = DrainMeter(1, window_s=1.0)
    meter.backlogged(1, 0.0)
    meter.expired(1, 1.5)
    meter.rate(1, 1.0)
    assert meter.wait([5], 1.99) > 9  # starved
    # The engine comes back: the backlog is taken at 50 items/s for a second.
    for k in range(1, 51):
        meter.taken(1, 1, 2.0 + k / 50)
    rate = meter.rate(1, 3.0)
    assert rate is not None and rate > 20  # still mixed with the starved window
    for k in range(1, 51):
        meter.taken(1, 1, 3.0 + k / 50)
    rate = meter.rate(1, 4.0)
    assert rate is not None and rate == pytest.approx(51, rel=0.05)  # the starved window is gone


def test_a_quiet_gap_keeps_exactly_what_it_knows() -> None:
    """No event for several windows: a level that stayed backlogged was starved throughout (no
    item was taken, or an event would have said so); one that stayed empty has no evidence."""
    meter = DrainMeter(2, window_s=1.0)
    meter.backlogged(1, 0.0)
    for k in range(1, 10):
        meter.taken(1, 1, k / 10)
    meter.emptied(1, 0.95)
    meter.backlogged(2, 0.5)
    assert meter.rate(1, 10.0) is None  # old evidence dropped, empty since
    assert meter.rate(2, 10.0) == pytest.approx(1 / 1.0)  # the last full window, starved


def test_the_backlog_is_counted_only_while_the_level_has_items() -> None:
    meter = DrainMeter(1, window_s=10.0)
    meter.backlogged(1, 0.0)
    meter.taken(1, 3, 0.1)
    meter.emptied(1, 0.1)
    # 0.9 s empty: not backlog time (an idle level is not a slow one)
    meter.backlogged(1, 1.0)
    meter.taken(1, 3, 1.1)
    meter.emptied(1, 1.1)
    assert meter.rate(1, 5.0) == pytest.approx((6 + 1) / 0.2)


def test_a_stall_without_missed_deadlines_is_not_starvation() -> None:
    """A level served in bursts drains only as fast as it fills: its backlog's ``queued / rate``
    grows until the engine comes back. Without an item timed out, that predicts nothing; a timeout
    counts as evidence for ``EVIDENCE_WINDOWS`` windows."""
    meter = DrainMeter(1, window_s=1.0)
    meter.backlogged(1, 0.0)
    meter.rate(1, 1.0)
    assert meter.rate(1, 1.9) == pytest.approx(1 / 1.9)  # as slow as a starved level ...
    assert meter.wait([20], 1.9) == 0.0  # ... but nothing missed its deadline
    meter.expired(1, 1.9)
    assert meter.wait([20], 1.9) == pytest.approx(20 * 1.9)
    assert meter.wait([20], 1.9 + EVIDENCE_WINDOWS - 0.01) > 0
    assert meter.wait([20], 1.9 + EVIDENCE_WINDOWS) == 0.0  # evidence too old
