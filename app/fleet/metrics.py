"""Routing decisions as Prometheus metrics (through ray.util.metrics, so they appear on the
cluster's metrics endpoint with every other Ray and Serve metric)."""

from __future__ import annotations

from typing import Any

from app.fleet.scoring import Decision


class RoutingMetrics:
    """Counters of one router's decisions, tagged by model, strategy and chosen region."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._decisions: Any = None
        self._spillovers: Any = None
        self._retries: Any = None
        self._panics: Any = None
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():  # creating a metric would start a local Ray
                raise RuntimeError("not connected to Ray")

            tags = ("model", "strategy", "region")
            self._decisions = metrics.Counter(
                "fleet_routing_decisions",
                description="Requests routed, by strategy and the chosen replica's region.",
                tag_keys=tags,
            )
            self._spillovers = metrics.Counter(
                "fleet_routing_spillovers",
                description="Requests sent outside the client's nearest region (it was full).",
                tag_keys=tags,
            )
            self._retries = metrics.Counter(
                "fleet_routing_retries",
                description="Failover attempts routed after a failed try.",
                tag_keys=tags,
            )
            self._panics = metrics.Counter(
                "fleet_routing_panics",
                description="Decisions made ignoring health because no replica was healthy.",
                tag_keys=tags,
            )
        except Exception:  # metrics need a connected worker; routing must not depend on them
            self._decisions = None

    def decision(self, decision: Decision, retry: bool = False) -> None:
        if self._decisions is None or decision.chosen is None:
            return
        tags = {
            "model": self._model,
            "strategy": decision.strategy.value,
            "region": decision.chosen.region,
        }
        self._decisions.inc(1, tags)
        if decision.spilled:
            self._spillovers.inc(1, tags)
        if retry:
            self._retries.inc(1, tags)
        if decision.panic:
            self._panics.inc(1, tags)
