"""Cache tier: an L1 in every process, cache actors (and optionally Redis) as L2, read-through
with cluster-wide single flight, coherent invalidation; the names users import."""

from __future__ import annotations

from app.cache.client import Cache
from app.cache.config import CacheConfig, CacheConfigError, ResponseCachePolicy, TierKind
from app.cache.invalidation import Invalidation, Scope
from app.cache.lru import CacheArgumentError, LRUStore
from app.cache.stats import CacheStats, Event

__all__ = [
    "Cache",
    "CacheArgumentError",
    "CacheConfig",
    "CacheConfigError",
    "CacheStats",
    "Event",
    "Invalidation",
    "LRUStore",
    "ResponseCachePolicy",
    "Scope",
    "TierKind",
]
