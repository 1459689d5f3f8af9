"""Routing decisions as Prometheus metrics (through ray.util.metrics, so they appear on the
cluster's metrics endpoint with every other Ray and Serve metric). Names, descriptions and tags
come from the catalogue, app.observability.metrics."""

from __future__ import annotations

from typing import Any

from app.fleet.scoring import Decision
from app.observability.metrics import (
    ROUTING_DECISIONS,
    ROUTING_PANICS,
    ROUTING_RETRIES,
    ROUTING_SPILLOVERS,
    MetricDef,
)
from app.observability.recorder import create

COUNTERS: dict[str, MetricDef] = {
    "decisions": ROUTING_DECISIONS,
    "spillovers": ROUTING_SPILLOVERS,
    "retries": ROUTING_RETRIES,
    "panics": ROUTING_PANICS,
}


class RoutingMetrics:
    """Counters of one router's decisions (`fleet_routing_<name>`), tagged by model, strategy
    and chosen region."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._counters: dict[str, Any] = {}
        try:
            import ray

            if not ray.is_initialized():  # creating a metric would start a local Ray
                return
            self._counters = {name: create(definition) for name, definition in COUNTERS.items()}
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
