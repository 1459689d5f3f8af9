"""The cache actors as an L2 tier: keys go to shards by hash slot (CRC16, as in the KV store),
the actors are created on first use (named, detached) so every process finds the same ones."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from tenacity import retry, stop_after_attempt, wait_exponential

from app.cache.actor import CacheShard
from app.cache.config import CacheConfig
from app.cache.invalidation import Cursor, Invalidation, Scope
from app.cache.tiers import Found, Tier
from app.kv.slots import NUM_SLOTS, key_slot
from app.runtime import ON_HEAD_NODE

CONNECT_TIMEOUT_S = 60.0


def shard_name(config: CacheConfig, index: int) -> str:
    return f"{config.name}-shard-{index}"


def shard_index(key: str, num_shards: int) -> int:
    """Shards own contiguous slot ranges, as Redis Cluster nodes do."""
    return key_slot(key) * num_shards // NUM_SLOTS


# Two processes creating the same named actor at once can see a transient name conflict.
@retry(stop=stop_after_attempt(5), wait=wait_exponential(multiplier=0.1, max=2), reraise=True)
def shard_handles(config: CacheConfig) -> list[Any]:
    """The cache's actors, created when missing (get_if_exists makes creation idempotent)."""
    remote = ray.remote(CacheShard)
    return [
        remote.options(
            name=shard_name(config, i),
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=config.shard_num_cpus,
            resources=ON_HEAD_NODE,  # soft state: not a reason to keep a worker node up
            max_restarts=-1,
            max_concurrency=10_000,
        ).remote(config.shard_settings(), i)
        for i in range(config.num_shards)
    ]


def shutdown_shards(config: CacheConfig) -> int:
    """Kill the cache's actors (tests and `app down` style clean-up); returns how many."""
    killed = 0
    for i in range(config.num_shards):
        try:
            ray.kill(ray.get_actor(shard_name(config, i), namespace=config.namespace))
            killed += 1
        except ValueError:
            pass
    return killed


class ActorTier(Tier):
    kind = "actors"

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.channels = config.num_shards
        self._shards: list[Any] = []
        self._cursors: list[Cursor | None] = [None] * config.num_shards

    async def connect(self) -> None:
        shards = await asyncio.to_thread(shard_handles, self.config)
        # Ready only once every shard answers: a shard still starting would time out the first
        # requests and mark the tier down.
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.gather(*(s.stats.remote() for s in shards))
        self._shards = shards

    def _shard(self, key: str) -> Any:
        return self._shards[shard_index(key, len(self._shards))]

    async def get(self, key: str) -> Found | None:
        found: Found | None = await self._shard(key).get.remote(key)
        return found

    async def set(self, key: str, blob: bytes, ttl_s: float | None, token: str | None) -> bool:
        stored: bool = await self._shard(key).set.remote(key, blob, ttl_s, token)
        return stored

    async def put(self, key: str, blob: bytes, ttl_s: float | None, origin: str) -> None:
        await self._shard(key).put.remote(key, blob, ttl_s, origin)

    async def get_or_lease(self, key: str, wait_s: float) -> tuple[Found | None, str | None]:
        result: tuple[Found | None, str | None] = await self._shard(key).get_or_lease.remote(
            key, wait_s
        )
        return result

    async def release(self, key: str, token: str) -> None:
        await self._shard(key).release.remote(key, token)

    async def invalidate(self, entry: Invalidation) -> int:
        if entry.scope is Scope.KEY:
            removed: int = await self._shard(entry.text).invalidate.remote(entry)
            return removed
        counts = await asyncio.gather(*(s.invalidate.remote(entry) for s in self._shards))
        return sum(counts)

    async def poll(self, channel: int, wait_s: float) -> tuple[list[Invalidation], bool]:
        result = await self._shards[channel].poll.remote(self._cursors[channel], wait_s)
        self._cursors[channel] = Cursor(*result.cursor)
        return [Invalidation(*e) for e in result.entries], bool(result.flush)

    async def stats(self) -> list[dict[str, object]]:
        return list(await asyncio.gather(*(s.stats.remote() for s in self._shards)))
