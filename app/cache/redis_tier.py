"""Redis (one server or a Redis Cluster, through redis-py) as an L2 tier: values with PX TTLs,
load leases as SET NX keys, and the invalidation log as a capped Redis stream.

The log's keys share the hash tag {<cache name>}, so they live on one cluster slot and append
atomically through one script. Each entry carries a sequence number, so a reader that finds a
gap (trimmed entries) or a new epoch (Redis restarted empty) knows to flush its L1.

Whoever can write to Redis must not run code in the replicas: every value is sealed (HMAC,
app/cache/sealing.py) or, without a signing key, plain JSON; a value that fails the check is a
miss, deleted, counted as `rejected` and logged (rate-limited), never decoded.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from app.cache.config import CacheConfig
from app.cache.invalidation import Invalidation, Scope
from app.cache.sealing import BrokenSeal, Seal, load_signing_key
from app.cache.stats import Event, WarningLimiter
from app.cache.tiers import Found, Refused, Tier

logger = logging.getLogger(__name__)

# KEYS: seq counter, log stream. ARGV: scope, text, origin, capacity.
APPEND_LOG = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
           'seq', seq, 'scope', ARGV[1], 'text', ARGV[2], 'origin', ARGV[3])
return seq
"""
# KEYS: lease (or value). ARGV: token (or the value read). Deletes the key only while it holds
# ARGV[1]: a lease the caller still holds, a rejected value nobody has replaced since.
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


def redis_client(config: CacheConfig) -> Any:
    """A redis-py client for `redis_url`; rediss:// speaks TLS (verified with
    `redis_ssl_ca_certs` when set, else the system's CAs). Connects on first use."""
    options: dict[str, Any] = {
        "socket_timeout": config.poll_wait_s + config.op_timeout_s,
        "socket_connect_timeout": config.op_timeout_s,
    }
    if config.redis_ssl_ca_certs:
        options["ssl_ca_certs"] = config.redis_ssl_ca_certs
    url = config.redis_url.get_secret_value()
    if config.redis_cluster:
        return RedisCluster.from_url(url, **options)
    return aredis.Redis.from_url(url, **options)


def redact_url(url: str) -> str:
    """The URL with its password (in the user part or a password= parameter) shown as ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, True)]
    return parts._replace(query=urlencode(query, safe="*")).geturl()


def url_secrets(url: str) -> list[str]:
    """Every spelling of the URL's password that an error message might quote, longest first."""
    parts = urlsplit(url)
    found = [parts.password or ""] + [v for k, v in parse_qsl(parts.query) if k == "password"]
    return sorted({s for p in found for s in (p, unquote(p)) if s}, key=len, reverse=True)


class RedisTier(Tier):
    kind = "redis"
    channels = 1

    def __init__(self, config: CacheConfig, client: Any = None) -> None:
        self.config = config
        self._client = client
        self._seal = Seal(load_signing_key(config))
        self._warnings = WarningLimiter(logger)
        self._secrets = url_secrets(config.redis_url.get_secret_value())
        tag = "{" + config.name + "}"
        self._seq_key, self._log_key, self._epoch_key = f"{tag}:seq", f"{tag}:log", f"{tag}:epoch"
        self._prefix = f"{config.name}:v:"
        self._lease_prefix = f"{config.name}:l:"
        self._epoch: str | None = None
        self._last_id = "0-0"
        self._last_seq = 0
        self._append: Any = None
        self._release: Any = None
        self._announce()

    def _announce(self) -> None:
        url = redact_url(self.config.redis_url.get_secret_value())
        if self._seal.signed:
            logger.info("cache %s: Redis at %s, values sealed", self.config.name, url)
        else:
            logger.warning(
                "cache %s: Redis at %s holds unsigned JSON and no pickled values; set "
                "APP_CACHE_REDIS_SIGNING_KEY (or _FILE) so altered values are refused",
                self.config.name,
                url,
            )

    async def connect(self) -> None:
        if self._client is None:
            self._client = redis_client(self.config)
        self._append = self._client.register_script(APPEND_LOG)
        self._release = self._client.register_script(RELEASE)
        await self._client.set(self._epoch_key, uuid.uuid4().hex, nx=True)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def get(self, key: str) -> Found | None:
        """Raises Refused (a miss to the client) for a value whose seal fails, deleting it."""
        name = self._prefix + key
        async with self._client.pipeline(transaction=False) as pipe:
            stored, pttl = await pipe.get(name).pttl(name).execute()
        if stored is None:
            return None
        try:
            blob = self._seal.unseal(name, stored)
        except BrokenSeal as exc:
            await self._release(keys=[name], args=[stored])  # unless replaced meanwhile
            self._warnings.warn(
                key,
                "cache %s: refused the Redis value of key %.200r (%s); deleted it, a miss",
                self.config.name,
                key,
                exc,
            )
            raise Refused(str(exc), Event.REJECTED) from None
        return blob, (pttl / 1000 if pttl > 0 else None)

    async def set(self, key: str, blob: bytes, ttl_s: float | None, token: str | None) -> bool:
        name, lease = self._prefix + key, self._lease_prefix + key
        stored = self._seal.seal(name, blob)
        if stored is None:
            if token is not None:
                await self._release(keys=[lease], args=[token])
            raise self._unsigned(key)
        await self._client.set(name, stored, px=_px(ttl_s))
        # The lease goes only after the value is in, so a waiter never finds neither and loads
        # too. A lease that ended meanwhile (expired, or an invalidation) makes the value stale.
        if token is not None and not await self._release(keys=[lease], args=[token]):
            await self._release(keys=[name], args=[stored])  # unless replaced since
            return False
        return True

    async def put(self, key: str, blob: bytes, ttl_s: float | None, origin: str) -> None:
        name = self._prefix + key
        stored = self._seal.seal(name, blob)
        if stored is None:
            await self._client.unlink(name)  # the old value must not outlive the new one
        else:
            await self._client.set(name, stored, px=_px(ttl_s))
        await self._log(Invalidation(Scope.KEY, key, origin))
        if stored is None:
            raise self._unsigned(key)

    def _unsigned(self, key: str) -> Refused:
        self._warnings.warn(
            "\0unsigned",  # one warning a window for all such keys: it is a setting to change
            "cache %s: the value of key %.200r needs pickle, and without "
            "APP_CACHE_REDIS_SIGNING_KEY no pickle goes to Redis; kept out of it",
            self.config.name,
            key,
        )
        return Refused("pickled values need a signing key", Event.DROPPED_WRITE)

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
                return await self._recheck(key, token)
            if loop.time() >= deadline:
                return None, None
            await asyncio.sleep(pause)  # Redis has no wake-up here: poll with backoff
            pause = min(pause * 2, 0.1)

    async def _recheck(self, key: str, token: str) -> tuple[Found | None, str | None]:
        """A new lease's holder looks once more: a loader may have stored the value (and then
        released its lease) between this caller's read and its lease."""
        try:
            found = await self.get(key)
        except Refused:
            await self.release(key, token)
            raise
        if found is None:
            return None, token
        await self.release(key, token)
        return found, None

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

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _px(ttl_s: float | None) -> int | None:
    return None if ttl_s is None else max(1, int(ttl_s * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
