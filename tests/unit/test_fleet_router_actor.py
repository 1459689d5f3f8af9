"""The router actor's bookkeeping (health with thresholds, drains, weights, snapshots) on the
real class, with Ray's node table replaced by a fixed one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.fleet.records import NodeRecord
from app.fleet.router_actor import FleetRouter
from app.fleet.spec import FleetSpec, LoadBalancing, Region

SPEC = FleetSpec(
    regions={"eu": Region(latitude=53, longitude=-6), "us": Region(latitude=39, longitude=-77)},
    default_region="us",
    load_balancing=LoadBalancing(failover_threshold=2, recovery_threshold=2),
)


class StaticNodesRouter(FleetRouter):
    """FleetRouter whose node table is set by the test instead of read from Ray."""

    alive: dict[str, bool]

    def _refresh_nodes(self) -> None:
        alive = getattr(self, "alive", {"n-eu": True, "n-us": True})
        self.nodes = {
            node: NodeRecord(node, node.removeprefix("n-"), None, "10.0.0.1", up)
            for node, up in alive.items()
        }

    def _ensure_loop(self) -> None:  # the test drives health checks itself
        pass


def report(rid: str, node: str, **extra: Any) -> dict[str, Any]:
    return {"replica_id": rid, "model": "echo", "node_id": node, "region": node[2:]} | extra


@pytest.fixture
async def router() -> AsyncIterator[StaticNodesRouter]:
    r = StaticNodesRouter(SPEC.model_dump(mode="json"))
    await r.heartbeat(report("a", "n-eu"))
    await r.heartbeat(report("b", "n-us"))
    yield r


async def test_unhealthy_only_after_threshold_and_healthy_after_recovery(
    router: StaticNodesRouter,
) -> None:
    await router.heartbeat(report("a", "n-eu", healthy=False))
    router._run_checks(interval=1.0)
    assert router.replicas["a"].healthy  # one failed check is below the threshold of 2
    router._run_checks(interval=1.0)
    assert not router.replicas["a"].healthy
    snapshot = await router.snapshot()
    assert snapshot["replicas"]["a"]["healthy"] is False
    await router.heartbeat(report("a", "n-eu", healthy=True))
    router._run_checks(interval=1.0)
    assert not router.replicas["a"].healthy  # recovery also needs two passed checks
    router._run_checks(interval=1.0)
    assert router.replicas["a"].healthy
    assert [e["event"] for e in router.events][-2:] == ["replica_unhealthy", "replica_healthy"]


async def test_dead_node_and_router_reported_errors_fail_checks(
    router: StaticNodesRouter,
) -> None:
    router.alive = {"n-eu": False, "n-us": True}
    await router.snapshot(outcomes={"b": [10, 9, 5.0]})  # routers saw b fail 9 of 10
    view = {r["replica_id"]: r for r in (await router.fleet())["replicas"]}
    assert view["b"]["performance"]["success_rate"] == pytest.approx(0.1)
    router._run_checks(interval=1.0)
    await router.snapshot(outcomes={"b": [10, 9, 5.0]})
    router._run_checks(interval=1.0)
    assert not router.replicas["a"].healthy and not router.replicas["b"].healthy


async def test_snapshot_versions_drains_weights_and_faults(router: StaticNodesRouter) -> None:
    first = await router.snapshot()
    assert await router.snapshot(first["version"]) is None  # nothing new for this caller
    await router.drain_node("n-eu")
    drained = await router.snapshot(first["version"])
    assert drained["drained_nodes"] == ["n-eu"] and drained["replicas"]["a"]["drained"]
    assert (await router.heartbeat(report("a", "n-eu")))["drained"] is True
    await router.set_weight("b", 2.5)
    await router.inject_fault("b", 40)
    assert (await router.heartbeat(report("b", "n-us")))["inject_latency_ms"] == 40
    assert (await router.snapshot())["replicas"]["b"]["weight"] == 2.5
    with pytest.raises(KeyError, match="unknown node"):
        await router.drain_node("n-mars")
    with pytest.raises(ValueError, match="weight"):
        await router.set_weight("b", -1)
    with pytest.raises(KeyError, match="unknown replica"):
        await router.inject_fault("zz", 1)


async def test_propagated_waits_for_every_pulling_router_to_apply_a_drain(
    router: StaticNodesRouter,
) -> None:
    first = await router.snapshot(subscriber="ingress-eu")
    await router.snapshot(first["version"], subscriber="gateway")
    version = await router.drain_node("n-eu")
    late = await router.propagated(version, timeout_s=0.2)
    assert late == {"version": version, "routers": 2, "behind": ["gateway", "ingress-eu"]}
    # Each router pulls the drain, then acknowledges it with its next pull.
    for name in ("gateway", "ingress-eu"):
        await router.snapshot(first["version"], subscriber=name)
        await router.snapshot(version, subscriber=name)
    assert (await router.propagated(version, timeout_s=0))["behind"] == []


async def test_router_latency_overrides_and_placement_is_reported(
    router: StaticNodesRouter,
) -> None:
    await router.heartbeat(report("a", "n-eu", perf={"latency_ms": 2.0, "success_rate": 1.0}))
    await router.snapshot(outcomes={"a": [4, 0, 12.0]})
    view = await router.fleet()
    a = next(r for r in view["replicas"] if r["replica_id"] == "a")
    assert a["performance"]["latency_ms"] == 12.0  # what clients see includes the network
    assert a["region"] == "eu" and a["healthy"]


async def test_a_model_fault_reaches_its_replicas_present_and_future(
    router: StaticNodesRouter,
) -> None:
    await router.inject_model_fault("echo", 300)
    assert (await router.heartbeat(report("a", "n-eu")))["inject_latency_ms"] == 300
    assert (await router.heartbeat(report("new", "n-us")))["inject_latency_ms"] == 300
    other = report("c", "n-us") | {"model": "other"}
    assert (await router.heartbeat(other))["inject_latency_ms"] == 0
    await router.inject_fault("a", 40)  # a replica's own fault wins
    assert (await router.heartbeat(report("a", "n-eu")))["inject_latency_ms"] == 40
    await router.inject_model_fault("echo", 0)
    assert (await router.heartbeat(report("new", "n-us")))["inject_latency_ms"] == 0
    with pytest.raises(ValueError, match="latency_ms"):
        await router.inject_model_fault("echo", -1)
