"""Specification of the observed takes of priority levels (``appliance.drain``), on a fake clock:
the meter is pure arithmetic over the events its owner reports, each with its time."""

from __future__ import annotations

import pytest

from appliance.drain import EVIDENCE_WINDOWS, DrainMeter


def starved_meter(levels: int = 1, level: int = 1) -> DrainMeter:
    """``level`` backlogged from 0 s, never taken, an item timed out at 0.5 s."""
    meter = DrainMeter(levels, window_s=1.0)
    meter.backlogged(level, 0.0)
    meter.expired(level, 0.5)
    return meter


def test_no_backlog_is_no_evidence_and_predicts_no_wait() -> None:
    meter = DrainMeter(2, window_s=1.0)
    assert meter.rate(1, 0.0) is None and meter.wait([0, 0], 2, 8, 0.0) == 0.0
    # Items that come and go within the same instant leave no backlog time either.
    meter.backlogged(1, 5.0)
    meter.taken(1, 1, 5.0)
    meter.emptied(1, 5.0)
    assert meter.rate(1, 5.0) is None
    meter.expired(2, 5.0)
    assert meter.wait([0, 0], 2, 8, 5.5) == 0.0  # nothing queued: whatever the history, no wait added


def test_a_level_that_gets_the_engine_often_waits_one_gap_per_batch_ahead() -> None:
    meter = DrainMeter(1, window_s=1.0)
    meter.backlogged(1, 0.0)
    for k in range(1, 100):  # a batch of 4 every 10 ms for ~1 s, the queue never empty
        meter.taken(1, 4, k / 100)
    rate = meter.rate(1, 1.0)
    assert rate is not None and 390 <= rate <= 400
    assert meter.gap(1, 1.0) == pytest.approx(0.01, abs=0.001)
    assert meter.wait([10], 1, 4, 1.0) == 0.0  # no deadline missed: no evidence it is starved
    meter.expired(1, 1.0)
    assert meter.wait([10], 1, 4, 1.0) == pytest.approx(3 * 0.01, abs=0.003)  # 11 items: 3 batches


def test_a_starved_level_waits_as_long_as_it_has_not_been_taken() -> None:
    """Never taken: the gap grows with the backlog, past what the windows remember (one to two
    windows), so the prediction keeps up with the starvation; finite, for an honest Retry-After."""
    meter = starved_meter()
    assert meter.gap(1, 1.9) == pytest.approx(1.9)
    assert meter.gap(1, 7.0) == pytest.approx(7.0)
    meter.expired(1, 6.0)  # its items keep timing out
    assert meter.wait([5], 1, 8, 7.0) == pytest.approx(7.0)  # 6 items: one batch away
    assert meter.wait([20], 1, 8, 7.0) == pytest.approx(21.0)  # 21 items: three
    # The queue empties (timed out) and refills: still not taken since, the gap keeps counting.
    meter.emptied(1, 7.0)
    meter.backlogged(1, 8.0)
    assert meter.gap(1, 8.5) == pytest.approx(7.5)


def test_a_newcomer_waits_for_the_more_urgent_starved_levels_too() -> None:
    meter = starved_meter(levels=3, level=2)
    assert meter.wait([0, 5, 0], 3, 8, 2.0) == pytest.approx(2.0)  # level 2's queue, one batch
    assert meter.wait([0], 1, 8, 2.0) == 0.0  # level 1 does not wait for level 2


def test_a_burst_served_level_is_judged_by_its_gaps_not_by_its_queue_length() -> None:
    """Taken whole every 0.5 s: the queue grows between takes, the gap does not."""
    meter = DrainMeter(1, window_s=1.0)
    meter.backlogged(1, 0.0)
    meter.expired(1, 0.0)
    for k in range(1, 5):
        meter.taken(1, 30, k * 0.5)
        meter.emptied(1, k * 0.5)
        meter.backlogged(1, k * 0.5 + 0.01)
    early, late = meter.wait([1], 1, 32, 2.1), meter.wait([29], 1, 32, 2.1)
    assert 0.3 < early == late < 0.6


def test_the_first_take_after_starvation_ends_it() -> None:
    meter = starved_meter()
    assert meter.wait([5], 1, 8, 4.0) == pytest.approx(4.0)
    meter.taken(1, 6, 4.0)
    meter.emptied(1, 4.0)
    meter.backlogged(1, 4.1)
    # The windows still remember one take in ~1.1 s of backlog; the starved seconds are gone.
    assert meter.wait([1], 1, 8, 4.2) == pytest.approx(meter.gap(1, 4.2)) and meter.gap(1, 4.2) < 1.2


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
    assert meter.rate(2, 10.0) == pytest.approx(0.0)  # the last full window, nothing taken
    assert meter.gap(2, 10.0) == pytest.approx(9.5)


def test_the_backlog_is_counted_only_while_the_level_has_items() -> None:
    meter = DrainMeter(1, window_s=10.0)
    meter.backlogged(1, 0.0)
    meter.taken(1, 3, 0.1)
    meter.emptied(1, 0.1)
    # 0.9 s empty: not backlog time (an idle level is not a slow one)
    meter.backlogged(1, 1.0)
    meter.taken(1, 3, 1.1)
    meter.emptied(1, 1.1)
    assert meter.rate(1, 5.0) == pytest.approx(6 / 0.2)
    assert meter.gap(1, 5.0) == pytest.approx(0.2 / 2)


def test_a_stall_without_missed_deadlines_is_not_starvation() -> None:
    """Without an item timed out, a slow level predicts nothing; a timeout counts as evidence for
    ``EVIDENCE_WINDOWS`` windows."""
    meter = DrainMeter(1, window_s=1.0)
    meter.backlogged(1, 0.0)
    assert meter.gap(1, 1.9) == pytest.approx(1.9)  # as slow as a starved level ...
    assert meter.wait([20], 1, 32, 1.9) == 0.0  # ... but nothing missed its deadline
    meter.expired(1, 1.9)
    assert meter.wait([20], 1, 32, 1.9) == pytest.approx(1.9)
    assert meter.wait([20], 1, 32, 1.9 + EVIDENCE_WINDOWS - 0.01) > 0
    assert meter.wait([20], 1, 32, 1.9 + EVIDENCE_WINDOWS) == 0.0  # evidence too old
