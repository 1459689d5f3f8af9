"""Redis (one server or a Redis Cluster, through redis-py) as an L2 tier: values with PX TTLs,
load leases as SET NX keys, and the invalidation log as a capped Redis stream.

The log's keys share the hash tag {<cache name>}, so they live on one cluster slot and append
atomically through one script. Each entry carries a sequence number, so a reader that finds a
gap (trimmed entries) or a new epoch (Redis restarted empty) knows to flush its L1.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from app.cache.config import CacheConfig
from app.cache.invalidation import Invalidation, Scope
from app.cache.tiers import Found, Tier

# KEYS: seq counter, log stream. ARGV: scope, text, origin, capacity.
APPEND_LOG = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
           'seq', seq, 'scope', ARGV[1], 'text', ARGV[2], 'origin', ARGV[3])
return seq
"""
# KEYS: lease. ARGV: token. Deletes the lease only when the caller holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "\\*?[]"})


def redis_glob(entry: Invalidation) -> str:
    """The Redis MATCH pattern for a prefix or glob invalidation (glob syntax passes through)."""
    if entry.scope is Scope.PREFIX:
        return entry.text.translate(_GLOB_SPECIAL) + "*"
    if entry.scope is Scope.ALL:
        return "*"
    return entry.text


class RedisTier(Tier):
    kind = "redis"
    channels = 1

    def __init__(self, config: CacheConfig, client: Any = None) -> None:
        self.config = config
        self._client = client
        tag = "{" + config.name + "}"
        self._seq_key, self._log_key, self._epoch_key = f"{tag}:seq", f"{tag}:log", f"{tag}:epoch"
        self._prefix = f"{config.name}:v:"
        self._lease_prefix = f"{config.name}:l:"
        self._epoch: str | None = None
        self._last_id = "0-0"
        self._last_seq = 0
        self._append: Any = None
        self._release: Any = None

    async def connect(self) -> None:
        if self._client is None:
            options: dict[str, Any] = {
                "socket_timeout": self.config.poll_wait_s + self.config.op_timeout_s,
                "socket_connect_timeout": self.config.op_timeout_s,
            }
            if self.config.redis_cluster:
                self._client = RedisCluster.from_url(self.config.redis_url, **options)
            else:
                self._client = aredis.Redis.from_url(self.config.redis_url, **options)
        self._append = self._client.register_script(APPEND_LOG)
        self._release = self._client.register_script(RELEASE)
        await self._client.set(self._epoch_key, uuid.uuid4().hex, nx=True)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def get(self, key: str) -> Found | None:
        name = self._prefix + key
        async with self._client.pipeline(transaction=False) as pipe:
            blob, pttl = await pipe.get(name).pttl(name).execute()
        if blob is None:
            return None
        return blob, (pttl / 1000 if pttl > 0 else None)

    async def set(self, key: str, blob: bytes, ttl_s: float | None, token: str | None) -> bool:
        if token is not None and not await self._release(
            keys=[self._lease_prefix + key], args=[token]
        ):
            return False  # the lease expired or an invalidation ended it: the value is stale
        await self._client.set(self._prefix + key, blob, px=_px(ttl_s))
        return True

    async def put(self, key: str, blob: bytes, ttl_s: float | None, origin: str) -> None:
        await self._client.set(self._prefix + key, blob, px=_px(ttl_s))
        await self._log(Invalidation(Scope.KEY, key, origin))

    async def get_or_lease(self, key: str, wait_s: float) -> tuple[Found | None, str | None]:
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + wait_s, 0.005
        lease_ms = int(self.config.lease_ttl_s * 1000)
        while True:
            found = await self.get(key)
            if found is not None:
                return found, None
            token = uuid.uuid4().hex
            if await self._client.set(self._lease_prefix + key, token, nx=True, px=lease_ms):
                return None, token
            if loop.time() >= deadline:
                return None, None
            await asyncio.sleep(pause)  # Redis has no wake-up here: poll with backoff
            pause = min(pause * 2, 0.1)

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[self._lease_prefix + key], args=[token])

    async def invalidate(self, entry: Invalidation) -> int:
        if entry.scope is Scope.KEY:
            removed = int(await self._client.unlink(self._prefix + entry.text))
            await self._client.unlink(self._lease_prefix + entry.text)
        else:
            pattern = redis_glob(entry)
            removed = await self._unlink_matching(self._prefix + pattern)
            await self._unlink_matching(self._lease_prefix + pattern)
        await self._log(entry)
        return removed

    async def _unlink_matching(self, pattern: str) -> int:
        removed, batch = 0, []
        async for name in self._client.scan_iter(match=pattern, count=1000):
            batch.append(name)
            if len(batch) >= 500:
                removed += await self._unlink(batch)
                batch = []
        return removed + (await self._unlink(batch) if batch else 0)

    async def _unlink(self, names: list[Any]) -> int:
        # One UNLINK per key: in a cluster the keys of one batch live on different slots.
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.unlink(name)
            return sum(int(n) for n in await pipe.execute())

    async def _log(self, entry: Invalidation) -> None:
        await self._append(
            keys=[self._seq_key, self._log_key],
            args=[entry.scope.value, entry.text, entry.origin, self.config.log_capacity],
        )

    async def poll(self, channel: int, wait_s: float) -> tuple[list[Invalidation], bool]:
        epoch = await self._client.get(self._epoch_key)
        if epoch is None:  # Redis lost its data: everything cached from it may be stale
            await self._client.set(self._epoch_key, uuid.uuid4().hex, nx=True)
            epoch = await self._client.get(self._epoch_key)
        if epoch != self._epoch:
            fresh = self._epoch is not None
            self._epoch = epoch
            await self._seek_end()
            return [], fresh
        reply = await self._client.xread(
            {self._log_key: self._last_id}, count=1000, block=int(wait_s * 1000)
        )
        entries, flush = [], False
        for _, records in reply or []:
            for record_id, fields in records:
                seq = int(fields[b"seq"])
                flush = flush or seq > self._last_seq + 1
                self._last_id, self._last_seq = _text(record_id), seq
                entries.append(
                    Invalidation(
                        Scope(_text(fields[b"scope"])),
                        _text(fields[b"text"]),
                        _text(fields[b"origin"]),
                    )
                )
        return ([], True) if flush else (entries, False)

    async def _seek_end(self) -> None:
        last = await self._client.xrevrange(self._log_key, count=1)
        if last:
            record_id, fields = last[0]
            self._last_id, self._last_seq = _text(record_id), int(fields[b"seq"])
        else:
            self._last_id, self._last_seq = "0-0", int(await self._client.get(self._seq_key) or 0)

    async def stats(self) -> list[dict[str, object]]:
        info = await self._client.info("memory")
        return [{"tier": "redis", "used_memory": info.get("used_memory"), "seq": self._last_seq}]


def _px(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, int(ttl_s * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
