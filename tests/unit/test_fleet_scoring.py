"""The routing pipeline's filters, scorers and pickers, on hand-built replica views."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.fleet.geo import great_circle_km, region_distances
from app.fleet.scoring import (
    ReplicaView,
    RouteHints,
    RoutingPolicy,
    WeightedRoundRobin,
    performance_scores,
    power_of_two,
)
from app.fleet.spec import FleetSpec, LoadBalancing, PerformanceWeights, Region, Strategy

SPEC = FleetSpec(
    regions={
        "us-east-1": Region(latitude=38.9, longitude=-77.4, zones=("us-east-1a", "us-east-1b")),
        "eu-west-1": Region(latitude=53.3, longitude=-6.3, zones=("eu-west-1a",)),
        "ap-southeast-1": Region(latitude=1.35, longitude=103.8),
    },
    default_region="us-east-1",
)
DISTANCES = region_distances(SPEC)


def policy(strategy: Strategy = Strategy.COMPOSITE, seed: int = 7, **lb: object) -> RoutingPolicy:
    balancing = LoadBalancing(strategy=strategy, **lb)  # type: ignore[arg-type]
    return RoutingPolicy(balancing, lambda a, b: DISTANCES[(a, b)], rng=random.Random(seed))


def view(rid: str, region: str, **fields: object) -> ReplicaView:
    fields.setdefault("capacity", 10)
    fields.setdefault("ongoing", 0)
    return ReplicaView(replica_id=rid, region=region, **fields)  # type: ignore[arg-type]


FLEET = [
    view("us1", "us-east-1", zone="us-east-1a"),
    view("us2", "us-east-1", zone="us-east-1b"),
    view("eu1", "eu-west-1", zone="eu-west-1a"),
    view("ap1", "ap-southeast-1"),
]


def test_great_circle_distance_matches_known_city_pairs() -> None:
    # London-New York is about 5,570 km; a point to itself is 0.
    assert great_circle_km(51.5074, -0.1278, 40.7128, -74.0060) == pytest.approx(5570, rel=0.01)
    assert great_circle_km(10, 10, 10, 10) == 0.0
    assert DISTANCES[("eu-west-1", "us-east-1")] < DISTANCES[("eu-west-1", "ap-southeast-1")]


@pytest.mark.parametrize("strategy", [Strategy.COMPOSITE, Strategy.GEO])
def test_client_gets_a_replica_in_its_own_region(strategy: Strategy) -> None:
    for client, expected in [("eu-west-1", "eu1"), ("ap-southeast-1", "ap1")]:
        decision = policy(strategy).rank(FLEET, RouteHints(region=client))
        assert decision.chosen is not None and decision.chosen.replica_id == expected
        assert not decision.spilled


def test_regions_are_ranked_by_distance_from_the_client() -> None:
    decision = policy(Strategy.GEO).rank(FLEET, RouteHints(region="eu-west-1"))
    assert [r.region for r in decision.ranked] == [
        "eu-west-1",
        "us-east-1",
        "us-east-1",
        "ap-southeast-1",
    ]


def test_saturated_region_spills_to_the_next_nearest() -> None:
    fleet = [*FLEET[:2], view("eu1", "eu-west-1", ongoing=10), FLEET[3]]
    decision = policy().rank(fleet, RouteHints(region="eu-west-1"))
    assert decision.chosen is not None and decision.chosen.region == "us-east-1"
    assert decision.spilled
    # The full replica is still ranked (last), so Serve can queue on it if everything fills up.
    assert decision.ranked[-1].replica_id == "eu1"


def test_spillover_threshold_below_full() -> None:
    fleet = [view("eu1", "eu-west-1", ongoing=8), view("us1", "us-east-1")]
    eager = policy(spillover_utilization=0.8).rank(fleet, RouteHints(region="eu-west-1"))
    patient = policy().rank(fleet, RouteHints(region="eu-west-1"))
    assert eager.chosen is not None and eager.chosen.replica_id == "us1"
    assert patient.chosen is not None and patient.chosen.replica_id == "eu1"


def test_zone_of_the_client_is_preferred_within_a_region() -> None:
    decision = policy(Strategy.GEO).rank(FLEET, RouteHints(region="us-east-1", zone="us-east-1b"))
    assert decision.chosen is not None and decision.chosen.replica_id == "us2"


def test_unhealthy_drained_excluded_and_weighted_out_replicas_are_skipped() -> None:
    fleet = [
        view("a", "eu-west-1", healthy=False),
        view("b", "eu-west-1", drained=True),
        view("c", "eu-west-1", actor_id="actor-c"),
        view("d", "eu-west-1", weight=0.0),
        view("e", "us-east-1"),
    ]
    decision = policy().rank(fleet, RouteHints(region="eu-west-1", exclude=frozenset({"actor-c"})))
    assert [r.replica_id for r in decision.ranked] == ["e"]
    # No eligible replica in eu-west-1 at all: a failover to the nearest serving region, not
    # a spill-over (which means the nearest serving region was full).
    assert not decision.spilled and not decision.panic


def test_no_healthy_replica_fails_open() -> None:
    fleet = [view("a", "eu-west-1", healthy=False), view("b", "us-east-1", healthy=False)]
    decision = policy().rank(fleet, RouteHints(region="eu-west-1"))
    assert decision.panic
    assert decision.chosen is not None and decision.chosen.replica_id == "a"


def test_nothing_eligible_gives_an_empty_decision() -> None:
    decision = policy().rank([view("a", "eu-west-1", drained=True)], RouteHints())
    assert decision.ranked == [] and decision.chosen is None


def test_least_loaded_orders_by_utilisation_not_count() -> None:
    fleet = [
        view("big", "us-east-1", capacity=100, ongoing=20),  # 20%
        view("small", "us-east-1", capacity=4, ongoing=2),  # 50%
        view("idle", "us-east-1", capacity=4, ongoing=0),
    ]
    ranked = policy(Strategy.LEAST_LOADED).rank(fleet, RouteHints()).ranked
    assert [r.replica_id for r in ranked] == ["idle", "big", "small"]


def test_region_blind_strategies_ignore_the_client_region() -> None:
    fleet = [view("eu1", "eu-west-1", ongoing=5), view("us1", "us-east-1", ongoing=0)]
    decision = policy(Strategy.LEAST_LOADED).rank(fleet, RouteHints(region="eu-west-1"))
    assert decision.chosen is not None and decision.chosen.replica_id == "us1"
    assert not decision.spilled


def test_power_of_two_prefers_the_less_loaded_of_its_sample() -> None:
    rng = random.Random(3)
    fleet = [view(f"r{i}", "us-east-1", ongoing=i) for i in range(8)]
    picks = Counter(power_of_two(fleet, rng)[0].replica_id for _ in range(4000))
    # r7 (the busiest) can only win when sampled with itself, which never happens.
    assert picks["r7"] == 0
    assert picks["r0"] > picks["r3"] > picks["r6"]
    assert len(power_of_two(fleet, rng)) == len(fleet)


def test_weighted_round_robin_follows_weights_smoothly() -> None:
    wrr = WeightedRoundRobin()
    fleet = [view("a", "x", weight=5), view("b", "x", weight=1), view("c", "x", weight=1)]
    sequence = [wrr.pick(fleet).replica_id for _ in range(7)]
    assert Counter(sequence) == {"a": 5, "b": 1, "c": 1}
    # Smooth: nginx's algorithm never bunches all of a's picks together.
    assert sequence == ["a", "a", "b", "a", "c", "a", "a"]


def test_weighted_round_robin_forgets_replicas_that_left() -> None:
    wrr = WeightedRoundRobin()
    wrr.pick([view("a", "x"), view("b", "x")])
    wrr.pick([view("a", "x")])
    assert set(wrr.current) == {"a"}


def test_performance_score_weights_latency_success_and_throughput() -> None:
    weights = PerformanceWeights()
    fast = view("fast", "x", latency_ms=10.0, success_rate=1.0, throughput=100.0)
    slow = view("slow", "x", latency_ms=50.0, success_rate=1.0, throughput=20.0)
    flaky = view("flaky", "x", latency_ms=10.0, success_rate=0.5, throughput=100.0)
    near = view("near", "x", latency_ms=12.0, success_rate=1.0, throughput=85.0)
    # Throughput is what a replica can sustain (capacity / latency), not what it received.
    idle_fast = view("idle", "x", latency_ms=10.0, success_rate=1.0, throughput=0.0)
    scores = performance_scores([fast, slow, flaky, near, idle_fast], weights)
    assert scores["fast"] == pytest.approx(1.0)
    assert scores["slow"] == pytest.approx(0.4 * 0.25 + 0.4 + 0.2 * 0.25)
    assert scores["flaky"] == pytest.approx(0.4 + 0.4 * 0.5 + 0.2)
    assert scores["near"] == pytest.approx(1.0)  # within 25% of the best: a tie
    assert scores["idle"] == pytest.approx(1.0)
    big = view("big", "x", latency_ms=10.0, capacity=40)
    assert performance_scores([fast, big], weights)["fast"] == pytest.approx(0.8 + 0.2 * 0.3125)


def test_performance_strategy_avoids_a_slow_replica_until_the_fast_ones_are_full() -> None:
    slow = view("slow", "x", latency_ms=50.0, throughput=10.0)
    fast = [view(f"f{i}", "x", latency_ms=10.0, throughput=30.0, ongoing=8) for i in range(3)]
    decision = policy(Strategy.PERFORMANCE).rank([slow, *fast], RouteHints())
    assert decision.ranked[-1].replica_id == "slow"
    # Equal fast replicas share the work: the least utilised goes first.
    fast[1] = view("f1", "x", latency_ms=10.0, throughput=30.0, ongoing=2)
    decision = policy(Strategy.PERFORMANCE).rank([slow, *fast], RouteHints())
    assert decision.chosen is not None and decision.chosen.replica_id == "f1"
    # Full replicas go last whatever their score.
    full = [view(f"f{i}", "x", latency_ms=10.0, throughput=30.0, ongoing=10) for i in range(3)]
    decision = policy(Strategy.PERFORMANCE).rank([slow, *full], RouteHints())
    assert decision.chosen is not None and decision.chosen.replica_id == "slow"


def test_new_replica_without_samples_counts_as_median() -> None:
    known = [view("a", "x", latency_ms=10.0), view("b", "x", latency_ms=30.0)]
    scores = performance_scores([*known, view("new", "x")], PerformanceWeights())
    assert scores["a"] > scores["new"] > scores["b"]


def test_per_request_strategy_override() -> None:
    fleet = [view("eu1", "eu-west-1", ongoing=9), view("us1", "us-east-1", ongoing=0)]
    geo = policy().rank(fleet, RouteHints(region="eu-west-1"))
    blind = policy().rank(fleet, RouteHints(region="eu-west-1", strategy=Strategy.LEAST_LOADED))
    assert geo.chosen is not None and geo.chosen.replica_id == "eu1"
    assert blind.chosen is not None and blind.chosen.replica_id == "us1"
    assert blind.strategy is Strategy.LEAST_LOADED


def test_unknown_replica_region_ranks_last() -> None:
    fleet = [view("mystery", "mars-1"), view("ap1", "ap-southeast-1")]
    decision = policy(Strategy.GEO).rank(fleet, RouteHints(region="eu-west-1"))
    assert [r.replica_id for r in decision.ranked] == ["ap1", "mystery"]


def test_composite_spreads_load_among_equal_replicas() -> None:
    p = policy()
    fleet = [view(f"r{i}", "us-east-1") for i in range(4)]
    picks = Counter(
        p.rank(fleet, RouteHints(region="us-east-1")).chosen.replica_id for _ in range(400)
    )  # type: ignore[union-attr]
    assert len(picks) == 4 and min(picks.values()) > 50


def test_a_full_kv_cache_counts_as_load() -> None:
    idle_slots = view("a", "us", capacity=8, ongoing=1, kv_cache_utilization=0.9)
    busy_slots = view("b", "us", capacity=8, ongoing=4)
    assert idle_slots.utilization == pytest.approx(0.9)
    assert busy_slots.utilization == pytest.approx(0.5)
    assert idle_slots.has_room
    full = view("c", "us", capacity=8, ongoing=1, kv_cache_utilization=1.0)
    assert not full.has_room
