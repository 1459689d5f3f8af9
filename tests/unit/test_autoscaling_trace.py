"""Trace replay through the core: a compressed daily cycle, a sudden 10x burst, a slow ramp, on
a small queue model (replicas that take time to start, a fixed service time)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.decision import Decision
from app.autoscaling.history import InMemoryRateHistory
from app.autoscaling.policy import AutoscalingCore
from app.autoscaling.signals import Signals

CAP = 10  # concurrent requests per replica; a request takes 1 s, so 10 requests/s each
PER_REPLICA = CAP * 0.7  # requests/s one replica carries at the target utilisation


@dataclass
class Replay:
    """Per tick (1 s): arrivals join the queue, running replicas serve CAP each, the core
    decides, new replicas run `start_s` later, removed ones go at once."""

    core: AutoscalingCore
    start_s: float
    low: int = 1
    high: int = 60
    current: int = 1
    running: int = 1
    backlog: float = 0.0
    starts: list[float] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)  # queued requests per tick
    targets: list[int] = field(default_factory=list)

    def run(self, rate: Callable[[int], float], ticks: int) -> None:
        state = self.core.new_state()
        state.replica_start_s = self.start_s
        history, minute_count = InMemoryRateHistory(), 0.0
        for now in range(ticks):
            self._start_due(now)
            arrivals = rate(now)
            in_system = self.backlog + arrivals
            queued = max(0.0, in_system - self.running * CAP)
            p50 = 1000.0 if in_system else None
            signals = Signals(now, self.running, in_system, queued, CAP, p50_latency_ms=p50)
            decision = self.core.decide(signals, now, self.current, self.low, self.high, state)
            self._apply(decision.target_replicas, now)
            self.backlog = queued
            self.decisions.append(decision)
            self.waiting.append(queued)
            self.targets.append(self.current)
            minute_count += arrivals
            if now % 60 == 59:  # what the recorder does once a minute
                history.append("m", "r", now // 60, round(minute_count))
                minute_count = 0.0
                self.core.refresh_from_history(state, history, "m", "r", now + 1)

    def _start_due(self, now: float) -> None:
        self.running += sum(1 for s in self.starts if s <= now)
        self.starts = [s for s in self.starts if s > now]

    def _apply(self, target: int, now: float) -> None:
        if target > self.current:
            self.starts += [now + self.start_s] * (target - self.current)
        else:
            drop = self.current - target
            pending = min(drop, len(self.starts))
            self.starts = self.starts[: len(self.starts) - pending]
            self.running -= drop - pending
        self.current = target

    def violation_s(self, since: int = 0) -> int:
        """Seconds in which requests waited for a free replica (the SLO at risk)."""
        return sum(1 for q in self.waiting[since:] if q > 0)

    def replica_hours(self, since: int = 0) -> float:
        return sum(self.targets[since:]) / 3600


def core(**overrides: Any) -> AutoscalingCore:
    return AutoscalingCore(AutoscalingConfig.model_validate(overrides))


def need(rate: float) -> int:
    return math.ceil(rate / PER_REPLICA)


def test_a_sudden_10x_burst_is_answered_within_two_decision_periods() -> None:
    replay = Replay(core(predictive={"enabled": False}), start_s=5, current=3, running=3)
    replay.run(lambda t: 20.0 if t < 300 else 200.0, 900)
    assert replay.targets[299] == 3
    assert max(replay.targets[300:302]) >= need(200) == 29
    # The backlog of the start-up is not chased to max_replicas: a few over, then no more.
    assert max(replay.targets[300:]) <= 36
    assert replay.violation_s(300) <= 15 and replay.violation_s(330) == 0
    assert next(d.rule for d in replay.decisions[300:] if d.changed) == "panic"


def test_a_slow_ramp_is_followed_step_by_step_without_scaling_down() -> None:
    replay = Replay(core(predictive={"enabled": False}), start_s=10, current=2, running=2)
    ramp = lambda t: 10 + 0.05 * t  # noqa: E731  10 -> 130 requests/s over 40 minutes
    replay.run(ramp, 2400)
    changes = [d for d in replay.decisions if d.changed]
    assert all(d.target_replicas > d.current_replicas for d in changes)
    assert {d.rule for d in changes} == {"utilization_up"}
    assert replay.violation_s() == 0
    # Utilisation stays under 1.1 x target (plus the panic window's lag), and the replicas
    # never run ahead of what the target utilisation needs.
    assert max(ramp(t) / (replay.targets[t] * CAP) for t in range(2400)) < 0.78
    assert all(replay.targets[t] <= need(ramp(t)) for t in range(2400))
    assert replay.targets[-1] == 18


DAY = 1200  # a compressed "day" of 20 minutes


def daily(t: int) -> float:
    """Quiet night, a 4-minute morning ramp to 12x, a plateau, an evening decline."""
    x = t % DAY
    if x < 360:
        return 10.0
    if x < 600:
        return 10.0 + (x - 360) / 240 * 110
    if x < 840:
        return 120.0
    if x < 960:
        return 120.0 - (x - 840) / 120 * 110
    return 10.0


def test_a_daily_cycle_is_met_ahead_by_the_forecast() -> None:
    cfg = {"stable_window_s": 60, "downscale_cooldown_s": 20, "max_step_down": 5}
    predictive = {"season_s": DAY, "min_history_s": 3 * DAY, "lead_time_s": 120}
    reactive = Replay(core(**cfg, predictive={**predictive, "enabled": False}), start_s=60)
    forecast = Replay(core(**cfg, predictive=predictive), start_s=60)
    for replay in (reactive, forecast):
        replay.run(daily, 6 * DAY)
    last_day = 5 * DAY
    # Reactive alone lags the morning ramp by the replicas' start time.
    assert reactive.violation_s(last_day) >= 60
    # Ahead of the ramp with the forecast: at most a third of the violations, no more replicas.
    assert forecast.violation_s(last_day) <= reactive.violation_s(last_day) / 3
    assert forecast.replica_hours(last_day) <= 1.1 * reactive.replica_hours(last_day)
    rules = {d.rule for d in forecast.decisions[last_day:] if d.changed}
    assert "forecast_floor" in rules
    # The floor is up before the ramp starts (minute 6 of the day), lead time 120 s ahead.
    assert forecast.targets[last_day + 359] >= need(daily(last_day + 450)) > 2 * need(10)
