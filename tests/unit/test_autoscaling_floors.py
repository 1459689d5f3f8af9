"""The predictive floor (formula, lead time, confidence gate, modes) and scheduled floors."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest

from app.autoscaling.config import Predictive, ScheduledFloor
from app.autoscaling.floors import (
    FloorResult,
    Forecast,
    PredictiveFloor,
    ScheduledFloors,
    dense_counts,
)

NOW = 6000.0  # minute 100
DAY_S = 86_400.0


def forecast(
    counts: list[float], error: float | None = 0.1, history_s: float = 2 * DAY_S
) -> Forecast:
    return Forecast(100, tuple(counts), error, history_s, "test", NOW, NOW)


def floor_of(
    fc: Forecast | None, lead_s: float = 60, service_s: float | None = 1.0, **cfg: Any
) -> FloorResult | None:
    cfg = {"buffer": 0.2, **cfg}  # the figures here are worked out with a 20 % buffer
    return PredictiveFloor(Predictive(**cfg)).floor(fc, NOW, lead_s, service_s, 10, 0.7)


@pytest.mark.parametrize(
    ("per_min", "service_s", "buffer", "replicas"),
    [
        (4200, 1.0, 0.2, 12),  # 70/s x 1 s = 70 in flight / 7 per replica = 10, +20 %
        (4200, 1.0, 0.0, 10),
        (4200, 0.5, 0.2, 6),
        (60, 1.0, 0.2, 1),  # one request a second still needs a replica
        (0, 1.0, 0.2, 0),
    ],
)
def test_floor_is_forecast_concurrency_over_replica_capacity_plus_buffer(
    per_min: float, service_s: float, buffer: float, replicas: int
) -> None:
    result = floor_of(forecast([per_min] * 61), service_s=service_s, buffer=buffer)
    assert result is not None and (result.replicas, result.applied) == (replicas, True)
    assert result.inputs["forecast_per_min"] == per_min


@pytest.mark.parametrize(("lead_s", "replicas"), [(60, 2), (119, 2), (180, 18)])
def test_floor_covers_the_load_until_the_lead_time(lead_s: float, replicas: int) -> None:
    # 600/min for three minutes, then 6000/min from minute 103 (three minutes from now).
    result = floor_of(forecast([600, 600, 600, 6000, 6000]), lead_s=lead_s)
    assert result is not None and result.replicas == replicas


@pytest.mark.parametrize(
    ("cfg", "history_s", "error", "applied", "why"),
    [
        ({}, 2 * DAY_S, 0.10, True, ""),
        ({}, 2 * DAY_S, 0.30, False, "max_error"),  # fails the confidence gate
        ({"max_error": 0.35}, 2 * DAY_S, 0.30, True, ""),
        ({}, 2 * DAY_S, None, False, "untested"),
        ({}, DAY_S / 2, 0.10, False, "min_history_s"),  # a new model: forecast-only
        ({"min_history_s": 3600}, DAY_S / 2, 0.10, True, ""),
        ({"mode": "forecast_only"}, 2 * DAY_S, 0.10, False, "forecast_only"),
    ],
)
def test_confidence_gate_history_and_mode_decide_whether_the_floor_binds(
    cfg: dict[str, Any], history_s: float, error: float | None, applied: bool, why: str
) -> None:
    result = floor_of(forecast([4200] * 5, error=error, history_s=history_s), **cfg)
    assert result is not None and result.replicas == 12 and result.applied is applied
    assert why in result.reason


@pytest.mark.parametrize(
    ("fc", "service_s", "cfg"),
    [
        (forecast([4200] * 5), 1.0, {"mode": "off"}),
        (forecast([4200] * 5), 1.0, {"enabled": False}),
        (None, 1.0, {}),
        (forecast([4200] * 5), None, {}),  # no latency measured yet
        (Forecast(50, (4200.0,) * 5, 0.1, 2 * DAY_S, "test", 3000, 3000), 1.0, {}),  # stale
    ],
)
def test_no_floor_without_an_active_fresh_forecast_and_a_service_time(
    fc: Forecast | None, service_s: float | None, cfg: dict[str, Any]
) -> None:
    assert floor_of(fc, service_s=service_s, **cfg) is None


def test_make_forecast_from_a_compressed_cycle_history() -> None:
    season = 20  # minutes: a 20-minute "day"
    pattern = [100.0] * 6 + [1000.0] * 10 + [300.0] * 4
    points = [(m, pattern[m % season]) for m in range(4 * season)]
    predictor = PredictiveFloor(Predictive(season_s=season * 60, horizon_s=600))
    result = predictor.make_forecast(points, now_s=4 * season * 60 + 30)
    assert result is not None
    assert result.start_minute == 4 * season and result.history_s == 4 * season * 60
    assert list(result.counts[:8]) == pattern[:8]
    assert result.error == 0.0 and result.forecaster == "seasonal_naive_trend"
    assert len(result.counts) == 11


def test_dense_counts_fill_missing_minutes_with_zero() -> None:
    counts = dense_counts([(10, 5), (12, 7), (20, 1)], 10, 14)
    assert np.array_equal(counts, [5, 0, 7, 0])


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("when", "replicas"),
    [
        ("2026-03-04 08:59", None),
        ("2026-03-04 09:15", 4),
        ("2026-03-04 09:45", 6),  # both open: the higher floor
        ("2026-03-04 10:15", 4),
        ("2026-03-04 11:00", None),
        ("2026-03-07 09:15", None),  # a Saturday
    ],
)
def test_scheduled_floors_hold_while_their_window_is_open(when: str, replicas: int | None) -> None:
    floors = ScheduledFloors(
        [
            ScheduledFloor(cron="0 9 * * 1-5", duration_s=7200, min_replicas=4),
            ScheduledFloor(cron="30 9 * * 1-5", duration_s=1800, min_replicas=6),
        ]
    )
    result = floors.floor(at(when))
    assert (None if result is None else result.replicas) == replicas
    if result is not None:
        assert result.applied and result.rule == "scheduled_floor"
