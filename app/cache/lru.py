"""A bounded LRU map with per-entry TTL: the eviction logic of every cache tier (no Ray, no I/O).

Bounded by entry count and by bytes (sizes are given by the caller, who already holds the
serialised value), thread-safe through one lock that is never held across an await, and driven
by an injected clock so tests can move time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class CacheArgumentError(ValueError):
    """A cache was configured or called with an invalid argument."""


@dataclass(slots=True)
class _Entry:
    value: Any
    size: int
    expires_at: float | None


class LRUStore:
    """Least-recently-used map: `get` refreshes recency, `set` evicts the coldest entries until
    both bounds hold again, and an expired entry reads as missing (and is dropped on read).

    `evictions` counts entries pushed out by the bounds; `expirations` counts entries dropped
    because their TTL passed.
    """

    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise CacheArgumentError(f"max_entries must be at least 1, not {max_entries}")
        if max_bytes < 1:
            raise CacheArgumentError(f"max_bytes must be at least 1, not {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        """The live value of `key` (refreshing its recency), else `default`."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return default
            if entry.expires_at is not None and entry.expires_at <= self._clock():
                self._drop(key, entry)
                self.expirations += 1
                return default
            self._data.move_to_end(key)
            return entry.value

    def set(self, key: str, value: Any, size: int, ttl_s: float | None = None) -> bool:
        """Store `value` (of `size` bytes) for `ttl_s` seconds (None: until evicted).

        Returns False, storing nothing, when the value alone exceeds max_bytes.
        """
        if size < 0:
            raise CacheArgumentError(f"size must not be negative, not {size}")
        if ttl_s is not None and ttl_s <= 0:
            raise CacheArgumentError(f"ttl_s must be positive or None, not {ttl_s}")
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old.size
            if size > self.max_bytes:
                return False
            expires_at = None if ttl_s is None else self._clock() + ttl_s
            self._data[key] = _Entry(value, size, expires_at)
            self.bytes += size
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                _, cold = self._data.popitem(last=False)
                self.bytes -= cold.size
                self.evictions += 1
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            entry = self._data.pop(key, None)
            if entry is None:
                return False
            self.bytes -= entry.size
            return True

    def delete_where(self, predicate: Callable[[str], bool]) -> int:
        """Drop every key for which `predicate(key)` holds; returns how many were dropped."""
        with self._lock:
            doomed = [key for key in self._data if predicate(key)]
            for key in doomed:
                self._drop(key, self._data[key])
            return len(doomed)

    def clear(self) -> int:
        with self._lock:
            count = len(self._data)
            self._data.clear()
            self.bytes = 0
            return count

    def sweep(self) -> int:
        """Drop every expired entry now (reads drop them lazily otherwise)."""
        now = self._clock()
        with self._lock:
            doomed = [
                k for k, e in self._data.items() if e.expires_at is not None and e.expires_at <= now
            ]
            for key in doomed:
                self._drop(key, self._data[key])
            self.expirations += len(doomed)
            return len(doomed)

    def lru_order(self) -> list[str]:
        """Keys from least to most recently used (expired ones included until swept)."""
        with self._lock:
            return list(self._data)

    def entry(self, key: str) -> tuple[Any, float | None] | None:
        """The live value of `key` and its remaining seconds (None: no expiry), refreshing its
        recency; None when absent or expired."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            now = self._clock()
            if entry.expires_at is not None and entry.expires_at <= now:
                self._drop(key, entry)
                self.expirations += 1
                return None
            self._data.move_to_end(key)
            return entry.value, None if entry.expires_at is None else entry.expires_at - now

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._data[key]
        self.bytes -= entry.size
