"""The L2 tier interface the cache client talks to; implementations are the cache actors
(app/cache/actor_tier.py) and Redis (app/cache/redis_tier.py). Values cross it as bytes."""

from __future__ import annotations

from abc import ABC, abstractmethod

from app.cache.invalidation import Invalidation
from app.cache.stats import Event

Found = tuple[bytes, float | None]
"""A value and its remaining TTL in seconds (None: no expiry)."""


class Refused(Exception):
    """A tier would not serve or store one value (it failed verification, or may not go there).
    Not a failure of the tier: the client counts `event` for it and carries on (a refused read
    is a miss, a refused write a dropped write), without marking the tier down."""

    def __init__(self, reason: str, event: Event) -> None:
        super().__init__(reason)
        self.event = event


class Tier(ABC):
    """One shared cache tier. Every method may raise (unreachable, timed out): the client
    counts the error and degrades, so implementations need not catch anything.

    A tier's invalidation log is read through `channels` independent long polls (one per
    actor shard; one Redis stream), each returning (entries, flush) where flush says entries
    were lost to this reader and its L1 must be emptied.
    """

    kind: str = "tier"
    channels: int = 1

    async def connect(self) -> None:  # noqa: B027 (a no-op hook)
        """Open connections or find actors; called once before use, off the request path."""

    async def close(self) -> None:  # noqa: B027 (a no-op hook)
        """Release connections."""

    @abstractmethod
    async def get(self, key: str) -> Found | None: ...

    @abstractmethod
    async def set(self, key: str, blob: bytes, ttl_s: float | None, token: str | None) -> bool:
        """Store a loaded value (ending the caller's lease when `token` is given)."""

    @abstractmethod
    async def put(self, key: str, blob: bytes, ttl_s: float | None, origin: str) -> None:
        """Store a new value and log the key so that other processes drop their L1 copy."""

    @abstractmethod
    async def get_or_lease(self, key: str, wait_s: float) -> tuple[Found | None, str | None]:
        """A hit, or a lease token to load the key, or (None, None) after waiting wait_s for
        another holder's load."""

    @abstractmethod
    async def release(self, key: str, token: str) -> None: ...

    @abstractmethod
    async def invalidate(self, entry: Invalidation) -> int:
        """Remove matching keys and log the invalidation; returns how many keys went."""

    @abstractmethod
    async def poll(self, channel: int, wait_s: float) -> tuple[list[Invalidation], bool]: ...

    async def stats(self) -> list[dict[str, object]]:
        return []

    def redact(self, text: str) -> str:
        """`text` (an error message) without the tier's secrets, before it is logged."""
        return text
