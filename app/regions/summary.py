"""A region's compact summary for its peers: per model, how many replicas are healthy, their
capacity and load and latency; whether the region is drained. Pure: the router actor builds it
from its records, gateways exchange it as JSON and rank regions from it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model in one region, aggregated over its replicas."""

    replicas: int = 0
    healthy: int = 0
    capacity: int = 0  # sum of healthy replicas' max_ongoing_requests
    ongoing: int = 0
    latency_ms: float | None = None  # mean of the healthy replicas' moving averages
    success_rate: float = 1.0

    @property
    def utilization(self) -> float:
        return self.ongoing / self.capacity if self.capacity else 1.0

    def serviceable(self) -> bool:
        return self.healthy > 0 and self.capacity > 0


@dataclass(frozen=True, slots=True)
class RegionSummary:
    region: str
    drained: bool = False
    models: dict[str, ModelLoad] = field(default_factory=dict)
    generated_at: float = 0.0  # wall clock of the producer, for display only

    def load_of(self, model: str) -> ModelLoad | None:
        return self.models.get(model)

    def to_json(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "drained": self.drained,
            "generated_at": self.generated_at,
            "models": {name: asdict(load) for name, load in self.models.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RegionSummary:
        """Parse a peer's summary; a malformed one raises ValueError (the peer counts as
        failing, never as healthy)."""
        try:
            models = {
                str(name): ModelLoad(
                    replicas=int(m["replicas"]),
                    healthy=int(m["healthy"]),
                    capacity=int(m["capacity"]),
                    ongoing=int(m["ongoing"]),
                    latency_ms=None if m.get("latency_ms") is None else float(m["latency_ms"]),
                    success_rate=float(m.get("success_rate", 1.0)),
                )
                for name, m in dict(data["models"]).items()
            }
            return cls(
                region=str(data["region"]),
                drained=bool(data["drained"]),
                models=models,
                generated_at=float(data.get("generated_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed region summary: {exc!r}") from exc


def summarize(
    region: str, replicas: Iterable[Mapping[str, Any]], *, drained: bool, now: float | None = None
) -> RegionSummary:
    """Aggregate replica records (the router actor's fleet view rows: model, healthy, drained,
    capacity, ongoing, performance) into one region summary. Replicas on drained nodes or
    weighted out count as present but not healthy."""
    rows: dict[str, list[Mapping[str, Any]]] = {}
    for r in replicas:
        rows.setdefault(str(r["model"]), []).append(r)
    return RegionSummary(
        region=region,
        drained=drained,
        models={model: _aggregate(group) for model, group in rows.items()},
        generated_at=time.time() if now is None else now,
    )


def _aggregate(group: list[Mapping[str, Any]]) -> ModelLoad:
    serving = [
        r for r in group if r["healthy"] and not r.get("drained") and r.get("weight", 1.0) > 0
    ]
    latencies = [
        float(r["performance"]["latency_ms"])
        for r in serving
        if r.get("performance", {}).get("latency_ms") is not None
    ]
    rates = [float(r.get("performance", {}).get("success_rate", 1.0)) for r in serving]
    return ModelLoad(
        replicas=len(group),
        healthy=len(serving),
        capacity=sum(int(r["capacity"]) for r in serving),
        ongoing=sum(int(r["ongoing"] or 0) for r in serving),
        latency_ms=sum(latencies) / len(latencies) if latencies else None,
        success_rate=min(rates) if rates else 1.0,
    )
