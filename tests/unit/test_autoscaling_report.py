"""app.autoscaling.report: the work figures a replica adds to its autoscaling report."""

from __future__ import annotations

import pytest

from app.autoscaling.report import ReplicaMetric, WorkRates, WorkTotals, replica_stats
from app.fleet.stats import PerfSnapshot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rates_cover_the_time_since_the_previous_report() -> None:
    clock = Clock()
    rates = WorkRates(max_batch_size=8, clock=clock)
    assert rates.advance(WorkTotals()) == {}  # the first report has no interval yet
    clock.now += 2.0
    figures = rates.advance(WorkTotals(batches=2, batched_requests=8, tokens=300, images=0))
    assert figures == {
        ReplicaMetric.TOKENS_PER_S: 150.0,
        ReplicaMetric.IMAGES_PER_S: 0.0,
        ReplicaMetric.BATCH_FILL: 0.5,  # 4 requests a batch of at most 8
    }
    clock.now += 4.0
    figures = rates.advance(WorkTotals(batches=2, batched_requests=8, tokens=300, images=6))
    # No batch since the last report: no fill figure rather than a stale one.
    assert figures == {ReplicaMetric.TOKENS_PER_S: 0.0, ReplicaMetric.IMAGES_PER_S: 1.5}


def test_a_report_at_the_same_instant_gives_no_rate() -> None:
    clock = Clock()
    rates = WorkRates(max_batch_size=1, clock=clock)
    rates.advance(WorkTotals())
    assert ReplicaMetric.TOKENS_PER_S not in rates.advance(WorkTotals(tokens=5))


def test_the_report_carries_the_work_figures_as_floats() -> None:
    idle = PerfSnapshot(None, None, None, 1.0, 0.0, 0, 0)
    stats = replica_stats(
        idle, 1, 4, {ReplicaMetric.TOKENS_PER_S: 12, ReplicaMetric.BATCH_FILL: float("nan")}
    )
    assert stats[ReplicaMetric.TOKENS_PER_S.value] == pytest.approx(12.0)
    assert isinstance(stats[ReplicaMetric.TOKENS_PER_S.value], float)
    assert ReplicaMetric.BATCH_FILL.value not in stats  # Serve rejects NaN
