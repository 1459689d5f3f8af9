"""Signals validation and the metric window's stable and panic averages."""

from __future__ import annotations

import math

import pytest

from app.autoscaling.signals import MetricWindow, Signals


def test_window_averages_over_the_stable_and_the_panic_window() -> None:
    window = MetricWindow(span_s=61)
    for t in range(60):
        window.add(t, 10.0 if t < 54 else 70.0)
    assert window.average(59, 60) == pytest.approx((54 * 10 + 6 * 70) / 60)
    assert window.average(59, 6) == 70.0
    assert window.peak(59, 60) == 70.0
    assert window.latest() == 70.0


def test_window_forgets_samples_older_than_its_span() -> None:
    window = MetricWindow(span_s=10)
    for t in range(25):
        window.add(t, float(t))
    assert len(window) == 10 and window.oldest_time() == 15
    assert window.average(24, 100) == pytest.approx(sum(range(15, 25)) / 10)


def test_window_empty_span_is_none_and_nan_is_ignored() -> None:
    window = MetricWindow(span_s=10)
    assert window.average(5, 5) is None and window.latest() is None
    window.add(1, math.nan)
    assert len(window) == 0
    window.add(1, 3.0)
    assert window.average(20, 5) is None  # nothing in (15, 20]


def test_window_refuses_time_going_backwards() -> None:
    window = MetricWindow(span_s=10)
    window.add(5, 1.0)
    with pytest.raises(ValueError, match="backwards"):
        window.add(4, 1.0)


def test_window_round_trips_through_a_list() -> None:
    window = MetricWindow(span_s=10)
    for t in range(5):
        window.add(t, t * 2.0)
    again = MetricWindow.from_list(10, window.to_list())
    assert again.to_list() == window.to_list()


def test_signals_validate_counts_and_omit_absent_metrics() -> None:
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        Signals(0, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        Signals(0, -1, 0, 0, 4)
    signals = Signals(1.0, 2, 5, 1, 8, p95_latency_ms=120.0)
    assert signals.as_dict() == {
        "timestamp_s": 1.0,
        "running_replicas": 2,
        "total_requests": 5,
        "queued_requests": 1,
        "max_ongoing_requests": 8,
        "p95_latency_ms": 120.0,
    }


def test_demand_counts_full_kv_caches_as_full_replicas() -> None:
    plain = Signals(0.0, 2, 3, 0, 8)
    assert plain.demand == 3
    memory_bound = Signals(0.0, 2, 3, 0, 8, kv_cache_utilization=0.75)
    assert memory_bound.demand == pytest.approx(0.75 * 2 * 8)
    assert Signals(0.0, 2, 15, 0, 8, kv_cache_utilization=0.1).demand == 15
