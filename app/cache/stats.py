"""Cache statistics: cheap in-process counters per tier and event, exported as Ray metrics, and
rate-limited warnings for events that could otherwise flood the log.

Counting is a dict increment on the hot path; `MetricsExporter.flush` turns the deltas into
ray.util.metrics counters from the cache's background loop, so a hit never touches the metrics
agent. Without a Ray connection (unit tests, tools) flushing does nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from app.observability.metrics import CACHE_EVENTS
from app.observability.recorder import create


class Event(StrEnum):
    HIT = "hit"
    MISS = "miss"
    SET = "set"
    EVICTION = "eviction"
    EXPIRATION = "expiration"
    LOAD = "load"
    LOAD_ERROR = "load_error"
    ERROR = "error"
    DROPPED_WRITE = "dropped_write"
    INVALIDATION = "invalidation"
    FLUSH = "flush"
    WAITED = "waited"
    REJECTED = "rejected"  # a value that failed verification or decoding: a miss, never used


class CacheStats:
    """Counts of (tier, event); tiers are "l1", "actors", "redis" and "loader"."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, tier: str, event: Event, n: int = 1) -> None:
        self.counts[(tier, event)] += n

    def get(self, tier: str, event: Event) -> int:
        return self.counts[(tier, event)]

    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (tier, event), n in sorted(self.counts.items()):
            out.setdefault(tier, {})[str(event)] = n
        return out


class MetricsExporter:
    """Pushes the growth of a CacheStats into one Ray counter, `app_cache_events` (the
    catalogue's CACHE_EVENTS), tagged by cache name, tier and event."""

    def __init__(self, cache_name: str) -> None:
        self.cache_name = cache_name
        self._sent: Counter[tuple[str, str]] = Counter()
        self._counter: Any = None

    def flush(self, stats: CacheStats) -> int:
        """Export what changed since the last flush; returns how many series moved."""
        import ray

        if not ray.is_initialized():
            return 0
        if self._counter is None:
            self._counter = create(CACHE_EVENTS)
        moved = 0
        for key, total in list(stats.counts.items()):
            delta = total - self._sent[key]
            if delta > 0:
                tier, event = key
                self._counter.inc(delta, {"cache": self.cache_name, "tier": tier, "event": event})
                self._sent[key] = total
                moved += 1
        return moved


class WarningLimiter:
    """Logs a warning at most once per key per window and `burst` times per window in all; what
    it holds back is counted into the next warning. Whoever can write bad values to a shared
    tier must not be able to flood every replica's log."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        window_s: float = 60.0,
        burst: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.window_s = window_s
        self.burst = burst
        self.held_back = 0
        self._clock = clock
        self._window_start = -window_s
        self._keys: set[str] = set()  # warned this window: at most `burst` of them

    def warn(self, key: str, message: str, *args: object) -> bool:
        """Log `message % args` unless `key` was warned about this window or the window's
        budget is spent; returns whether it logged."""
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self._window_start = now
            self._keys.clear()
        if key in self._keys or len(self._keys) >= self.burst:
            self.held_back += 1
            return False
        self._keys.add(key)
        if self.held_back:
            message, args = message + " (%d similar warnings held back)", (*args, self.held_back)
            self.held_back = 0
        self.logger.warning(message, *args)
        return True
