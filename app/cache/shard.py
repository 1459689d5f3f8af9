"""One L2 shard's state without Ray: serialised values in an LRU with TTL, load leases for single
flight, and the invalidation log. The cache actor (app/cache/actor.py) is a thin shell on this."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from app.cache.invalidation import Cursor, Invalidation, InvalidationLog, PollResult, Scope
from app.cache.lru import LRUStore


class Lease(NamedTuple):
    token: str
    expires_at: float


class ShardState:
    """Values are bytes (the client serialises), so the byte bound is exact.

    A lease names the one caller allowed to run the loader for a missing key until it stores a
    value, releases the lease, or the lease expires (a loader that died holds nobody up forever).
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        *,
        lease_ttl_s: float = 30.0,
        log_capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = LRUStore(max_entries, max_bytes, clock=clock)
        self.log = InvalidationLog(log_capacity)
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.leases_granted = 0

    def get(self, key: str) -> tuple[bytes, float | None] | None:
        """The value and its remaining TTL (so an L1 copy never outlives it), or None."""
        found = self.store.entry(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def set(self, key: str, blob: bytes, ttl_s: float | None, token: str | None = None) -> bool:
        """Store a value; with the lease's token, also end that lease. A write that carries a
        lease which is no longer current (it expired, or the key was invalidated meanwhile) is
        dropped: its loader read data from before the invalidation."""
        if token is not None:
            lease = self._leases.get(key)
            if lease is None or lease.token != token:
                return False
            del self._leases[key]
        self.sets += 1
        return self.store.set(key, blob, len(blob), ttl_s)

    def lease(self, key: str) -> str | None:
        """A new lease token for `key` unless a live lease is held by someone else."""
        held = self._leases.get(key)
        if held is not None and held.expires_at > self._clock():
            return None
        token = uuid.uuid4().hex
        self._leases[key] = Lease(token, self._clock() + self.lease_ttl_s)
        self.leases_granted += 1
        return token

    def lease_remaining(self, key: str) -> float:
        held = self._leases.get(key)
        return 0.0 if held is None else max(0.0, held.expires_at - self._clock())

    def release(self, key: str, token: str) -> bool:
        held = self._leases.get(key)
        if held is None or held.token != token:
            return False
        del self._leases[key]
        return True

    def invalidate(self, entry: Invalidation) -> tuple[int, list[str]]:
        """Apply and log an invalidation. Returns its seq and the keys it removed; leases on
        matching keys end too, so a loader that started before it cannot store stale data."""
        if entry.scope is Scope.KEY:
            removed = [entry.text] if self.store.delete(entry.text) else []
        else:
            removed = [k for k in self.store.lru_order() if entry.matches(k)]
            for key in removed:
                self.store.delete(key)
        for key in [k for k in self._leases if entry.matches(k)]:
            del self._leases[key]
        return self.log.append(entry), removed

    def poll(self, cursor: Cursor | None) -> PollResult:
        return self.log.since(cursor)

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self.store),
            "bytes": self.store.bytes,
            "max_entries": self.store.max_entries,
            "max_bytes": self.store.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "sets": self.sets,
            "evictions": self.store.evictions,
            "expirations": self.store.expirations,
            "leases_held": len(self._leases),
            "leases_granted": self.leases_granted,
            "epoch": self.log.epoch,
            "seq": self.log.seq,
        }
