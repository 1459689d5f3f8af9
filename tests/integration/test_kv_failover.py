"""Failover on real Ray: a primary killed (ray.kill) and a node removed under concurrent load.

A history checker proves that every acknowledged majority write is readable afterwards and that
strong reads stay linearizable per key across the failover.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray

from app.kv import KVClient, key_slot
from app.kv.history import RegisterWorkload
from tests.integration.support import (
    SyncClientAsAsync,
    fully_replicated,
    run_under_fault,
    running_kv,
    wait_until,
)

pytestmark = pytest.mark.integration

NAME, NAMESPACE = "kv-failover", "app-kv-tests"


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[tuple[Any, Any, KVClient]]:
    """A worker node plus a 2-group store with 2 members per group (one per node)."""
    worker = ray_cluster.add_node(num_cpus=2, resources={"kv_worker": 1})
    ray_cluster.wait_for_nodes()
    try:
        with running_kv(NAME, health_check_interval_s=0.3, request_timeout_s=60) as client:
            yield ray_cluster, worker, client
    finally:
        if worker in ray_cluster.worker_nodes:
            ray_cluster.remove_node(worker)


def _groups(client: KVClient) -> list[dict[str, Any]]:
    return client.status()["groups"]  # type: ignore[no-any-return]


def _assert_history(workload: RegisterWorkload, final: dict[str, Any]) -> None:
    assert workload.errors == [], workload.errors[:3]
    problems = workload.check(final)
    assert problems == [], problems[:5]
    assert any(v is not None for v in final.values())


async def test_node_removal_loses_no_acknowledged_write(
    cluster: tuple[Any, Any, KVClient],
) -> None:
    ray_cluster, worker, client = cluster
    on_worker = [g["gid"] for g in _groups(client) if g["members"][0]["node_id"] == worker.node_id]
    assert on_worker, "placement should put one group's primary on the worker node"

    workload = await run_under_fault(client, "node", lambda: ray_cluster.remove_node(worker))
    final = await workload.final_values()
    _assert_history(workload, final)
    # The lost members are replaced (on the head node: colocation is allowed here).
    await asyncio.get_running_loop().run_in_executor(
        None, wait_until, lambda: fully_replicated(client), 60, "replicas to be restored"
    )


async def test_killed_primary_fails_over_fast_and_loses_nothing(
    cluster: tuple[Any, Any, KVClient],
) -> None:
    _, _, client = cluster
    coordinator = ray.get_actor(NAME, namespace=NAMESPACE)
    view = ray.get(coordinator.get_map.remote())
    gid = 0
    victim = view.groups[gid].primary
    probe = next(k for k in (f"probe:{i}" for i in range(1000)) if view.owners[key_slot(k)] == gid)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        ray.kill(victim, no_restart=True)

    workload = await run_under_fault(client, "kill", kill)
    # Failover time: from the kill to the first acknowledged majority write on that group.
    await client.aput(probe, "after")
    acked = [
        e.end
        for e in workload.history.acknowledged()
        if e.start >= killed_at[0] and e.end is not None
    ]
    assert acked and min(acked) - killed_at[0] < 10.0
    final = await workload.final_values()
    _assert_history(workload, final)
    new_view = ray.get(coordinator.get_map.remote())
    assert new_view.groups[gid].term > view.groups[gid].term
    await asyncio.get_running_loop().run_in_executor(
        None, wait_until, lambda: fully_replicated(client), 60, "replicas to be restored"
    )


def test_large_values_survive_their_primarys_death(cluster: tuple[Any, Any, KVClient]) -> None:
    """Replicas hold large values without owning them; promotion must make them its own."""
    _, _, client = cluster
    wait_until(lambda: fully_replicated(client), 60, "replicas to be restored")
    client.refresh()
    key = next(k for k in (f"big:{i}" for i in range(1000)) if client.group_of(k) == 1)
    array = np.arange(200_000, dtype=np.float64)
    client.put(key, array)
    coordinator = ray.get_actor(NAME, namespace=NAMESPACE)
    ray.kill(ray.get(coordinator.get_map.remote()).groups[1].primary, no_restart=True)
    assert np.array_equal(client.get(key), array)  # served by the promoted replica's own copy
    client.put(key + "-after", array * 2)
    assert np.array_equal(client.get(key + "-after"), array * 2)


async def test_sync_clients_on_the_direct_transport_lose_nothing_when_a_primary_dies(
    cluster: tuple[Any, Any, KVClient],
) -> None:
    """The same history check, driven by synchronous clients on worker threads: their calls
    go over the direct transport, which must fall back to Ray and fail over like actor calls."""
    _, _, client = cluster
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None, wait_until, lambda: fully_replicated(client), 60, "replicas to be restored"
    )
    client.refresh()
    sync = KVClient.connect(NAME, NAMESPACE)
    coordinator = ray.get_actor(NAME, namespace=NAMESPACE)
    victim = ray.get(coordinator.get_map.remote()).groups[0].primary
    workload = await run_under_fault(
        SyncClientAsAsync(sync),
        "direct",
        lambda: ray.kill(victim, no_restart=True),
        batched=True,
    )
    _assert_history(workload, await workload.final_values())
    stats = sync.transport_stats()
    assert stats["direct_calls"] > 200, stats
    sync.close()
