"""The cache tier on real Ray: cache actors as L2, caches in separate processes (actors) with
their own L1s: cluster-wide single flight, broadcast invalidation, TTLs, a shard restart."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import ray

from app.cache import Cache, CacheConfig
from app.cache.actor_tier import shard_handles, shutdown_shards
from app.cache.stats import Event


def config(name: str) -> CacheConfig:
    return CacheConfig(name=name, namespace="app-cache-tests", poll_wait_s=0.2, retry_after_s=0.2)


class CacheUser:
    """A process with its own Cache (and so its own L1), as a replica or a Ray job has."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.cache = Cache(CacheConfig.model_validate(settings))

    async def start(self) -> int:
        await self.cache.start()
        return os.getpid()

    async def load_many(self, key: str, n: int, delay_s: float) -> tuple[list[Any], int]:
        async def loader() -> str:
            await asyncio.sleep(delay_s)
            return f"loaded by {os.getpid()}"

        values = await asyncio.gather(*(self.cache.get_or_load(key, loader) for _ in range(n)))
        return list(values), self.cache.stats.get("loader", Event.LOAD)

    async def get(self, key: str) -> Any:
        return await self.cache.get(key)

    async def l1_keys(self) -> list[str]:
        return self.cache.l1.lru_order()

    async def invalidate_prefix(self, prefix: str) -> int:
        return await self.cache.invalidate_prefix(prefix)


@pytest.fixture
def users(ray_cluster: object) -> Iterator[tuple[CacheConfig, list[Any]]]:
    cfg = config(f"t{uuid.uuid4().hex[:8]}")
    actor = ray.remote(num_cpus=0)(CacheUser)
    handles = [actor.remote(cfg.model_dump(mode="json")) for _ in range(2)]
    pids = ray.get([h.start.remote() for h in handles])
    assert len(set(pids) | {os.getpid()}) == 3, "each cache must live in its own process"
    yield cfg, handles
    for h in handles:
        ray.kill(h)
    shutdown_shards(cfg)


@pytest.fixture
async def driver_cache(users: tuple[CacheConfig, list[Any]]) -> AsyncIterator[Cache]:
    cache = Cache(users[0])
    await cache.start()
    yield cache
    await cache.close()


async def test_hundred_concurrent_misses_in_three_processes_load_once(
    users: tuple[CacheConfig, list[Any]], driver_cache: Cache
) -> None:
    _, handles = users
    loads = 0

    async def loader() -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.3)
        return f"loaded by {os.getpid()}"

    remote = [h.load_many.remote("hot", 40, 0.3) for h in handles]
    local = await asyncio.gather(*(driver_cache.get_or_load("hot", loader) for _ in range(20)))
    results = await asyncio.gather(*remote)
    values = list(local) + [v for vs, _ in results for v in vs]
    assert len(values) == 100 and len(set(values)) == 1
    assert loads + sum(n for _, n in results) == 1


async def test_prefix_invalidation_reaches_the_l1_of_every_process(
    users: tuple[CacheConfig, list[Any]], driver_cache: Cache
) -> None:
    _, handles = users
    for i in range(3):
        await driver_cache.set(f"user:{i}", i)
    await driver_cache.set("item:0", "keep")
    for h in handles:  # fill each process's L1 from L2

        async def filled(h: Any = h) -> bool:
            # The sets above also broadcast invalidations; one that reaches this process after
            # its fill drops the fresh copy again (coherently), so fill until the L1 keeps it.
            assert await h.get.remote("user:1") == 1 and await h.get.remote("item:0") == "keep"
            return "user:1" in await h.l1_keys.remote()

        await _until_async(filled)
    removed = await handles[0].invalidate_prefix.remote("user:")
    assert removed == 3
    for h in handles:
        await _until_async(lambda h=h: _no_user_keys(h))
        assert await h.get.remote("user:1") is None
        assert "item:0" in await h.l1_keys.remote()
    await _until_async(lambda: _true("user:1" not in driver_cache.l1))
    assert await driver_cache.get("user:1") is None


async def test_entries_expire_on_time_in_l1_and_l2(driver_cache: Cache) -> None:
    await driver_cache.set("short", "v", ttl_s=1.0)
    assert await driver_cache.get("short") == "v"
    found = await driver_cache.tiers[0].get("short")
    assert found is not None and 0 < found[1] <= 1.0
    await asyncio.sleep(1.05)
    assert "short" in driver_cache.l1  # still stored, but expired: it must not be served
    assert await driver_cache.get("short") is None
    assert await driver_cache.tiers[0].get("short") is None


async def test_a_restarted_shard_makes_every_l1_flush(
    users: tuple[CacheConfig, list[Any]], driver_cache: Cache
) -> None:
    cfg, _ = users
    await driver_cache.set("k", "v")
    flushes = driver_cache.stats.get("l1", Event.FLUSH)
    for handle in shard_handles(cfg):
        ray.kill(handle, no_restart=False)
    await _until_async(lambda: _true(driver_cache.stats.get("l1", Event.FLUSH) > flushes), 30)
    assert "k" not in driver_cache.l1
    start = time.monotonic()
    while await driver_cache.get_or_load("k2", _const("fresh")) != "fresh":
        assert time.monotonic() - start < 30


async def _no_user_keys(handle: Any) -> bool:
    return not any(k.startswith("user:") for k in await handle.l1_keys.remote())


async def _true(value: bool) -> bool:
    return value


def _const(value: str) -> Any:
    async def load() -> str:
        return value

    return load


async def _until_async(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(0.05)
