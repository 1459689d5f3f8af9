"""Replica floors: the predictive floor (forecast rate, lead time, buffer, confidence gate) and the
scheduled floors (cron windows). A floor only ever raises the target; it never scales in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.autoscaling.config import Predictive, ScheduledFloor
from app.autoscaling.cron import Cron
from app.autoscaling.forecast import Forecaster, SeasonalNaiveTrend, backtest_error

MINUTE_S = 60.0


@dataclass(frozen=True)
class Forecast:
    """Per-minute request counts predicted from `start_minute` (epoch minutes) on."""

    start_minute: int
    counts: tuple[float, ...]
    error: float | None  # back-tested WAPE; None when the history is too short to test
    history_s: float  # span of the history behind it
    forecaster: str
    made_at_s: float
    tested_at_s: float | None = None  # when `error` was back-tested

    def peak_per_min(self, start_s: float, end_s: float) -> float | None:
        """Highest predicted count of the minutes that overlap [start_s, end_s]; None when the
        span lies outside the forecast (stale or not yet made)."""
        first = int(start_s // MINUTE_S) - self.start_minute
        last = int(end_s // MINUTE_S) - self.start_minute
        first, last = max(first, 0), min(last, len(self.counts) - 1)
        if first > last:
            return None
        return max(self.counts[first : last + 1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_minute": self.start_minute,
            "counts": list(self.counts),
            "error": self.error,
            "history_s": self.history_s,
            "forecaster": self.forecaster,
            "made_at_s": self.made_at_s,
            "tested_at_s": self.tested_at_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Forecast:
        return cls(**{**data, "counts": tuple(data["counts"])})


@dataclass(frozen=True)
class FloorResult:
    """A floor and whether it binds: `applied` False means recorded only (forecast-only mode,
    too little history, or a forecast that failed its confidence gate)."""

    replicas: int
    applied: bool
    rule: str
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)


def dense_counts(
    points: Sequence[tuple[int, float]], start_minute: int, end_minute: int
) -> np.ndarray:
    """Counts for every minute in [start_minute, end_minute), 0 where the history has none: the
    recorder writes every minute, so a missing one had no traffic or no controller; either
    way the back-test sees the gap and the confidence gate accounts for it."""
    counts = np.zeros(max(0, end_minute - start_minute))
    for minute, count in points:
        if start_minute <= minute < end_minute:
            counts[minute - start_minute] = count
    return counts


class PredictiveFloor:
    """Turns a rate history into a `Forecast`, and a forecast into a replica floor."""

    def __init__(self, config: Predictive, forecaster: Forecaster | None = None) -> None:
        self.config = config
        self.season = max(1, round(config.season_s / MINUTE_S))
        self.forecaster = forecaster or SeasonalNaiveTrend(season=self.season)

    @property
    def active(self) -> bool:
        return self.config.enabled and self.config.mode != "off"

    def make_forecast(
        self, points: Sequence[tuple[int, float]], now_s: float, with_error: bool = True
    ) -> Forecast | None:
        """Forecast from the history up to the last complete minute. The back-test is the
        costly part; a caller refreshing every minute may pass with_error=False and keep the
        previous error."""
        if not points:
            return None
        now_minute = int(now_s // MINUTE_S)
        start = min(m for m, _ in points)
        history = dense_counts(points, start, now_minute)
        if len(history) == 0:
            return None
        steps = math.ceil(self.config.horizon_s / MINUTE_S) + 1
        predicted = self.forecaster.forecast(history, steps)
        error = None
        if with_error:
            # An hour ahead, or half a cycle when tests compress the day into minutes.
            horizon = min(steps, 60, max(1, self.season // 2))
            error = backtest_error(history, self.forecaster, horizon, season=self.season)
        return Forecast(
            start_minute=now_minute,
            counts=tuple(round(float(c), 3) for c in predicted),
            error=None if error is None else round(error, 4),
            history_s=len(history) * MINUTE_S,
            forecaster=self.forecaster.name,
            made_at_s=now_s,
            tested_at_s=now_s if with_error else None,
        )

    def floor(
        self,
        forecast: Forecast | None,
        now_s: float,
        lead_s: float,
        service_time_s: float | None,
        max_ongoing_requests: int,
        target_utilization: float,
    ) -> FloorResult | None:
        """Replicas the forecast load needs from now until `lead_s` ahead (a replica started
        now is ready then), by Little's law: concurrency = rate x service time, divided by what
        one replica takes at the target utilisation, plus the buffer. None: no floor at all."""
        if not self.active or forecast is None:
            return None
        peak = forecast.peak_per_min(now_s, now_s + lead_s)
        if peak is None or service_time_s is None:
            return None
        concurrency = peak / MINUTE_S * service_time_s
        per_replica = max_ongoing_requests * target_utilization
        replicas = math.ceil(concurrency / per_replica * (1 + self.config.buffer) - 1e-9)
        inputs = {
            "forecast_per_min": round(peak, 3),
            "lead_s": lead_s,
            "service_time_ms": round(service_time_s * 1000, 3),
            "forecast_error": forecast.error,
            "history_s": forecast.history_s,
        }
        applied, why = self._gate(forecast)
        reason = (
            f"forecast {peak:.1f}/min within {lead_s:.0f}s x {service_time_s * 1000:.0f} ms "
            f"needs {replicas} replicas with {self.config.buffer:.0%} buffer{why}"
        )
        return FloorResult(replicas, applied, "forecast_floor", reason, inputs)

    def _gate(self, forecast: Forecast) -> tuple[bool, str]:
        """Whether a forecast may bind, and why not."""
        cfg = self.config
        if cfg.mode == "forecast_only":
            return False, " (forecast_only: recorded, not applied)"
        if forecast.history_s < cfg.min_history_s:
            return False, (
                f" (history {forecast.history_s:.0f}s < min_history_s {cfg.min_history_s:.0f}s:"
                " recorded, not applied)"
            )
        if forecast.error is None or forecast.error > cfg.max_error:
            shown = "untested" if forecast.error is None else f"{forecast.error:.3f}"
            return False, f" (back-test error {shown} > max_error {cfg.max_error}: not applied)"
        return True, ""


class ScheduledFloors:
    """Cron windows with a replica floor (KEDA's cron scaler): while a window is open the
    target stays at least its min_replicas."""

    def __init__(self, schedules: Sequence[ScheduledFloor]) -> None:
        self.schedules = [(s, Cron.parse(s.cron)) for s in schedules]

    def floor(self, now_s: float) -> FloorResult | None:
        best: FloorResult | None = None
        for schedule, cron in self.schedules:
            opened = cron.last_fire(now_s, schedule.duration_s)
            if opened is None or (best is not None and best.replicas >= schedule.min_replicas):
                continue
            reason = (
                f"schedule {schedule.cron!r} open since {opened:.0f} for "
                f"{schedule.duration_s:.0f}s keeps at least {schedule.min_replicas}"
            )
            inputs = {"cron": schedule.cron, "opened_at_s": opened}
            best = FloorResult(schedule.min_replicas, True, "scheduled_floor", reason, inputs)
        return best
