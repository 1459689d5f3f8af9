"""Redis as an L2 tier, against a real redis-server this module starts on a free port: single
flight and invalidation through Redis, Redis behind the actors, Redis stopped mid-test, and
values written to Redis by someone else (refused, never unpickled)."""

from __future__ import annotations

import asyncio
import logging
import pickle
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from app.cache import Cache, CacheConfig
from app.cache.actor_tier import shutdown_shards
from app.cache.stats import Event
from tests.integration.support import free_port, wait_until

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="needs redis-server (apt-get install)")


class RedisServer:
    def __init__(self, password: str | None = None) -> None:
        self.password = password
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
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password)
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


SIGNING_KEY = "cache-signing-key-for-the-tests"
RESPONSE = {"object": "list", "data": [{"index": 0, "embedding": [0.5, -0.25]}]}


class Boom:
    """Unpickling this creates a file: proof that bytes read from Redis were executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.fixture(params=["signed", "unsigned"])
async def cache(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    extra = {"redis_signing_key": SIGNING_KEY} if request.param == "signed" else {}
    cache = Cache(redis_config(redis_server.url, **extra))
    await cache.start()
    yield cache
    await cache.close()


async def test_a_poisoned_pickle_in_redis_is_never_executed_and_is_a_miss(
    cache: Cache, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "executed"
    poison = pickle.dumps(Boom(marker))
    raw, name = redis.Redis(port=redis_server.port), f"{cache.config.name}:v:resp:k"
    payloads = [poison, b"P" + poison, b"S1" + bytes(32) + b"P" + poison]
    with caplog.at_level(logging.WARNING, logger="app.cache.redis_tier"):
        for payload in payloads:
            raw.set(name, payload)
            assert await cache.get("resp:k") is None
            assert raw.get(name) is None  # deleted
    assert not marker.exists()
    assert cache.stats.get("redis", Event.REJECTED) == len(payloads)
    refused = [r for r in caplog.records if "refused the Redis value" in r.getMessage()]
    assert len(refused) == 1  # one key: one warning a window

    async def loader() -> dict[str, object]:
        return RESPONSE

    raw.set(name, poison)
    assert await cache.get_or_load("resp:k", loader) == RESPONSE  # loaded, and overwritten
    cache.l1.clear()
    assert await cache.get("resp:k") == RESPONSE and not marker.exists()
    assert cache.snapshot()["down"] == []


async def test_values_written_by_the_tier_round_trip(pair_by_mode: tuple[Cache, Cache]) -> None:
    a, b = pair_by_mode
    raw = redis.Redis(port=_port(a))
    signed = a.config.redis_signing_key is not None
    await a.set("resp", RESPONSE)
    await a.set("tuple", (1, b"raw"))
    assert await b.get("resp") == RESPONSE
    stored = raw.get(f"{a.config.name}:v:resp")
    assert stored is not None and stored.startswith(b"S1" if signed else b'J{"object"')
    if signed:
        assert await b.get("tuple") == (1, b"raw")
    else:  # pickle needs a seal: the value stays out of Redis (and in a's L1)
        assert await b.get("tuple") is None and raw.get(f"{a.config.name}:v:tuple") is None
        assert a.stats.get("redis", Event.DROPPED_WRITE) == 1
        assert await a.get("tuple") == (1, b"raw")


@pytest.fixture(params=["signed", "unsigned"])
async def pair_by_mode(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Cache, Cache]]:
    extra = {"redis_signing_key": SIGNING_KEY} if request.param == "signed" else {}
    cfg = redis_config(redis_server.url, **extra)
    a, b = Cache(cfg), Cache(cfg)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


async def test_a_tampered_seal_a_moved_value_or_an_unsealed_one_is_a_miss(
    redis_server: RedisServer,
) -> None:
    cache = Cache(redis_config(redis_server.url, redis_signing_key=SIGNING_KEY))
    await cache.start()
    raw, prefix = redis.Redis(port=redis_server.port), f"{cache.config.name}:v:"
    try:
        await cache.set("k", {"price": 1})
        await cache.set("other", {"price": 1000})
        sealed = raw.get(prefix + "k")
        assert sealed is not None
        forged = [
            sealed[:2] + bytes([sealed[2] ^ 1]) + sealed[3:],  # the tag
            sealed.replace(b"1}", b"9}"),  # the value under an intact tag
            raw.get(prefix + "other"),  # a value sealed for another key
            b'J{"price":0}',  # no seal at all
        ]
        for value in forged:
            assert value is not None
            raw.set(prefix + "k", value)
            cache.l1.clear()
            assert await cache.get("k") is None
            assert raw.get(prefix + "k") is None
        assert cache.stats.get("redis", Event.REJECTED) == len(forged)
    finally:
        await cache.close()


async def test_the_redis_password_stays_out_of_logs_and_reprs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    password, wrong = "s3cret-Redis-pass", "not-the-pass-4242"
    server = RedisServer(password=password)
    server.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="app.cache"):
            url = f"redis://:{password}@127.0.0.1:{server.port}/0"
            cache = Cache(redis_config(url, redis_signing_key=SIGNING_KEY))
            await cache.start()
            await cache.set("k", RESPONSE)
            cache.l1.clear()
            assert await cache.get("k") == RESPONSE
            await cache.close()
            denied = Cache(redis_config(url.replace(password, wrong)))
            await denied.start()  # refused by Redis: logged, and no request fails
            assert "redis" in denied.snapshot()["down"]
            assert await denied.get_or_load("k", _constant) == "loaded"
            await denied.close()
        texts = [caplog.text, repr(cache.config), str(denied.config), repr(denied.tiers[0].config)]
        assert (
            "cache tier redis failed" in caplog.text
            and f":***@127.0.0.1:{server.port}" in caplog.text
        )
        for text in texts:
            assert password not in text and wrong not in text
    finally:
        server.stop()


async def _constant() -> str:
    return "loaded"


def _port(cache: Cache) -> int:
    port = urlsplit(cache.config.redis_url.get_secret_value()).port
    assert port is not None
    return port


def _entry(key: str) -> object:
    from app.cache.invalidation import invalidation

    return invalidation("key", key, "test")


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(0.05)
