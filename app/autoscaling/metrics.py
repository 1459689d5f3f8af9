"""Autoscaling decisions as Prometheus metrics (through ray.util.metrics, on the cluster's
metrics endpoint beside Ray's and Serve's own): what each model wants, has and why it changed."""

from __future__ import annotations

from typing import Any

from app.autoscaling.decision import Decision
from app.autoscaling.signals import Signals

TAGS = ("model", "region")


class AutoscalingMetrics:
    """`autoscaling_decisions` (a counter of target changes, by rule and direction) and the
    gauges `autoscaling_target_replicas`, `autoscaling_running_replicas` and
    `autoscaling_utilization`, tagged by model and region."""

    def __init__(self, model: str, region: str) -> None:
        self._tags = {"model": model, "region": region}
        self._metrics: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():  # creating a metric would start a local Ray
                return
            self._metrics = {
                "decisions": metrics.Counter(
                    "autoscaling_decisions",
                    description="Replica target changes, by the rule that made them.",
                    tag_keys=(*TAGS, "rule", "direction"),
                ),
                "target": metrics.Gauge(
                    "autoscaling_target_replicas",
                    description="Replicas the policy asks for.",
                    tag_keys=TAGS,
                ),
                "running": metrics.Gauge(
                    "autoscaling_running_replicas",
                    description="Replicas running when the policy decided.",
                    tag_keys=TAGS,
                ),
                "utilization": metrics.Gauge(
                    "autoscaling_utilization",
                    description="Requests per replica slot (ongoing + queued) / capacity.",
                    tag_keys=TAGS,
                ),
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
