"""Redis as an L2 tier, against a real redis-server this module starts on a free port: single
flight and invalidation through Redis, Redis behind the actors, and Redis stopped mid-test."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from app.cache import Cache, CacheConfig
from app.cache.actor_tier import shutdown_shards
from app.cache.stats import Event
from tests.integration.support import free_port, wait_until

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="needs redis-server (apt-get install)")


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-cache-tests-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(REDIS),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_until(lambda: _pings(client), timeout=10, what="redis-server to answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def redis_config(url: str, **extra: object) -> CacheConfig:
    settings: dict[str, object] = {
        "name": f"r{uuid.uuid4().hex[:8]}",
        "namespace": "app-cache-tests",
        "tiers": "redis",
        "redis_url": url,
        "poll_wait_s": 0.2,
        "retry_after_s": 0.2,
    }
    return CacheConfig.model_validate(settings | extra)


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[Cache, Cache]]:
    cfg = redis_config(redis_server.url)
    a, b = Cache(cfg), Cache(cfg)
    await a.start()
    await b.start()
    await asyncio.sleep(0.3)  # both pollers hold a cursor
    yield a, b
    await a.close()
    await b.close()


async def test_redis_single_flight_over_two_caches(pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    loads = 0

    async def loader() -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.3)
        return "v"

    values = await asyncio.gather(*(c.get_or_load("hot", loader) for c in [a, b] * 50))
    assert values == ["v"] * 100 and loads == 1


async def test_redis_glob_invalidation_reaches_the_other_l1(pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    await a.set("user:1:name", "ann")
    await a.set("user:1:mail", "ann@x")
    await a.set("user:2:name", "bob")
    assert await b.get("user:1:name") == "ann" and await b.get("user:2:name") == "bob"
    assert await a.invalidate_glob("user:*:name") == 2
    await _until(lambda: "user:1:name" not in b.l1 and "user:2:name" not in b.l1)
    assert await b.get("user:1:name") is None and await b.get("user:1:mail") == "ann@x"


async def test_redis_entries_expire_on_time(pair: tuple[Cache, Cache]) -> None:
    a, b = pair
    await a.set("short", "v", ttl_s=0.5)
    assert await b.get("short") == "v"
    await asyncio.sleep(0.55)
    assert await a.get("short") is None and await b.get("short") is None


async def test_redis_behind_the_actors_backfills_them(
    ray_cluster: object, redis_server: RedisServer
) -> None:
    cfg = redis_config(redis_server.url, tiers="actors,redis")
    writer, reader = Cache(cfg), Cache(cfg)
    await writer.start()
    await reader.start()
    try:
        await writer.set("k", "v")
        await writer.tiers[0].invalidate(_entry("k"))  # gone from the actors, still in Redis
        assert await reader.get("k") == "v"
        assert reader.stats.get("redis", Event.HIT) == 1
        assert await reader.tiers[0].get("k") is not None  # backfilled into the actors
    finally:
        await writer.close()
        await reader.close()
        shutdown_shards(cfg)


async def test_redis_stopped_mid_test_fails_no_request() -> None:
    server = RedisServer()
    server.start()
    cache = Cache(redis_config(server.url, op_timeout_s=0.3))
    await cache.start()
    loads = 0

    async def loader() -> int:
        nonlocal loads
        loads += 1
        return loads

    try:
        await cache.set("before", "x")
        server.stop()
        deadline = time.monotonic() + 2.0
        i = 0
        while time.monotonic() < deadline:  # every call answers; none raises
            assert await cache.get_or_load(f"k{i}", loader) is not None
            await cache.set(f"s{i}", i)
            assert await cache.get(f"s{i}") == i  # from L1
            await cache.invalidate_prefix("s")
            i += 1
        assert cache.stats.get("redis", Event.ERROR) >= 1
        assert cache.stats.get("redis", Event.DROPPED_WRITE) >= 1
        assert cache.stats.get("l1", Event.FLUSH) >= 1
        server.start()  # a fresh, empty Redis: the cache uses it again
        await _until(lambda: "redis" not in cache.snapshot()["down"], timeout=10)
        await asyncio.sleep(0.5)
        await cache.set("after", "y")
        assert redis.Redis(port=server.port).get(f"{cache.config.name}:v:after") is not None
    finally:
        await cache.close()
        server.stop()


def _entry(key: str) -> object:
    from app.cache.invalidation import invalidation

    return invalidation("key", key, "test")


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(0.05)
