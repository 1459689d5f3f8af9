"""FleetRequestRouter's adaptation of Serve's replicas, without Ray: replicas are a subclass of
Serve's RunningReplica that skips the actor lookup, routers are the real class."""

from __future__ import annotations

from typing import Any

import pytest
import ray
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RunningReplicaInfo,
)
from ray.serve.request_router import PendingRequest, RunningReplica

from app.fleet.breaker import BreakerConfig, ReplicaBreakers
from app.fleet.hints import route_kwarg, with_excluded
from app.fleet.request_router import FleetRequestRouter
from app.fleet.spec import FleetSpec, Region, Strategy
from app.fleet.view import FleetView

DEPLOYMENT = DeploymentID(name="model-echo", app_name="model-echo")
SPEC = FleetSpec(
    regions={
        "us-east-1": Region(latitude=38.9, longitude=-77.4),
        "eu-west-1": Region(latitude=53.3, longitude=-6.3),
    },
    default_region="us-east-1",
)


class FakeReplica(RunningReplica):
    """Serve's replica wrapper with a made-up actor id instead of a live actor handle."""

    def __init__(self, info: RunningReplicaInfo, actor_hex: str) -> None:
        self._replica_info = info
        self._multiplexed_model_ids = set()
        self._actor_hex = actor_hex

    @property
    def actor_id(self) -> Any:
        return ray.ActorID(bytes.fromhex(self._actor_hex))


def replica(uid: str, region: str | None, capacity: int = 4, **stats: Any) -> FakeReplica:
    info = RunningReplicaInfo(
        replica_id=ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT),
        node_id=f"node-{uid}",
        node_ip="10.0.0.1",
        availability_zone=None,
        actor_name=f"SERVE_REPLICA::{uid}",
        max_ongoing_requests=capacity,
        routing_stats=stats,
        replica_metadata={"region": region} if region else {},
    )
    return FakeReplica(info, (uid.encode().hex() * 16)[:32])


def request(route: dict[str, Any] | None = None) -> PendingRequest:
    from ray.serve._private.common import RequestMetadata

    metadata = RequestMetadata(request_id="r", internal_request_id="i-1")
    kwargs = {"route": route} if route is not None else {}
    return PendingRequest(args=[], kwargs=kwargs, metadata=metadata)


@pytest.fixture
def router() -> FleetRequestRouter:
    r = FleetRequestRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(fleet=SPEC.model_dump(mode="json"), model="echo")
    # No router actor here: the view never pulls, and the tests apply its snapshots.
    r._fleet = FleetView(SPEC.router_actor, interval_s=1.0, subscriber="test", pulling=False)
    return r


async def test_ranks_one_replica_per_rank_nearest_region_first(
    router: FleetRequestRouter,
) -> None:
    replicas = [replica("us", "us-east-1"), replica("eu", "eu-west-1")]
    ranks = await router.choose_replicas(replicas, request(route_kwarg(region="eu-west-1")))
    assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [["eu"], ["us"]]


async def test_without_hints_the_router_uses_its_own_region(router: FleetRequestRouter) -> None:
    # Outside Ray this process has no labels, so its home is the spec's default region.
    replicas = [replica("eu", "eu-west-1"), replica("us", "us-east-1")]
    ranks = await router.choose_replicas(replicas, request())
    assert ranks[0][0].replica_id.unique_id == "us"


async def test_replica_without_metadata_belongs_to_the_default_region(
    router: FleetRequestRouter,
) -> None:
    replicas = [replica("eu", "eu-west-1"), replica("anon", None)]
    ranks = await router.choose_replicas(replicas, request(route_kwarg(region="us-east-1")))
    assert ranks[0][0].replica_id.unique_id == "anon"


async def test_queue_lengths_from_serves_cache_drive_spill_over(
    router: FleetRequestRouter,
) -> None:
    eu, us = replica("eu", "eu-west-1", capacity=2), replica("us", "us-east-1", capacity=2)
    router.replica_queue_len_cache.update(eu.replica_id, 2)
    ranks = await router.choose_replicas([eu, us], request(route_kwarg(region="eu-west-1")))
    assert [rank[0].replica_id.unique_id for rank in ranks] == ["us", "eu"]


async def test_snapshot_health_drain_and_excluded_actor(router: FleetRequestRouter) -> None:
    a, b, c = replica("a", "eu-west-1"), replica("b", "eu-west-1"), replica("c", "us-east-1")
    router.apply_snapshot(
        {
            "version": 3,
            "replicas": {"a": {"healthy": False}, "b": {"healthy": True}},
            "drained_nodes": [],
        }
    )
    hints = route_kwarg(region="eu-west-1", exclude=[b.actor_id.hex()])
    ranks = await router.choose_replicas([a, b, c], request(hints))
    assert [rank[0].replica_id.unique_id for rank in ranks] == ["c"]
    router.apply_snapshot({"version": 4, "replicas": {}, "drained_nodes": ["node-c"]})
    ranks = await router.choose_replicas([a, b, c], request(route_kwarg(region="us-east-1")))
    assert ranks[0][0].replica_id.unique_id in ("a", "b")


async def test_a_restarted_router_actors_snapshot_of_the_same_version_is_read_afresh(
    router: FleetRequestRouter,
) -> None:
    a, c = replica("a", "eu-west-1"), replica("c", "us-east-1")
    router.apply_snapshot({"epoch": "old", "version": 4, "replicas": {}, "drained_nodes": []})
    ranks = await router.choose_replicas([a, c], request(route_kwarg(region="eu-west-1")))
    assert ranks[0][0].replica_id.unique_id == "a"
    # The actor restarted and reached version 4 again, with node-a drained this time.
    router.apply_snapshot(
        {"epoch": "new", "version": 4, "replicas": {}, "drained_nodes": ["node-a"]}
    )
    ranks = await router.choose_replicas([a, c], request(route_kwarg(region="eu-west-1")))
    assert [rank[0].replica_id.unique_id for rank in ranks] == ["c"]


async def test_nothing_eligible_falls_back_to_every_replica(router: FleetRequestRouter) -> None:
    a = replica("a", "eu-west-1")
    router.apply_snapshot({"version": 1, "replicas": {}, "drained_nodes": ["node-a"]})
    ranks = await router.choose_replicas([a], request())
    assert ranks == [[a]]


async def test_open_circuits_are_skipped_unless_every_replica_is_open(
    router: FleetRequestRouter,
) -> None:
    """A caller's open breakers travel as excluded actor ids: the router skips those
    replicas, and when every replica is excluded it serves from any (panic mode)."""
    a, b = replica("a", "eu-west-1"), replica("b", "eu-west-1")
    breakers = ReplicaBreakers(BreakerConfig(failure_threshold=1))
    breakers.settle(a.actor_id.hex(), False)
    route = with_excluded(route_kwarg(region="eu-west-1"), breakers.admit()[0])
    ranks = await router.choose_replicas([a, b], request(route))
    assert [[r.replica_id.unique_id for r in rank] for rank in ranks] == [["b"]]
    breakers.settle(b.actor_id.hex(), False)
    route = with_excluded(route_kwarg(region="eu-west-1"), breakers.admit()[0])
    ranks = await router.choose_replicas([a, b], request(route))
    assert ranks == [[a, b]]


async def test_strategy_override_and_routing_stats(router: FleetRequestRouter) -> None:
    fast = replica("fast", "eu-west-1", latency_ms=5.0, throughput=50.0)
    slow = replica("slow", "us-east-1", latency_ms=80.0, throughput=5.0)
    hints = route_kwarg(region="us-east-1", strategy=Strategy.PERFORMANCE)
    ranks = await router.choose_replicas([slow, fast], request(hints))
    assert ranks[0][0].replica_id.unique_id == "fast"
    geo = await router.choose_replicas([slow, fast], request(route_kwarg(region="us-east-1")))
    assert geo[0][0].replica_id.unique_id == "slow"


async def test_completed_requests_feed_the_outcome_report(router: FleetRequestRouter) -> None:
    a = replica("a", "us-east-1")
    await router.choose_replicas([a], request())
    router.on_request_completed(a.replica_id, "i-1")
    router.on_request_completed(a.replica_id, "unknown")  # never chosen here: ignored
    outcomes = router._fleet.take_outcomes()
    assert outcomes["a"][0] == 1 and outcomes["a"][2] >= 0
