"""The L2 cache actor: one shard of the key space (by hash slot), a thin async shell around
ShardState that adds waiting: misses parked on another caller's load lease, and long polls of
the invalidation log."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from app.cache.config import CacheConfig
from app.cache.invalidation import Cursor, Invalidation, PollResult, Scope
from app.cache.shard import ShardState

Found = tuple[bytes, float | None]


class CacheShard:
    """Methods are coroutines on one event loop, so ShardState needs no lock."""

    def __init__(self, config: dict[str, Any], index: int) -> None:
        cfg = CacheConfig.model_validate(config)
        self.index = index
        self.state = ShardState(
            cfg.shard_max_entries,
            cfg.shard_max_bytes,
            lease_ttl_s=cfg.lease_ttl_s,
            log_capacity=cfg.log_capacity,
        )
        self._waiters: dict[str, asyncio.Event] = {}
        self._logged = asyncio.Event()

    async def get(self, key: str) -> Found | None:
        return self.state.get(key)

    async def set(
        self, key: str, blob: bytes, ttl_s: float | None, token: str | None = None
    ) -> bool:
        stored = self.state.set(key, blob, ttl_s, token)
        self._wake(key)
        return stored

    async def put(self, key: str, blob: bytes, ttl_s: float | None, origin: str) -> int:
        """A new value written by set(): store it and log the key, so other processes drop the
        copy in their L1. Returns the log seq."""
        seq, _ = self.state.invalidate(Invalidation(Scope.KEY, key, origin))
        self.state.set(key, blob, ttl_s)
        self._wake(key)
        self._notify_log()
        return seq

    async def get_or_lease(self, key: str, wait_s: float) -> tuple[Found | None, str | None]:
        """(value, None) on a hit; (None, token) when the caller is to load and set it with
        that token; (None, None) when another loader did not finish within wait_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            found = self.state.get(key)
            if found is not None:
                return found, None
            token = self.state.lease(key)
            if token is not None:
                return None, token
            remaining = min(deadline - loop.time(), self.state.lease_remaining(key))
            if deadline <= loop.time():
                return None, None
            event = self._waiters.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(remaining, 0.001))

    async def release(self, key: str, token: str) -> bool:
        released = self.state.release(key, token)
        self._wake(key)
        return released

    async def invalidate(self, entry: Invalidation) -> int:
        """Apply an invalidation, wake misses parked on matching keys; returns keys removed."""
        _, removed = self.state.invalidate(entry)
        for key in [k for k in self._waiters if entry.matches(k)]:
            self._wake(key)
        self._notify_log()
        return len(removed)

    async def poll(self, cursor: Cursor | None, wait_s: float) -> PollResult:
        """Invalidations after `cursor`, waiting up to wait_s for one to arrive."""
        result = self.state.poll(cursor)
        if result.entries or result.flush or cursor is None:
            return result
        logged = self._logged
        try:
            await asyncio.wait_for(logged.wait(), wait_s)
        except TimeoutError:
            return result
        return self.state.poll(cursor)

    async def stats(self) -> dict[str, Any]:
        return self.state.stats() | {"shard": self.index, "waiting": len(self._waiters)}

    def _wake(self, key: str) -> None:
        event = self._waiters.pop(key, None)
        if event is not None:
            event.set()

    def _notify_log(self) -> None:
        # Swap in a fresh event so that long polls parked on the old one all return.
        self._logged.set()
        self._logged = asyncio.Event()
