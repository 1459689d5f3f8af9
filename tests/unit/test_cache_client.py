"""Cache (L1 + tiers) without Ray: the tier is the real CacheShard class run in process behind a
Tier subclass, so single flight, invalidation and degradation run their real code paths."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest

from app.cache.actor import CacheShard
from app.cache.client import Cache
from app.cache.config import CacheConfig
from app.cache.invalidation import Cursor, Invalidation
from app.cache.lru import CacheArgumentError
from app.cache.stats import Event
from app.cache.tiers import Found, Refused, Tier

CONFIG = CacheConfig(name="unit", poll_wait_s=0.05, retry_after_s=0.05, op_timeout_s=0.5)


class LocalTier(Tier):
    """CacheShard objects called in process; `broken` makes every call fail like a dead tier."""

    kind = "actors"

    def __init__(self, shards: list[CacheShard]) -> None:
        self.shards = shards
        self.channels = len(shards)
        self.cursors: list[Cursor | None] = [None] * len(shards)
        self.broken = False

    def _shard(self, key: str) -> CacheShard:
        self._check()
        return self.shards[hash(key) % len(self.shards)]

    def _check(self) -> None:
        if self.broken:
            raise ConnectionError("tier down")

    async def get(self, key: str) -> Found | None:
        return await self._shard(key).get(key)

    async def set(self, key: str, blob: bytes, ttl_s: float | None, token: str | None) -> bool:
        return await self._shard(key).set(key, blob, ttl_s, token)

    async def put(self, key: str, blob: bytes, ttl_s: float | None, origin: str) -> None:
        await self._shard(key).put(key, blob, ttl_s, origin)

    async def get_or_lease(self, key: str, wait_s: float) -> tuple[Found | None, str | None]:
        return await self._shard(key).get_or_lease(key, wait_s)

    async def release(self, key: str, token: str) -> None:
        await self._shard(key).release(key, token)

    async def invalidate(self, entry: Invalidation) -> int:
        self._check()
        return sum([await s.invalidate(entry) for s in self.shards])

    async def poll(self, channel: int, wait_s: float) -> tuple[list[Invalidation], bool]:
        self._check()
        result = await self.shards[channel].poll(self.cursors[channel], wait_s)
        self.cursors[channel] = result.cursor
        return result.entries, result.flush


def shards() -> list[CacheShard]:
    return [CacheShard(CONFIG.shard_settings(), i) for i in range(2)]


async def started(shared: list[CacheShard]) -> tuple[Cache, LocalTier]:
    tier = LocalTier(shared)
    cache = Cache(CONFIG, tiers=[tier])
    await cache.start()
    await asyncio.sleep(0.01)  # pollers take their first cursor
    return cache, tier


async def test_concurrent_misses_across_processes_run_the_loader_once() -> None:
    shared = shards()
    (a, _), (b, _) = await started(shared), await started(shared)
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return "value"

    results = await asyncio.gather(*(c.get_or_load("k", loader) for c in [a, b] * 50))
    assert results == ["value"] * 100 and calls == 1
    assert a.stats.get("l1", Event.WAITED) + b.stats.get("l1", Event.WAITED) == 98
    await a.close()
    await b.close()


async def test_loader_error_reaches_every_waiter_and_the_next_call_retries() -> None:
    cache, _ = await started(shards())

    async def failing() -> str:
        await asyncio.sleep(0.01)
        raise RuntimeError("backend down")

    results = await asyncio.gather(
        *(cache.get_or_load("k", failing) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    assert cache.stats.get("loader", Event.LOAD_ERROR) == 1

    async def ok() -> str:
        return "fine"

    assert await cache.get_or_load("k", ok) == "fine"
    await cache.close()


async def test_set_and_prefix_invalidation_reach_the_other_l1() -> None:
    shared = shards()
    (a, _), (b, _) = await started(shared), await started(shared)
    await a.set("user:1", "old")
    assert await b.get("user:1") == "old" and "user:1" in b.l1
    await a.set("user:1", "new")  # b's L1 copy must go
    await _until(lambda: "user:1" not in b.l1)
    assert await b.get("user:1") == "new"
    await b.set("user:2", "x")
    assert await a.get("user:2") == "x"
    assert await a.invalidate_prefix("user:") == 2
    await _until(lambda: len(b.l1) == 0)
    assert await b.get("user:1") is None and await b.get("user:2") is None
    await a.close()
    await b.close()


async def test_a_fill_that_raced_an_invalidation_stays_out_of_l1() -> None:
    cache, _ = await started(shards())
    generation = cache.generation
    await cache.invalidate("k")
    cache._fill_l1("k", "stale", 5, None, generation)
    assert "k" not in cache.l1
    await cache.close()


async def test_dead_tier_fails_no_request_and_counts_errors() -> None:
    cache, tier = await started(shards())
    await cache.set("warm", 1)
    tier.broken = True
    loads = 0

    async def loader() -> int:
        nonlocal loads
        loads += 1
        return 42

    assert await cache.get_or_load("k", loader) == 42 and loads == 1
    await cache.set("other", 2)  # dropped for the tier, kept in L1
    assert await cache.get("other") == 2
    await cache.invalidate("other")
    assert cache.stats.get("actors", Event.ERROR) >= 1
    assert cache.stats.get("actors", Event.DROPPED_WRITE) >= 1
    await _until(lambda: cache.stats.get("l1", Event.FLUSH) >= 1)  # the poller lost the log
    tier.broken = False
    await asyncio.sleep(CONFIG.retry_after_s * 2)
    assert await cache.get_or_load("fresh", loader) == 42 and loads == 2
    assert await tier.get("fresh") is not None  # the tier is used again
    await cache.close()


async def test_entries_expire_on_time_in_both_tiers() -> None:
    cache, tier = await started(shards())
    await cache.set("short", "v", ttl_s=0.2)
    assert await cache.get("short") == "v"
    await asyncio.sleep(0.25)
    assert await cache.get("short") is None and await tier.get("short") is None
    await cache.close()


async def test_warm_loads_in_bounded_batches() -> None:
    cache, _ = await started(shards())
    running = peak = 0

    async def loader(key: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        if key == "bad":
            raise ValueError(key)
        return key.upper()

    keys = [f"k{i}" for i in range(20)] + ["bad"]
    assert await cache.warm(keys, loader, batch_size=4) == 20
    assert peak == 4 and await cache.get("k7") == "K7"
    await cache.close()


async def test_bad_keys_and_ttls_are_rejected() -> None:
    cache = Cache(CONFIG, tiers=[])
    with pytest.raises(CacheArgumentError, match="must be str"):
        await cache.get(42)  # type: ignore[arg-type]
    with pytest.raises(CacheArgumentError, match="over 1024 bytes"):
        await cache.get("x" * 1025)
    with pytest.raises(CacheArgumentError, match="ttl_s"):
        await cache.set("k", 1, ttl_s=-1)
    with pytest.raises(CacheArgumentError, match="empty prefix"):
        await cache.invalidate_prefix("")


class Boom:
    """Unpickling this creates a file: proof that bytes were executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


async def test_a_blob_in_no_known_format_is_a_miss_never_unpickled(tmp_path: Path) -> None:
    cache, tier = await started(shards())
    marker = tmp_path / "executed"
    await tier.set("k", pickle.dumps(Boom(marker)), None, None)  # an older release's format
    assert await cache.get("k") is None
    assert cache.stats.get("actors", Event.REJECTED) == 1

    async def loader() -> dict[str, list[float]]:
        return {"embedding": [0.5]}

    assert await cache.get_or_load("k", loader) == {"embedding": [0.5]}
    assert cache.stats.get("actors", Event.REJECTED) == 2 and not marker.exists()
    found = await tier.get("k")  # overwritten with the loaded value, as JSON
    assert found is not None and found[0] == b'J{"embedding":[0.5]}'
    assert cache.snapshot()["down"] == []
    await cache.close()


async def test_a_refused_value_is_a_miss_and_leaves_the_tier_up() -> None:
    class RefusingTier(LocalTier):
        async def get(self, key: str) -> Found | None:
            raise Refused("the seal does not match", Event.REJECTED)

    shared = shards()
    cache = Cache(CONFIG, tiers=[RefusingTier(shared)])
    await cache.start()
    await cache.set("k", (1, 2))  # pickle: the actors may hold it
    cache.l1.clear()
    assert await cache.get("k") is None
    assert cache.stats.get("actors", Event.REJECTED) == 1
    assert cache.stats.get("actors", Event.ERROR) == 0 and cache.snapshot()["down"] == []
    await cache.close()


async def _until(condition: object, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)
