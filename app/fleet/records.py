"""The router actor's records of the fleet (app.fleet.router_actor): nodes and replicas, with
the pure parts of a replica's health check and performance figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReplicaRecord:
    replica_id: str
    model: str
    node_id: str | None
    region: str
    zone: str | None
    capacity: int
    actor_id: str | None = None
    ongoing: int = 0
    perf: dict[str, Any] = field(default_factory=dict)
    last_heartbeat: float = 0.0
    self_healthy: bool = True
    healthy: bool = True
    failed_checks: int = 0
    passed_checks: int = 0
    weight: float = 1.0
    inject_latency_ms: float = 0.0
    # What routers saw since the last health check: requests, failures, latency EMA.
    routed: int = 0
    routed_errors: int = 0
    router_latency_ms: float | None = None

    def add_routed(self, count: int, errors: int, latency_ms: float | None) -> None:
        """What a router observed since its last pull: requests, failures, latency EMA."""
        self.routed += count
        self.routed_errors += errors
        if latency_ms is not None:
            prev = self.router_latency_ms
            self.router_latency_ms = (
                latency_ms if prev is None else prev + 0.3 * (latency_ms - prev)
            )

    def check(self, node_alive: bool, now: float, interval: float) -> bool:
        """One health check: a heartbeat lately, the replica says it is healthy, its node is
        alive, and the routers' requests to it since the last check mostly succeeded. Starts
        the next check's count of routed requests."""
        if self.routed == 0 and not (self.perf.get("completed") or 0):
            self.router_latency_ms = None  # nothing measured lately: the old figure is stale
        ok = (
            now - self.last_heartbeat <= 2.5 * interval
            and self.self_healthy
            and node_alive
            and not (self.routed >= 3 and self.routed_errors > self.routed // 2)
        )
        self.routed = self.routed_errors = 0
        return ok

    def count_check(self, ok: bool, failover_threshold: int, recovery_threshold: int) -> str | None:
        """Count a check's outcome: "replica_unhealthy" after `failover_threshold` failed checks
        in a row, "replica_healthy" after `recovery_threshold` passed ones, else None."""
        if ok:
            self.failed_checks, self.passed_checks = 0, self.passed_checks + 1
            if not self.healthy and self.passed_checks >= recovery_threshold:
                self.healthy = True
                return "replica_healthy"
        else:
            self.passed_checks, self.failed_checks = 0, self.failed_checks + 1
            if self.healthy and self.failed_checks >= failover_threshold:
                self.healthy = False
                return "replica_unhealthy"
        return None

    def performance(self) -> dict[str, Any]:
        """Replica-reported figures merged with what routers observed: the routers' latency
        includes the network, and a failure either side lowers the success rate."""
        perf = dict(self.perf)
        if self.router_latency_ms is not None:
            perf["latency_ms"] = self.router_latency_ms
        if self.routed:
            router_success = 1.0 - self.routed_errors / self.routed
            perf["success_rate"] = min(float(perf.get("success_rate", 1.0)), router_success)
        return perf


@dataclass
class NodeRecord:
    node_id: str
    region: str
    zone: str | None
    address: str
    alive: bool
    drained: bool = False
