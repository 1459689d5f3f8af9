"""The cache every process uses: an L1 in process memory in front of the shared L2 tiers, with
read-through loading (single flight across the cluster), coherent invalidation and degradation.

    cache = Cache(CacheConfig.from_env())
    value = await cache.get_or_load("user:42", load_user)   # loader runs once cluster-wide
    await cache.invalidate_prefix("user:")                   # gone from L2 and every L1

Nothing the cache does fails a caller: an unreachable or slow tier is skipped for
`retry_after_s` (reads fall back to L1 and the loader, writes are dropped), and every such
event is counted. Only bad arguments and the loader's own errors reach the caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice
from typing import Any, TypeVar

from app.cache import codec
from app.cache.config import CacheConfig, TierKind
from app.cache.invalidation import Invalidation, Scope, invalidation
from app.cache.lru import CacheArgumentError, LRUStore
from app.cache.stats import CacheStats, Event, MetricsExporter, WarningLimiter
from app.cache.tiers import Found, Refused, Tier

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_KEY_BYTES = 1024
_MISSING: Any = object()
L1 = "l1"
LOADER = "loader"


def make_tiers(config: CacheConfig) -> list[Tier]:
    tiers: list[Tier] = []
    for kind in config.tiers:
        if kind is TierKind.ACTORS:
            from app.cache.actor_tier import ActorTier

            tiers.append(ActorTier(config))
        else:
            from app.cache.redis_tier import RedisTier

            tiers.append(RedisTier(config))
    return tiers


def check_key(key: object) -> str:
    if type(key) is not str:
        raise CacheArgumentError(f"cache keys must be str, not {type(key).__name__}")
    if not key:
        raise CacheArgumentError("cache keys must not be empty")
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise CacheArgumentError(f"cache key is over {MAX_KEY_BYTES} bytes: {key[:40]!r}...")
    return key


class Cache:
    """L1 + L2 tiers. Use from one event loop; the L1 itself is also safe across threads."""

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        tiers: list[Tier] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CacheConfig.from_env()
        self.id = uuid.uuid4().hex  # this process's origin in invalidation logs
        self.l1 = LRUStore(self.config.l1_max_entries, self.config.l1_max_bytes, clock=clock)
        self.tiers = make_tiers(self.config) if tiers is None else tiers
        self.stats = CacheStats()
        self._clock = clock
        self._ready = [False] * len(self.tiers)
        self._down_until = [0.0] * len(self.tiers)
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        # Bumped by every invalidation applied to L1: a fill that read L2 before an
        # invalidation arrived must not land in L1 after it.
        self.generation = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._starting: asyncio.Task[None] | None = None
        self._exporter = MetricsExporter(self.config.name)
        self._exported_at = 0.0
        self._warnings = WarningLimiter(logger, clock=clock)
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect every tier and start the invalidation pollers (idempotent)."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)

    def start_soon(self) -> None:
        """Start in the background: requests meanwhile use L1 and the loader only."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        for i, tier in enumerate(self.tiers):
            try:
                await tier.connect()
                self._ready[i] = True
            except Exception as exc:
                self._failed(i, exc)
                self._tasks.append(asyncio.create_task(self._reconnect(i)))
                continue
            self._start_pollers(i)

    def _start_pollers(self, i: int) -> None:
        for channel in range(self.tiers[i].channels):
            self._tasks.append(asyncio.create_task(self._poll_loop(i, channel)))

    async def _reconnect(self, i: int) -> None:
        while not self._ready[i] and not self._closed:
            await asyncio.sleep(self.config.retry_after_s)
            try:
                await self.tiers[i].connect()
            except Exception as exc:
                self._failed(i, exc)
                continue
            self._ready[i] = True
            self._start_pollers(i)

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for tier in self.tiers:
            try:
                await tier.close()
            except Exception:
                logger.debug("closing %s failed", tier.kind, exc_info=True)

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """The value from L1, else from the first L2 tier that has it (filling the tiers above
        it and L1), else `default`."""
        value = self.l1.get(check_key(key), _MISSING)
        if value is not _MISSING:
            self.stats.add(L1, Event.HIT)
            return value
        self.stats.add(L1, Event.MISS)
        found = await self._get_l2(key, 0, self.generation)
        return default if found is None else found

    async def get_or_load(
        self, key: str, loader: Callable[[], Awaitable[T]], ttl_s: float | None = _MISSING
    ) -> T:
        """The cached value, or the loader's result (cached for ttl_s). Concurrent misses on
        one key share one loader run in this process and, through a lease in the key's L2
        shard, across the cluster: the others wait for its value."""
        value = self.l1.get(check_key(key), _MISSING)
        if value is not _MISSING:
            self.stats.add(L1, Event.HIT)
            return value
        self.stats.add(L1, Event.MISS)
        pending = self._inflight.get(key)
        if pending is not None:
            self.stats.add(L1, Event.WAITED)
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await self._load_through(key, loader, self._ttl(ttl_s))
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[key]

    async def _load_through(
        self, key: str, loader: Callable[[], Awaitable[Any]], ttl_s: float | None
    ) -> Any:
        generation = self.generation
        lead = self._first_usable()
        token: str | None = None
        if lead is not None:
            wait = self.config.load_wait_s
            outcome = await self._call(
                lead, self.tiers[lead].get_or_lease(key, wait), wait + self.config.op_timeout_s
            )
            if outcome is not _MISSING:
                found, token = outcome
                if found is not None:
                    value = self._hit(lead, key, found, generation)
                    if value is not _MISSING:
                        return value  # else undecodable: load, and overwrite it everywhere
                self.stats.add(self.tiers[lead].kind, Event.MISS)
                value = await self._get_l2(key, lead + 1, generation, fill_token=token)
                if value is not None:
                    return value
        try:
            value = await loader()
        except BaseException:
            self.stats.add(LOADER, Event.LOAD_ERROR)
            if token is not None and lead is not None:
                await self._call(lead, self.tiers[lead].release(key, token))
            raise
        self.stats.add(LOADER, Event.LOAD)
        blob = codec.encode(value)
        await self._write(key, blob, ttl_s, lead, token)
        self._fill_l1(key, value, len(blob), ttl_s, generation)
        return value

    async def _get_l2(
        self, key: str, start: int, generation: int, fill_token: str | None = None
    ) -> Any:
        for i in range(start, len(self.tiers)):
            if not self._usable(i):
                continue
            found = await self._call(i, self.tiers[i].get(key))
            if found is _MISSING or found is None:
                self.stats.add(self.tiers[i].kind, Event.MISS)
                continue
            value = self._hit(i, key, found, generation)
            if value is _MISSING:
                continue
            for upper in range(i):  # backfill the faster tiers (the lead ends its lease)
                if self._usable(upper):
                    token = fill_token if upper == start - 1 else None
                    await self._call(upper, self.tiers[upper].set(key, found[0], found[1], token))
            return value
        return None

    def _hit(self, i: int, key: str, found: Found, generation: int) -> Any:
        """The value of a tier's blob (filling L1), or _MISSING when it does not decode."""
        blob, ttl_s = found
        kind = self.tiers[i].kind
        try:
            value = codec.decode(blob)
        except codec.UndecodableValue as exc:
            self.stats.add(kind, Event.REJECTED)
            self._warnings.warn(key, "cache: %s value of key %.200r unused: %s", kind, key, exc)
            return _MISSING
        self.stats.add(kind, Event.HIT)
        self._fill_l1(key, value, len(blob), ttl_s, generation)
        return value

    # ---- writes ------------------------------------------------------------------------------

    async def set(self, key: str, value: Any, ttl_s: float | None = _MISSING) -> None:
        """Store a new value everywhere; other processes drop their L1 copy of the key."""
        ttl = self._ttl(ttl_s)
        blob = codec.encode(value)
        self.l1.set(check_key(key), value, len(blob), self._l1_ttl(ttl))
        self.stats.add(L1, Event.SET)
        puts = [
            self._call(i, self.tiers[i].put(key, blob, ttl, self.id))
            for i in range(len(self.tiers))
            if self._usable(i, count_drop=True)
        ]
        await asyncio.gather(*puts)

    async def _write(
        self, key: str, blob: bytes, ttl_s: float | None, lead: int | None, token: str | None
    ) -> None:
        writes = [
            self._call(i, tier.set(key, blob, ttl_s, token if i == lead else None))
            for i, tier in enumerate(self.tiers)
            if self._usable(i, count_drop=True)
        ]
        await asyncio.gather(*writes)

    def _fill_l1(
        self, key: str, value: Any, size: int, ttl_s: float | None, generation: int
    ) -> None:
        if generation == self.generation:
            self.l1.set(key, value, size, self._l1_ttl(ttl_s))

    def _ttl(self, ttl_s: float | None) -> float | None:
        ttl = self.config.default_ttl_s if ttl_s is _MISSING else ttl_s
        if ttl is not None and ttl <= 0:
            raise CacheArgumentError(f"ttl_s must be positive or None, not {ttl}")
        return ttl

    def _l1_ttl(self, ttl_s: float | None) -> float:
        return self.config.l1_ttl_s if ttl_s is None else min(ttl_s, self.config.l1_ttl_s)

    # ---- invalidation ------------------------------------------------------------------------

    async def invalidate(self, key: str) -> int:
        return await self._invalidate(Scope.KEY, check_key(key))

    async def invalidate_prefix(self, prefix: str) -> int:
        return await self._invalidate(Scope.PREFIX, prefix)

    async def invalidate_glob(self, pattern: str) -> int:
        return await self._invalidate(Scope.GLOB, pattern)

    async def _invalidate(self, scope: Scope, text: str) -> int:
        """Remove from this L1 now and from every L2 tier, which logs it for the other L1s.
        Returns the keys removed from L2 (a tier that cannot be reached counts an error)."""
        entry = invalidation(scope, text, self.id)
        self._apply(entry)
        results = await asyncio.gather(
            *(
                self._call(i, tier.invalidate(entry))
                for i, tier in enumerate(self.tiers)
                if self._usable(i, count_drop=True)
            )
        )
        self.stats.add(L1, Event.INVALIDATION)
        return sum(r for r in results if r is not _MISSING)

    def _apply(self, entry: Invalidation) -> None:
        self.generation += 1
        if entry.scope is Scope.KEY:
            self.l1.delete(entry.text)
        elif entry.scope is Scope.ALL:
            self.l1.clear()
        else:
            self.l1.delete_where(entry.matches)

    def flush_l1(self) -> None:
        self.generation += 1
        self.l1.clear()
        self.stats.add(L1, Event.FLUSH)

    async def _poll_loop(self, i: int, channel: int) -> None:
        tier, wait = self.tiers[i], self.config.poll_wait_s
        healthy = False  # nothing to flush before the first poll gave us a position
        # The flag, not only cancellation: on Python 3.11 a cancel that lands as a deadline
        # expires surfaces as TimeoutError.
        while not self._closed:
            try:
                async with asyncio.timeout(wait + self.config.op_timeout_s):
                    entries, flush = await tier.poll(channel, wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                self._failed(i, exc)
                if healthy:  # invalidations may be passing us by: drop what they could hit
                    self.flush_l1()
                healthy = False
                await asyncio.sleep(self.config.retry_after_s)
                continue
            healthy = True
            if flush:
                self.flush_l1()
            for entry in entries:
                if entry.origin != self.id:
                    self._apply(entry)
            self._export()

    # ---- warm-up and statistics -----------------------------------------------------------

    async def warm(
        self,
        keys: Iterable[str],
        loader: Callable[[str], Awaitable[Any]],
        *,
        ttl_s: float | None = _MISSING,
        batch_size: int | None = None,
    ) -> int:
        """Load every key that is not cached, at most batch_size at once; returns how many
        keys are now cached (a key whose loader fails is counted as a load error, skipped)."""
        size = batch_size or self.config.warm_batch_size
        if size < 1:
            raise CacheArgumentError(f"batch_size must be at least 1, not {size}")
        warmed = 0
        for batch in _batches(keys, size):
            results = await asyncio.gather(
                *(self.get_or_load(key, _bind(loader, key), ttl_s) for key in batch),
                return_exceptions=True,
            )
            warmed += sum(not isinstance(r, BaseException) for r in results)
        return warmed

    def snapshot(self) -> dict[str, Any]:
        """Per-tier event counts plus the L1's size, evictions and expirations."""
        self._sync_l1_counts()
        return {
            "tiers": self.stats.snapshot(),
            "l1": {"entries": len(self.l1), "bytes": self.l1.bytes},
            "down": [t.kind for i, t in enumerate(self.tiers) if not self._usable(i)],
        }

    async def shard_stats(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for i, tier in enumerate(self.tiers):
            if self._ready[i]:
                out.extend(await tier.stats())
        return out

    def _sync_l1_counts(self) -> None:
        self.stats.counts[(L1, Event.EVICTION)] = self.l1.evictions
        self.stats.counts[(L1, Event.EXPIRATION)] = self.l1.expirations

    def _export(self) -> None:
        now = time.monotonic()
        if now - self._exported_at >= self.config.poll_wait_s:
            self._exported_at = now
            self._sync_l1_counts()
            self._exporter.flush(self.stats)

    # ---- degradation -------------------------------------------------------------------------

    def _first_usable(self) -> int | None:
        return next((i for i in range(len(self.tiers)) if self._usable(i)), None)

    def _usable(self, i: int, count_drop: bool = False) -> bool:
        usable = self._ready[i] and time.monotonic() >= self._down_until[i]
        if not usable and count_drop:
            self.stats.add(self.tiers[i].kind, Event.DROPPED_WRITE)
        return usable

    async def _call(self, i: int, op: Awaitable[Any], timeout_s: float | None = None) -> Any:
        """Run one tier operation under a deadline; a failure marks the tier down for a while
        and returns _MISSING instead of raising."""
        try:
            async with asyncio.timeout(timeout_s or self.config.op_timeout_s):
                return await op
        except asyncio.CancelledError:
            raise
        except Refused as exc:  # one value, not the tier: it stays up
            self.stats.add(self.tiers[i].kind, exc.event)
            return _MISSING
        except Exception as exc:
            self._failed(i, exc)
            return _MISSING

    def _failed(self, i: int, exc: BaseException) -> None:
        tier = self.tiers[i]
        self.stats.add(tier.kind, Event.ERROR)
        if time.monotonic() >= self._down_until[i]:
            logger.warning(
                "cache tier %s failed (%s: %s); skipping it for %.1fs",
                tier.kind,
                type(exc).__name__,
                tier.redact(str(exc)),
                self.config.retry_after_s,
            )
        self._down_until[i] = time.monotonic() + self.config.retry_after_s


def _batches(keys: Iterable[str], size: int) -> Iterable[list[str]]:
    it = iter(keys)
    while batch := list(islice(it, size)):
        yield batch


def _bind(loader: Callable[[str], Awaitable[Any]], key: str) -> Callable[[], Awaitable[Any]]:
    return lambda: loader(key)
