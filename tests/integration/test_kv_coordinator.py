"""Coordinator crashes on real Ray: Ray restarts it and it rebuilds the slot map and membership
from the shard members, with no data directory. A history checker proves that every
acknowledged write stays readable and strong reads stay linearizable per key."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from app.kv import KVClient
from app.kv.history import RegisterWorkload
from tests.integration.support import (
    KV_NAMESPACE,
    fully_replicated,
    run_under_fault,
    running_kv,
    wait_until,
)

pytestmark = pytest.mark.integration

NAME = "kv-coordinator"


@pytest.fixture(scope="module")
def kv(ray_cluster: Any) -> Iterator[KVClient]:
    with running_kv(NAME, health_check_interval_s=0.3, request_timeout_s=60) as client:
        yield client


def _coordinator() -> Any:
    return ray.get_actor(NAME, namespace=KV_NAMESPACE)


def _view() -> Any:
    return ray.get(_coordinator().get_map.remote())


async def _assert_nothing_lost(workload: RegisterWorkload) -> None:
    final = await workload.final_values()
    assert workload.errors == [], workload.errors[:3]
    assert workload.check(final) == []
    assert any(v is not None for v in final.values())


async def test_killed_coordinator_restarts_and_adopts_the_members(kv: KVClient) -> None:
    before = _view()
    members = {gid: (g.primary, *g.replicas) for gid, g in before.groups.items()}

    workload = await run_under_fault(
        kv, "restart", lambda: ray.kill(_coordinator(), no_restart=False), recover_timeout=90
    )
    await _assert_nothing_lost(workload)

    after = _view()  # answered by the restarted coordinator
    assert after.epoch > before.epoch  # clients holding the old map accept the new one
    assert after.owners == before.owners
    assert {gid: (g.primary, *g.replicas) for gid, g in after.groups.items()} == members
    # A new client finds the cluster, and writes go through.
    fresh = KVClient.connect(NAME, KV_NAMESPACE)
    fresh.put("restart:new", "written after the restart")
    assert kv.get("restart:new") == "written after the restart"


async def test_coordinator_and_a_primary_die_together(kv: KVClient) -> None:
    """The restarted coordinator finds a group without a primary and finishes the failover."""
    before = _view()
    victim = before.groups[0].primary

    def crash() -> None:
        ray.kill(victim, no_restart=True)
        ray.kill(_coordinator(), no_restart=False)

    workload = await run_under_fault(kv, "both", crash, batched=True, recover_timeout=90)
    await _assert_nothing_lost(workload)
    after = _view()
    assert after.groups[0].term > before.groups[0].term
    assert after.groups[0].primary != victim
    await asyncio.get_running_loop().run_in_executor(
        None, wait_until, lambda: fully_replicated(kv), 60, "replicas to be restored"
    )


async def test_coordinator_killed_mid_migration(ray_cluster: Any) -> None:
    """The restarted coordinator finds slots still MIGRATING on the source, finishes the
    migration, and the retried move_slots call returns once it is done."""
    name = "kv-coordinator-migration"
    with running_kv(
        name, migration_batch_keys=16, health_check_interval_s=0.3, request_timeout_s=60
    ) as client:
        data = {f"mig:{i}": i for i in range(3000)}
        client.mset(data)
        coordinator = ray.get_actor(name, namespace=KV_NAMESPACE)
        view = ray.get(coordinator.get_map.remote())
        slots = [slot for slot, gid in enumerate(view.owners) if gid == 0]
        source = view.groups[0].primary
        interrupted: list[dict[int, list[int]]] = []

        def kill_mid_migration() -> None:
            moved = coordinator.move_slots.remote(slots, 1)
            wait_until(lambda: bool(ray.get(source.migrating_slots.remote())), 30, "migration")
            ray.kill(coordinator, no_restart=False)
            interrupted.append(ray.get(source.migrating_slots.remote()))
            ray.get(moved)  # retried by the restarted coordinator

        workload = await run_under_fault(
            client, "mig-w", kill_mid_migration, batched=True, recover_timeout=90
        )
        await _assert_nothing_lost(workload)
        assert interrupted[0]  # the kill landed while slots were still migrating
        assert ray.get(source.migrating_slots.remote()) == {}
        assert set(ray.get(coordinator.get_map.remote()).owners) == {1}
        assert client.mget(list(data)) == list(data.values())
        assert dict(client.scan_iter("mig:", page_size=1000)) == data  # each key exactly once


def test_members_stop_once_the_cluster_is_gone(ray_cluster: Any) -> None:
    """Members are detached (to survive coordinator restarts), so they must not outlive the
    cluster: once the coordinator is gone for good they exit on their own."""
    with running_kv("kv-gone") as client:
        view = ray.get(ray.get_actor("kv-gone", namespace=KV_NAMESPACE).get_map.remote())
        client.put("gone:a", 1)
        ray.kill(ray.get_actor("kv-gone", namespace=KV_NAMESPACE), no_restart=True)
        members = [m for g in view.groups.values() for m in g.members]
        wait_until(lambda: all(_dead(m) for m in members), 30, "members to exit")


def _dead(handle: Any) -> bool:
    try:
        ray.get(handle.ping.remote(), timeout=1)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return True
    return False
