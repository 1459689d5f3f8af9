"""What a decision is and what the reactive rules remember between ticks: the `Rule` names, the
`Decision` every rule returns, and `ReactiveState` (rebuilt from the stored status after a Serve
controller restart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.signals import MetricWindow


class Rule(StrEnum):
    """Which rule made a decision (the name shown in logs, metrics and `autoscale status`)."""

    STEADY = "steady"
    BOUNDS = "bounds"
    FROM_ZERO = "from_zero"
    TO_ZERO = "to_zero"
    PANIC = "panic"
    PANIC_HOLD = "panic_hold"
    UTILIZATION_UP = "utilization_up"
    QUEUE_UP = "queue_up"
    LATENCY_UP = "latency_up"
    UTILIZATION_DOWN = "utilization_down"
    UP_COOLDOWN = "up_cooldown"
    DOWN_COOLDOWN = "down_cooldown"
    UP_PENDING = "up_pending"
    FORECAST_FLOOR = "forecast_floor"
    SCHEDULED_FLOOR = "scheduled_floor"


@dataclass(frozen=True)
class Decision:
    """One tick's answer: the replica count to apply, the rule and why, the inputs it saw.
    `applied` is False for a decision that is only recorded (forecast-only mode); such a
    decision rides along as `shadow` of the applied one."""

    target_replicas: int
    current_replicas: int
    rule: str
    reason: str
    at_s: float
    inputs: dict[str, Any] = field(default_factory=dict)
    applied: bool = True
    shadow: Decision | None = None

    @property
    def changed(self) -> bool:
        return self.target_replicas != self.current_replicas

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target_replicas": self.target_replicas,
            "current_replicas": self.current_replicas,
            "rule": self.rule,
            "reason": self.reason,
            "at_s": self.at_s,
            "inputs": self.inputs,
            "applied": self.applied,
        }
        if self.shadow is not None:
            data["shadow"] = self.shadow.to_dict()
        return data


@dataclass
class ReactiveState:
    """Everything the reactive rules remember between ticks. Small and plain so an adapter can
    persist it, or rebuild it after a controller restart (Serve's context gives the last
    scale-up and scale-down times; the windows refill within one stable window)."""

    demand: MetricWindow
    queued: MetricWindow
    arrivals: MetricWindow  # requests the arrivals alone keep in flight (see _Tick.arrivals)
    observing_since_s: float | None = None
    last_scale_up_s: float | None = None
    last_scale_down_s: float | None = None
    last_panic_s: float | None = None  # last tick at which the panic condition held
    idle_since_s: float | None = None
    running_before: int | None = None  # the previous tick's running replicas

    @classmethod
    def new(cls, config: AutoscalingConfig) -> ReactiveState:
        # One tick of slack so the oldest sample of a full stable window is still there.
        span = config.stable_window_s + config.decision_period_s
        return cls(
            demand=MetricWindow(span), queued=MetricWindow(span), arrivals=MetricWindow(span)
        )

    def note_target(self, current: int, target: int, now: float) -> None:
        """Records a scaling action; cooldowns count from here."""
        if target > current:
            self.last_scale_up_s = now
        elif target < current:
            self.last_scale_down_s = now

    def to_dict(self) -> dict[str, Any]:
        return {
            "span_s": self.demand.span_s,
            "demand": self.demand.to_list(),
            "queued": self.queued.to_list(),
            "arrivals": self.arrivals.to_list(),
            "observing_since_s": self.observing_since_s,
            "last_scale_up_s": self.last_scale_up_s,
            "last_scale_down_s": self.last_scale_down_s,
            "last_panic_s": self.last_panic_s,
            "idle_since_s": self.idle_since_s,
            "running_before": self.running_before,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReactiveState:
        span = float(data["span_s"])
        return cls(
            demand=MetricWindow.from_list(span, data.get("demand", [])),
            queued=MetricWindow.from_list(span, data.get("queued", [])),
            arrivals=MetricWindow.from_list(span, data.get("arrivals", [])),
            observing_since_s=data.get("observing_since_s"),
            last_scale_up_s=data.get("last_scale_up_s"),
            last_scale_down_s=data.get("last_scale_down_s"),
            last_panic_s=data.get("last_panic_s"),
            idle_since_s=data.get("idle_since_s"),
            running_before=data.get("running_before"),
        )
