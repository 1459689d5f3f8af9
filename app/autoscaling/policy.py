"""The decision core: reactive rules under the predictive and scheduled floors, one `decide` a
tick, all memory in one `PolicyState` an adapter can persist and rebuild."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.decision import Decision, ReactiveRules, ReactiveState, Rule
from app.autoscaling.floors import MINUTE_S, FloorResult, Forecast, PredictiveFloor, ScheduledFloors
from app.autoscaling.forecast import Forecaster
from app.autoscaling.history import RateHistory
from app.autoscaling.signals import Signals

# Lead time until the adapter has measured how long a replica takes to start.
DEFAULT_LEAD_TIME_S = 120.0
# The back-test is the costly part of a forecast; its error changes slowly.
ERROR_REFRESH_S = 900.0
# Weight of a new p50 in the service-time average the predictive floor divides by.
SERVICE_TIME_EWMA = 0.1
# Days of history a forecast reads: the forecaster's days plus one for the back-test.
HISTORY_SEASONS = 4


@dataclass
class PolicyState:
    """Everything the core remembers: the reactive rules' windows and timestamps, the latest
    forecast, the measured service time and replica start time."""

    reactive: ReactiveState
    forecast: Forecast | None = None
    service_time_ms: float | None = None
    replica_start_s: float | None = None  # measured by the adapter; the default lead time

    def to_dict(self) -> dict[str, Any]:
        return {
            "reactive": self.reactive.to_dict(),
            "forecast": None if self.forecast is None else self.forecast.to_dict(),
            "service_time_ms": self.service_time_ms,
            "replica_start_s": self.replica_start_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyState:
        forecast = data.get("forecast")
        return cls(
            reactive=ReactiveState.from_dict(data["reactive"]),
            forecast=None if forecast is None else Forecast.from_dict(forecast),
            service_time_ms=data.get("service_time_ms"),
            replica_start_s=data.get("replica_start_s"),
        )


class AutoscalingCore:
    """Reactive rules first; then the floors may only raise the target. A forecast that may
    not bind yet (forecast-only mode, short history, failed confidence gate) is returned as
    the decision's `shadow`, recorded but not applied."""

    def __init__(self, config: AutoscalingConfig, forecaster: Forecaster | None = None) -> None:
        self.config = config
        self.reactive = ReactiveRules(config)
        self.predictive = PredictiveFloor(config.predictive, forecaster)
        self.scheduled = ScheduledFloors(config.schedules)

    def new_state(self) -> PolicyState:
        return PolicyState(reactive=self.reactive.new_state())

    def decide(
        self,
        signals: Signals,
        now: float,
        current: int,
        min_replicas: int,
        max_replicas: int,
        state: PolicyState,
    ) -> Decision:
        """One tick. `current` is the target last asked for (Serve's target_num_replicas);
        `signals.running_replicas` counts those already up. The bounds are inclusive."""
        self._observe_service_time(signals, state)
        service_s = None if state.service_time_ms is None else state.service_time_ms / 1000
        reactive = self.reactive.propose(
            signals, now, current, min_replicas, max_replicas, state.reactive, service_s=service_s
        )
        high = max(min_replicas, max_replicas)
        floors = [
            f for f in (self.scheduled.floor(now), self._forecast_floor(signals, now, state)) if f
        ]
        decision = reactive
        binding = [f for f in floors if f.applied]
        if binding:
            top = max(binding, key=lambda f: f.replicas)
            if min(top.replicas, high) > reactive.target_replicas:
                decision = self._raised(reactive, top, high)
        shadow = None
        for floor in floors:
            if not floor.applied and min(floor.replicas, high) > decision.target_replicas:
                shadow = replace(self._raised(reactive, floor, high), applied=False)
        state.reactive.note_target(current, decision.target_replicas, now)
        return replace(decision, shadow=shadow)

    def refresh_forecast(
        self, state: PolicyState, points: Sequence[tuple[int, float]], now: float
    ) -> Forecast | None:
        """A new forecast from (minute, count) history; call once a minute. The back-test
        error is carried over from the previous forecast for ERROR_REFRESH_S."""
        if not self.predictive.active:
            state.forecast = None
            return None
        previous = state.forecast
        tested = None if previous is None else previous.tested_at_s
        fresh_error = tested is None or now - tested >= ERROR_REFRESH_S
        forecast = self.predictive.make_forecast(points, now, with_error=fresh_error)
        if forecast is not None and previous is not None and not fresh_error:
            forecast = replace(forecast, error=previous.error, tested_at_s=tested)
        state.forecast = forecast
        return forecast

    def refresh_from_history(
        self, state: PolicyState, history: RateHistory, model: str, region: str, now: float
    ) -> Forecast | None:
        """`refresh_forecast` over the history a forecast needs, read from `history`."""
        cfg = self.config.predictive
        span_s = max(cfg.min_history_s, HISTORY_SEASONS * cfg.season_s)
        since = int((now - span_s) // MINUTE_S)
        return self.refresh_forecast(state, history.load(model, region, since), now)

    def lead_time_s(self, state: PolicyState) -> float:
        configured = self.config.predictive.lead_time_s
        if configured is not None:
            return configured
        return state.replica_start_s if state.replica_start_s is not None else DEFAULT_LEAD_TIME_S

    def _forecast_floor(
        self, signals: Signals, now: float, state: PolicyState
    ) -> FloorResult | None:
        service_s = None if state.service_time_ms is None else state.service_time_ms / 1000
        return self.predictive.floor(
            state.forecast,
            now,
            self.lead_time_s(state),
            service_s,
            signals.max_ongoing_requests,
            self.config.target_utilization,
        )

    @staticmethod
    def _observe_service_time(signals: Signals, state: PolicyState) -> None:
        p50 = signals.p50_latency_ms
        if p50 is None or not math.isfinite(p50) or p50 <= 0 or signals.total_requests <= 0:
            return  # an idle replica's latency window is empty or stale
        previous = state.service_time_ms
        state.service_time_ms = (
            p50 if previous is None else previous + SERVICE_TIME_EWMA * (p50 - previous)
        )

    @staticmethod
    def _raised(reactive: Decision, floor: FloorResult, high: int) -> Decision:
        target = min(floor.replicas, high)
        reason = f"{floor.reason}; reactive ({reactive.rule}): {reactive.reason}"
        return replace(
            reactive,
            target_replicas=target,
            rule=floor.rule,
            reason=reason,
            inputs={**reactive.inputs, **floor.inputs, "reactive_target": reactive.target_replicas},
        )


__all__ = ["AutoscalingCore", "Decision", "PolicyState", "Rule"]
