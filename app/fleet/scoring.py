"""Routing decisions as pure functions over replica views: filters, scorers and pickers, composed
into one pipeline that every path (handles, the gateway, HAProxy's /internal/route) runs.

    eligible (not excluded, not drained) -> healthy (fails open when none is) -> region tiers by
    great-circle distance from the client, a saturated tier spilling to the next-nearest ->
    the strategy orders replicas inside a tier -> ranked list, best first

Nothing here touches Ray: the request router adapts Serve's replicas into `ReplicaView`s, and the
unit tests build views by hand.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from app.fleet.spec import CompositeWeights, LoadBalancing, PerformanceWeights, Strategy

DEFAULT_LATENCY_MS = 1.0
SAME_AS_BEST = 1.25  # within 25% of the best replica's figure counts as the best


@dataclass(slots=True)
class ReplicaView:
    """What a router knows about one replica when it decides. Treated as immutable; not frozen
    only because a frozen dataclass costs several times more to build, once per replica per
    request."""

    replica_id: str
    region: str
    zone: str | None = None
    node_id: str | None = None
    capacity: int = 1
    ongoing: int | None = None  # None: unknown (not probed yet)
    healthy: bool = True
    drained: bool = False
    weight: float = 1.0  # operator-set; 0 takes the replica out of rotation
    latency_ms: float | None = None  # moving average of service latency
    success_rate: float = 1.0
    throughput: float = 0.0  # completed requests per second
    actor_id: str | None = None
    # Share of a continuous-engine replica's KV cache budget in use (None: not reported).
    kv_cache_utilization: float | None = None

    @property
    def load(self) -> int:
        return self.ongoing or 0

    @property
    def utilization(self) -> float:
        """How full the replica is: its slots, or its KV cache when that is fuller."""
        return max(self.load / max(1, self.capacity), self.kv_cache_utilization or 0.0)

    @property
    def has_room(self) -> bool:
        if self.kv_cache_utilization is not None and self.kv_cache_utilization >= 1.0:
            return False
        return self.ongoing is None or self.ongoing < self.capacity


@dataclass(frozen=True, slots=True)
class RouteHints:
    """Per-request inputs: where the client is, an optional strategy override, and replicas a
    failed attempt already tried."""

    region: str | None = None
    zone: str | None = None
    strategy: Strategy | None = None
    exclude: frozenset[str] = frozenset()  # replica ids or actor ids


@dataclass(frozen=True, slots=True)
class Decision:
    ranked: list[ReplicaView]  # best first; empty when no replica is eligible
    strategy: Strategy
    client_region: str | None
    spilled: bool = False  # the pick is outside the client's nearest serving region
    panic: bool = False  # no replica was healthy, so health was ignored

    @property
    def chosen(self) -> ReplicaView | None:
        return self.ranked[0] if self.ranked else None


# ---- filters --------------------------------------------------------------------------------


def eligible(replicas: Iterable[ReplicaView], exclude: frozenset[str]) -> list[ReplicaView]:
    """Not drained, not weighted out, not already tried by this request."""
    return [
        r
        for r in replicas
        if not r.drained
        and r.weight > 0
        and r.replica_id not in exclude
        and (r.actor_id is None or r.actor_id not in exclude)
    ]


def healthy(replicas: list[ReplicaView]) -> tuple[list[ReplicaView], bool]:
    """The healthy replicas; all of them (panic mode) when none is, because the fleet view may
    be stale and refusing every request is worse than trying one (Envoy's panic threshold)."""
    ok = [r for r in replicas if r.healthy]
    return (ok, False) if ok or not replicas else (list(replicas), True)


# ---- scorers (higher is better, each in [0, 1]) ---------------------------------------------


def load_score(r: ReplicaView) -> float:
    return 1.0 - min(1.0, r.utilization)


def locality_score(r: ReplicaView, zone: str | None) -> float:
    return 1.0 if zone is not None and r.zone == zone else 0.0


def performance_scores(
    replicas: Sequence[ReplicaView], weights: PerformanceWeights
) -> dict[str, float]:
    """Weighted score of latency, success rate and throughput, each relative to the best
    replica in the set.

    - Latency compares expected latencies: the moving average stretched by how full the
      replica is (ongoing / capacity; a batching replica serves its capacity concurrently, so a
      few queued requests barely slow it).
    - Throughput is what the replica can sustain, capacity / latency (Little's law), not the
      traffic it happened to get: scoring received traffic would feed on itself, the busiest
      replica scoring best and getting busier while the others starve.
    - Figures within SAME_AS_BEST of the best count as the best, so near-equal replicas tie and
      share the work by load instead of one taking everything on a small difference.
    - A replica with no recent latency sample counts as the median, so new (or long-idle)
      replicas get traffic and are measured again.
    """
    if not replicas:
        return {}
    known = [r.latency_ms for r in replicas if r.latency_ms is not None and r.latency_ms > 0]
    neutral = statistics.median(known) if known else DEFAULT_LATENCY_MS
    latency = {
        r.replica_id: r.latency_ms if r.latency_ms and r.latency_ms > 0 else neutral
        for r in replicas
    }
    expected = {r.replica_id: latency[r.replica_id] * (1 + r.utilization) for r in replicas}
    sustainable = {r.replica_id: max(1, r.capacity) / latency[r.replica_id] for r in replicas}
    best_expected = min(expected.values())
    best_rate = max(sustainable.values())
    return {
        rid: weights.latency * min(1.0, SAME_AS_BEST * best_expected / expected[rid])
        + weights.success_rate * max(0.0, min(1.0, r.success_rate))
        + weights.throughput * min(1.0, SAME_AS_BEST * sustainable[rid] / best_rate)
        for r in replicas
        for rid in (r.replica_id,)
    }


def composite_scores(
    replicas: Sequence[ReplicaView],
    zone: str | None,
    composite: CompositeWeights,
    performance: PerformanceWeights,
) -> dict[str, float]:
    perf = performance_scores(replicas, performance)
    return {
        r.replica_id: r.weight
        * (
            composite.locality * locality_score(r, zone)
            + composite.load * load_score(r)
            + composite.performance * perf[r.replica_id]
        )
        for r in replicas
    }


# ---- pickers --------------------------------------------------------------------------------


def by_load(replicas: Iterable[ReplicaView], rng: random.Random) -> list[ReplicaView]:
    """Least utilised first; ties broken at random so equal replicas share the work."""
    return sorted(replicas, key=lambda r: (r.utilization, r.load, rng.random()))


def by_score(
    replicas: Iterable[ReplicaView], scores: dict[str, float], rng: random.Random
) -> list[ReplicaView]:
    """Replicas with room first, then by score (rounded, so near-equal replicas tie), then
    least utilised."""
    return sorted(
        replicas,
        key=lambda r: (
            not r.has_room,
            -round(scores[r.replica_id], 2),
            r.utilization,
            rng.random(),
        ),
    )


def power_of_two(replicas: Sequence[ReplicaView], rng: random.Random) -> list[ReplicaView]:
    """Two replicas sampled at random, the less loaded first; the rest after them by load."""
    if len(replicas) <= 2:
        return by_load(replicas, rng)
    pair = rng.sample(list(replicas), 2)
    first = by_load(pair, rng)
    chosen = {r.replica_id for r in pair}
    return first + by_load((r for r in replicas if r.replica_id not in chosen), rng)


@dataclass
class WeightedRoundRobin:
    """Smooth weighted round robin (nginx's): over any window, each replica is picked in
    proportion to its weight, and picks of one replica are spread out rather than bunched."""

    current: dict[str, float] = field(default_factory=dict)

    def pick(self, replicas: Sequence[ReplicaView]) -> ReplicaView:
        live = {r.replica_id for r in replicas}
        for stale in [k for k in self.current if k not in live]:
            del self.current[stale]
        total = 0.0
        best: ReplicaView | None = None
        for r in replicas:
            self.current[r.replica_id] = self.current.get(r.replica_id, 0.0) + r.weight
            total += r.weight
            if best is None or self.current[r.replica_id] > self.current[best.replica_id]:
                best = r
        assert best is not None
        self.current[best.replica_id] -= total
        return best

    def order(self, replicas: Sequence[ReplicaView], rng: random.Random) -> list[ReplicaView]:
        if not replicas:
            return []
        first = self.pick(replicas)
        return [first, *by_load((r for r in replicas if r is not first), rng)]


# ---- the pipeline ---------------------------------------------------------------------------


def _utilization(r: ReplicaView) -> float:
    return r.utilization


@dataclass
class RoutingPolicy:
    """One router's decision procedure. Holds only the state the pickers need (the round-robin
    weights and a random generator), so it can be unit-tested with a seeded generator."""

    balancing: LoadBalancing
    distance_km: Callable[[str, str], float]
    rng: random.Random = field(default_factory=random.Random)
    wrr: WeightedRoundRobin = field(default_factory=WeightedRoundRobin)

    def rank(self, replicas: Iterable[ReplicaView], hints: RouteHints) -> Decision:
        strategy = hints.strategy or self.balancing.strategy
        candidates = eligible(replicas, hints.exclude)
        candidates, panic = healthy(candidates)
        if not candidates:
            return Decision([], strategy, hints.region, panic=panic)
        geo = strategy in (Strategy.GEO, Strategy.COMPOSITE) and hints.region is not None
        tiers = self._tiers(candidates, hints.region) if geo else [candidates]
        ranked: list[ReplicaView] = []
        saturated: list[ReplicaView] = []
        threshold = self.balancing.spillover_utilization
        for tier in tiers:
            if all(r.utilization >= threshold for r in tier):
                saturated.extend(tier)  # every replica here is busy: try nearer-free regions first
            elif not ranked:
                ranked.extend(self._order(strategy, tier, hints))  # the tier that will serve
            else:
                # Farther tiers are only fallbacks: least loaded first is enough, and cheaper
                # than scoring them (this keeps a decision over a large fleet affordable).
                ranked.extend(sorted(tier, key=_utilization))
        ranked.extend(sorted(saturated, key=_utilization))
        spilled = geo and bool(ranked) and ranked[0].region != tiers[0][0].region
        return Decision(ranked, strategy, hints.region, spilled=spilled, panic=panic)

    def _tiers(self, replicas: list[ReplicaView], client: str | None) -> list[list[ReplicaView]]:
        """Replicas grouped by region, nearest region to the client first."""
        groups: dict[str, list[ReplicaView]] = {}
        for r in replicas:
            groups.setdefault(r.region, []).append(r)
        order = sorted(groups, key=lambda region: (self._distance(client, region), region))
        return [groups[region] for region in order]

    def _distance(self, client: str | None, region: str) -> float:
        if client is None or client == region:
            return 0.0
        try:
            return self.distance_km(client, region)
        except KeyError:
            return float("inf")  # a region the spec does not know: last resort

    def _order(
        self, strategy: Strategy, replicas: list[ReplicaView], hints: RouteHints
    ) -> list[ReplicaView]:
        rng = self.rng
        if strategy is Strategy.LEAST_LOADED:
            return by_load(replicas, rng)
        if strategy is Strategy.POWER_OF_TWO:
            return power_of_two(replicas, rng)
        if strategy is Strategy.WEIGHTED_ROUND_ROBIN:
            return self.wrr.order(replicas, rng)
        if strategy is Strategy.PERFORMANCE:
            return by_score(replicas, performance_scores(replicas, self.balancing.weights), rng)
        if strategy is Strategy.GEO:
            zone = hints.zone
            return sorted(
                replicas,
                key=lambda r: (-locality_score(r, zone), r.utilization, r.load, rng.random()),
            )
        scores = composite_scores(
            replicas, hints.zone, self.balancing.composite, self.balancing.weights
        )
        return by_score(replicas, scores, rng)
