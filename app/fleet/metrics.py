"""Routing decisions as Prometheus metrics (through ray.util.metrics, so they appear on the
cluster's metrics endpoint with every other Ray and Serve metric)."""

from __future__ import annotations

from typing import Any

from app.fleet.scoring import Decision

COUNTERS = {
    "decisions": "Requests routed, by strategy and the chosen replica's region.",
    "spillovers": "Requests sent outside the client's nearest region (it was full).",
    "retries": "Failover attempts routed after a failed try.",
    "panics": "Decisions made ignoring health because no replica was healthy.",
}


class RoutingMetrics:
    """Counters of one router's decisions (`fleet_routing_<name>`), tagged by model, strategy
    and chosen region."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._counters: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():  # creating a metric would start a local Ray
                return
            self._counters = {
                name: metrics.Counter(
                    f"fleet_routing_{name}",
                    description=description,
                    tag_keys=("model", "strategy", "region"),
                )
                for name, description in COUNTERS.items()
            }
        except Exception:  # metrics need a connected worker; routing must not depend on them
            self._counters = {}

    def decision(self, decision: Decision, retry: bool = False) -> None:
        if not self._counters or decision.chosen is None:
            return
        tags = {
            "model": self._model,
            "strategy": decision.strategy.value,
            "region": decision.chosen.region,
        }
        for name, happened in (
            ("decisions", True),
            ("spillovers", decision.spilled),
            ("retries", retry),
            ("panics", decision.panic),
        ):
            if happened:
                self._counters[name].inc(1, tags)
