"""The core: reactive rules under the predictive and scheduled floors, and its state."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.decision import Decision, Rule
from app.autoscaling.floors import Forecast
from app.autoscaling.history import InMemoryRateHistory
from app.autoscaling.policy import (
    DEFAULT_LEAD_TIME_S,
    ERROR_REFRESH_S,
    AutoscalingCore,
    PolicyState,
)
from app.autoscaling.signals import Signals

CAP = 10
NOW = 6000.0  # minute 100
FAST = {
    "stable_window_s": 10,
    "panic_window_s": 2,
    "upscale_cooldown_s": 5,
    "downscale_cooldown_s": 0,
    "predictive": {"buffer": 0.2},  # the figures below are worked out with a 20 % buffer
}


def core(**overrides: Any) -> AutoscalingCore:
    predictive = {**FAST["predictive"], **overrides.pop("predictive", {})}  # type: ignore[dict-item]
    config = {**FAST, **overrides, "predictive": predictive}
    return AutoscalingCore(AutoscalingConfig.model_validate(config))


def with_forecast(c: AutoscalingCore, per_min: float, error: float = 0.1) -> PolicyState:
    """A state whose forecast says `per_min` for the next hour, at 1 s per request."""
    state = c.new_state()
    state.forecast = Forecast(100, (per_min,) * 61, error, 2 * 86_400, "test", NOW, NOW)
    state.service_time_ms = 1000.0
    return state


def run(
    c: AutoscalingCore, state: PolicyState, current: int, total: float, low: int = 1, high: int = 50
) -> Decision:
    """A stable window of the same load, then the decision at NOW."""
    for t in range(int(NOW) - 10, int(NOW)):
        c.reactive.propose(
            Signals(t, current, total, 0, CAP), t, current, low, high, state.reactive
        )
    return c.decide(Signals(NOW, current, total, 0, CAP), NOW, current, low, high, state)


def test_forecast_floor_raises_the_target_ahead_of_load() -> None:
    c = core()
    state = with_forecast(c, 4200)  # needs 12 with the 20 % buffer
    decision = run(c, state, current=2, total=7)
    assert (decision.target_replicas, decision.rule, decision.applied) == (
        12,
        "forecast_floor",
        True,
    )
    assert decision.inputs["reactive_target"] == 2 and decision.shadow is None
    assert state.reactive.last_scale_up_s == NOW


@pytest.mark.parametrize(
    ("current", "total", "per_min", "target", "rule"),
    [
        (20, 140, 4200, 20, Rule.STEADY),  # load needs 20: a floor of 12 does not cut it
        (20, 140, 0, 20, Rule.STEADY),  # the forecast falls to nothing: still 20
        (13, 0, 4200, 12, "forecast_floor"),  # the reactive step down (to 7) stops at it
        (12, 0, 4200, 12, "forecast_floor"),  # ... and stops there
    ],
)
def test_a_forecast_never_scales_in(
    current: int, total: float, per_min: float, target: int, rule: str
) -> None:
    c = core()
    state = with_forecast(c, per_min)
    decision = run(c, state, current=current, total=total)
    assert (decision.target_replicas, decision.rule) == (target, rule), decision.reason
    if decision.target_replicas == current:
        assert state.reactive.last_scale_down_s is None


@pytest.mark.parametrize(
    ("predictive", "error", "why"),
    [
        ({"mode": "forecast_only"}, 0.1, "forecast_only"),
        ({}, 0.4, "max_error"),  # the confidence gate
        ({"min_history_s": 3 * 86_400}, 0.1, "min_history_s"),  # a new model
    ],
)
def test_a_forecast_that_may_not_bind_is_recorded_not_applied(
    predictive: dict[str, Any], error: float, why: str
) -> None:
    c = core(predictive=predictive)
    state = with_forecast(c, 4200, error=error)
    decision = run(c, state, current=2, total=7)
    assert (decision.target_replicas, decision.rule, decision.applied) == (2, "steady", True)
    assert decision.shadow is not None
    assert (decision.shadow.target_replicas, decision.shadow.rule) == (12, "forecast_floor")
    assert decision.shadow.applied is False and why in decision.shadow.reason
    assert state.reactive.last_scale_up_s is None
    assert json.loads(json.dumps(decision.to_dict()))["shadow"]["applied"] is False


def test_scheduled_floor_through_the_core_and_the_max_bound() -> None:
    nine = dt.datetime(2026, 3, 4, 9, 10, tzinfo=dt.UTC).timestamp()
    c = core(schedules=[{"cron": "0 9 * * *", "duration_s": 3600, "min_replicas": 6}])
    state = c.new_state()
    args = (Signals(nine, 2, 7, 0, CAP), nine)
    assert c.decide(*args, 2, 1, 50, state).target_replicas == 6
    capped = c.decide(*args, 2, 1, 4, c.new_state())
    assert (capped.target_replicas, capped.rule) == (4, "scheduled_floor")
    later = nine + 3600
    assert (
        c.decide(Signals(later, 2, 7, 0, CAP), later, 2, 1, 50, c.new_state()).target_replicas == 2
    )


def test_fixed_replica_count_stays_fixed_under_floors() -> None:
    c = core(schedules=[{"cron": "* * * * *", "duration_s": 60, "min_replicas": 9}])
    state = with_forecast(c, 42_000)
    assert run(c, state, current=3, total=1000, low=3, high=3).target_replicas == 3


def test_policy_state_survives_a_json_round_trip() -> None:
    c = core()
    state = with_forecast(c, 4200)
    run(c, state, current=2, total=7)
    restored = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    args = (Signals(NOW + 1, 12, 7, 0, CAP), NOW + 1, 12, 1, 50)
    assert c.decide(*args, state) == c.decide(*args, restored)
    assert restored.forecast == state.forecast


def test_service_time_is_a_moving_average_of_busy_p50() -> None:
    c = core()
    state = c.new_state()
    for t, total, p50 in [(0, 5, 100.0), (1, 5, 200.0), (2, 0, 900.0), (3, 5, None)]:
        c.decide(Signals(t, 1, total, 0, CAP, p50_latency_ms=p50), t, 1, 1, 5, state)
    assert state.service_time_ms == pytest.approx(110.0)  # 100, then +10 % of (200 - 100)


def test_lead_time_is_configured_or_measured_or_a_default() -> None:
    c = core()
    state = c.new_state()
    assert c.lead_time_s(state) == DEFAULT_LEAD_TIME_S
    state.replica_start_s = 45.0
    assert c.lead_time_s(state) == 45.0
    assert core(predictive={"lead_time_s": 300}).lead_time_s(state) == 300


def test_refresh_from_history_and_the_error_refresh_interval() -> None:
    season = 20
    c = core(predictive={"season_s": season * 60, "min_history_s": 3 * season * 60})
    history = InMemoryRateHistory()
    for minute in range(5 * season):
        history.append("m", "eu", minute, 4200 if minute % season >= 10 else 600)
    state = c.new_state()
    now = 5 * season * 60.0
    forecast = c.refresh_from_history(state, history, "m", "eu", now)
    assert forecast is not None and forecast.start_minute == 5 * season
    assert forecast.counts[:12] == (600.0,) * 10 + (4200.0,) * 2
    assert forecast.error == 0.0 and forecast.tested_at_s == now
    later = c.refresh_from_history(state, history, "m", "eu", now + 60)
    assert later is not None and later.tested_at_s == now and later.made_at_s == now + 60
    fresh = c.refresh_from_history(state, history, "m", "eu", now + ERROR_REFRESH_S)
    assert fresh is not None and fresh.tested_at_s == now + ERROR_REFRESH_S
    assert core(predictive={"enabled": False}).refresh_forecast(state, [(1, 1)], now) is None
