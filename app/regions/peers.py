"""What a gateway knows of the other regions and how it chooses among them. Pure: summaries,
failures and forward latencies go in, a ranked list of regions comes out, through the same
scorers that rank replicas inside a region (app.fleet.scoring), one level up: each region is
one "replica" whose capacity and load are its model's totals. Each peer has the circuit
breaker replicas have (app.fleet.breaker): `federation.failure_threshold` consecutive failures
take it out of rotation; a good summary, or a probe forward once the cool-off has passed,
puts it back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.fleet.breaker import BreakerConfig, BreakerState, CircuitBreaker
from app.fleet.scoring import ReplicaView, RouteHints, RoutingPolicy
from app.fleet.spec import LoadBalancing
from app.regions.spec import Federation
from app.regions.summary import ModelLoad, RegionSummary

LATENCY_EMA = 0.2
STALE_AFTER_INTERVALS = 3  # a summary older than this many pull periods says nothing


@dataclass
class Peer:
    region: str
    base_url: str
    summary: RegionSummary | None = None
    fetched_at: float | None = None  # monotonic time of the last good summary
    # Counts summary pulls and forwards that could not reach the peer.
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    forward_latency_ms: float | None = None
    last_error: str | None = None

    @property
    def failures(self) -> int:
        """Consecutive failures to reach the peer."""
        return self.breaker.failures

    @property
    def in_rotation(self) -> bool:
        """Not open: closed, or half-open (a probe may go)."""
        return self.breaker.state is not BreakerState.OPEN


@dataclass
class PeerTable:
    config: Federation
    balancing: LoadBalancing
    distance_km: Callable[[str, str], float]
    peers: dict[str, Peer] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._policy = RoutingPolicy(self.balancing, self.distance_km)

    def add(
        self,
        region: str,
        base_url: str,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        """A peer, its circuit closed; `on_change` is told its circuit's transitions."""
        config = BreakerConfig(failure_threshold=self.config.failure_threshold)
        breaker = CircuitBreaker(config, self.clock, on_change=on_change)
        self.peers[region] = Peer(region, base_url.rstrip("/"), breaker=breaker)

    # ---- what happened ---------------------------------------------------------------------

    def record_summary(self, region: str, summary: RegionSummary) -> None:
        """A good summary: the peer is reachable again and back in rotation."""
        peer = self.peers[region]
        peer.summary, peer.fetched_at = summary, self.clock()
        peer.breaker.record_success()
        peer.last_error = None

    def record_failure(self, region: str, error: str) -> None:
        """A pull or a forward could not reach the peer (or got garbage back)."""
        peer = self.peers[region]
        peer.breaker.record_failure()
        peer.last_error = error

    def admit(self, region: str) -> bool:
        """Whether a forward may go to the peer now (while half-open, it becomes the probe)."""
        return self.peers[region].breaker.allow()

    def release(self, region: str) -> None:
        """A forward ended without telling whether the peer is reachable (busy, cancelled)."""
        self.peers[region].breaker.release()

    def record_forward(self, region: str, latency_ms: float) -> None:
        peer = self.peers[region]
        peer.breaker.record_success()
        previous = peer.forward_latency_ms
        peer.forward_latency_ms = (
            latency_ms if previous is None else previous + LATENCY_EMA * (latency_ms - previous)
        )

    # ---- decisions -------------------------------------------------------------------------

    def fresh_summary(self, peer: Peer) -> RegionSummary | None:
        if peer.summary is None or peer.fetched_at is None:
            return None
        if self.clock() - peer.fetched_at > STALE_AFTER_INTERVALS * self.config.summary_interval_s:
            return None
        return peer.summary

    def rank(
        self,
        model: str,
        client_region: str | None,
        *,
        spec_regions: list[str],
        exclude: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Peer regions to try for a model, best first: in rotation (circuit closed, or
        half-open with no probe in flight), not drained, serving the model by their summary
        (or, with no fresh summary, by the spec); nearest to the client, then by spare
        capacity and performance; saturated regions last."""
        views = [
            view
            for peer in self.peers.values()
            if peer.region not in exclude and peer.breaker.available()
            for view in [self._view(peer, model, spec_regions)]
            if view is not None
        ]
        decision = self._policy.rank(views, RouteHints(region=client_region))
        return [view.region for view in decision.ranked]

    def _view(self, peer: Peer, model: str, spec_regions: list[str]) -> ReplicaView | None:
        summary = self.fresh_summary(peer)
        load = summary.load_of(model) if summary else None
        if summary is not None and summary.drained:
            return None
        if load is None:
            if peer.region not in spec_regions:
                return None
            # No fresh summary, or one from before the model's replicas reported: try it, but
            # as if it were full, after peers known to have room (ongoing=None would read as
            # idle to the scorers).
            return ReplicaView(peer.region, peer.region, capacity=1, ongoing=1)
        if not load.serviceable():
            return None
        return ReplicaView(
            replica_id=peer.region,
            region=peer.region,
            capacity=load.capacity,
            ongoing=load.ongoing,
            latency_ms=_add(peer.forward_latency_ms, load.latency_ms),
            success_rate=load.success_rate,
        )

    def status(self) -> dict[str, Any]:
        """Every peer for /v1/fleet and `app fleet status`."""
        now = self.clock()
        return {
            peer.region: {
                "endpoint": peer.base_url,
                "in_rotation": peer.in_rotation,
                "circuit": peer.breaker.state.value,
                "failures": peer.failures,
                "last_error": peer.last_error,
                "summary_age_s": None
                if peer.fetched_at is None
                else round(now - peer.fetched_at, 3),
                "forward_latency_ms": peer.forward_latency_ms,
                "summary": peer.summary.to_json() if peer.summary else None,
            }
            for peer in self.peers.values()
        }


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else (a or 0.0) + (b or 0.0)


LOCAL = "<local>"


def plan(
    *,
    local: ModelLoad | None,
    served_here: bool,
    drained: bool,
    inflight: int,
    spillover_utilization: float,
    forwarded: bool,
    peers: list[str],
) -> list[str]:
    """The order in which a gateway tries to serve one request: LOCAL (its own replicas) and
    peer regions. Local first when it can serve; peers first when the model is not served
    here, the region is drained, or every local replica is unhealthy or saturated (the local
    replicas stay a last resort unless drained). A request that was already forwarded is
    served here or nowhere: no loops, no ping-pong."""
    if forwarded:
        return [LOCAL] if served_here and not drained else []
    if drained:
        return list(peers)
    if not served_here:
        return list(peers)
    if local is None:  # served here but not reported yet (replicas starting): try it first
        return [LOCAL, *peers]
    busy = max(local.ongoing, inflight)
    if local.serviceable() and busy < spillover_utilization * local.capacity:
        return [LOCAL, *peers]
    return [*peers, LOCAL]
