"""The region's KV store as the limiter's bank (app.security.limits.Bank): compare-and-swap
loops over small counters, each expiring with its window."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.security.limits import Bank

MAX_CAS_TRIES = 32


class ContendedError(RuntimeError):
    """A counter changed under every one of MAX_CAS_TRIES attempts."""


class KVBank(Bank):
    def __init__(self, client: Callable[[], Awaitable[Any]]) -> None:
        self.client = client  # gives the app.kv KVClient (connected on first use)

    async def take(self, counter: str, wanted: int, limit: int, ttl_s: float) -> tuple[int, int]:
        kv = await self.client()
        for _ in range(MAX_CAS_TRIES):
            current = await kv.aget_versioned(counter)
            used, version = (0, None) if current is None else (int(current[0]), current[1])
            granted = max(0, min(wanted, limit - used))
            if granted == 0:
                return 0, used
            ok, _ = await kv.acas(counter, version, used + granted, ttl=ttl_s)
            if ok:
                return granted, used + granted
        raise ContendedError(f"counter {counter} kept changing")

    async def hold(
        self, counter: str, holder: str, count: int, limit: int, ttl_s: float
    ) -> tuple[int, int]:
        kv = await self.client()
        for _ in range(MAX_CAS_TRIES):
            now = time.time()
            current = await kv.aget_versioned(counter)
            holders: dict[str, list[float]] = {} if current is None else dict(current[0])
            version = None if current is None else current[1]
            live = {h: v for h, v in holders.items() if v[1] > now}
            mine = int(live.pop(holder, [0, 0])[0])
            others = sum(int(v[0]) for v in live.values())
            share = count if count <= mine else max(mine, min(count, limit - others))
            if share > 0:
                live[holder] = [share, now + ttl_s]
            ok, _ = await kv.acas(counter, version, live, ttl=ttl_s)
            if ok:
                return share, others + share
        raise ContendedError(f"counter {counter} kept changing")
