"""The inference response cache a model replica puts in front of its ModelService: a hit answers
a deterministic request from the cache tier without touching the model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from app.cache.client import Cache
from app.cache.config import CacheConfig, ResponseCachePolicy, response_cache_enabled
from app.cache.policy import (
    CACHE_STATUS_FIELD,
    CacheStatus,
    default_enabled,
    is_deterministic,
    response_key,
)
from app.catalog.cards import ModelCard
from app.ids import new_id
from app.observability.tracing import span

_ID_PREFIX = {"chat.completion": "chatcmpl", "text_completion": "cmpl"}


class ResponseCache:
    """Caches the response dicts of one model. Every response it returns is a new dict that
    carries CACHE_STATUS_FIELD; the cached object itself is never handed out."""

    def __init__(self, card: ModelCard, cache: Cache, policy: ResponseCachePolicy) -> None:
        self.card = card
        self.cache = cache
        self.policy = policy

    @classmethod
    def for_card(cls, card: ModelCard) -> ResponseCache | None:
        """The card's response cache under the process's cache config, or None when the card
        or APP_RESPONSE_CACHE turns it off."""
        policy = card.response_cache
        enabled = default_enabled(card) if policy.enabled is None else policy.enabled
        if not (enabled and response_cache_enabled()):
            return None
        cache = cls(card, Cache(CacheConfig.from_env()), policy)
        # Inside a replica's event loop: connect now, not on the first request.
        with contextlib.suppress(RuntimeError):  # no running loop: on first use instead
            cache.cache.start_soon()
        return cache

    async def serve(
        self,
        operation: str,
        req: BaseModel,
        compute: Callable[[], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        if getattr(req, "cache_bypass", False) or not is_deterministic(req):
            return await compute() | {CACHE_STATUS_FIELD: CacheStatus.BYPASS.value}
        self.cache.start_soon()
        computed = False

        async def load() -> dict[str, Any]:
            nonlocal computed
            computed = True
            return await compute()

        key = response_key(operation, self.card, req)
        with span("cache.response", operation=operation) as looked_up:
            cached = await self.cache.get_or_load(key, load, ttl_s=self.policy.ttl_s)
            looked_up.set_attribute("cache.hit", not computed)
        if computed:
            return cached | {CACHE_STATUS_FIELD: CacheStatus.MISS.value}
        return _fresh_identity(cached) | {CACHE_STATUS_FIELD: CacheStatus.HIT.value}


def _fresh_identity(response: dict[str, Any]) -> dict[str, Any]:
    """A cached completion answers a new request: it gets its own id and creation time."""
    prefix = _ID_PREFIX.get(response.get("object", ""))
    if prefix is None:
        return dict(response)
    return response | {"id": new_id(prefix), "created": int(time.time())}
