"""Autoscaling decisions as Prometheus metrics (through ray.util.metrics, on the cluster's
metrics endpoint beside Ray's and Serve's own): what each model wants, has and why it changed.
Names, descriptions and tags come from the catalogue, app.observability.metrics."""

from __future__ import annotations

from typing import Any

from app.autoscaling.decision import Decision
from app.autoscaling.signals import Signals
from app.observability.metrics import (
    AUTOSCALING_DECISIONS,
    AUTOSCALING_RUNNING,
    AUTOSCALING_TAGS,
    AUTOSCALING_TARGET,
    AUTOSCALING_UTILIZATION,
)
from app.observability.recorder import create

TAGS = AUTOSCALING_TAGS


class AutoscalingMetrics:
    """`autoscaling_decisions` (a counter of target changes, by rule and direction) and the
    gauges `autoscaling_target_replicas`, `autoscaling_running_replicas` and
    `autoscaling_utilization`, tagged by model and region."""

    def __init__(self, model: str, region: str) -> None:
        self._tags = {"model": model, "region": region}
        self._metrics: dict[str, Any] = {}
        try:
            import ray

            if not ray.is_initialized():  # creating a metric would start a local Ray
                return
            self._metrics = {
                "decisions": create(AUTOSCALING_DECISIONS),
                "target": create(AUTOSCALING_TARGET),
                "running": create(AUTOSCALING_RUNNING),
                "utilization": create(AUTOSCALING_UTILIZATION),
            }
        except Exception:  # metrics need a connected worker; scaling must not depend on them
            self._metrics = {}

    def observe(self, decision: Decision, signals: Signals) -> None:
        if not self._metrics:
            return
        self._metrics["target"].set(decision.target_replicas, self._tags)
        self._metrics["running"].set(signals.running_replicas, self._tags)
        slots = max(1, signals.running_replicas) * max(1, signals.max_ongoing_requests)
        self._metrics["utilization"].set(signals.total_requests / slots, self._tags)
        if decision.changed:
            direction = "up" if decision.target_replicas > decision.current_replicas else "down"
            tags = self._tags | {"rule": str(decision.rule), "direction": direction}
            self._metrics["decisions"].inc(1, tags)
