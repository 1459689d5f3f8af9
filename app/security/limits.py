"""Per-key limits, cluster-wide: requests and tokens per minute, and concurrent requests.

The shared counts live in a `Bank` (the region's KV store in production, app.security.bank).
A process does not ask the bank per request: it leases a share of a key's minute budget
(`lease_fraction`, at least what the request needs) and spends it locally, so the store sees
one call per lease. A lease left unspent when its minute ends is lost, which keeps every
process's share inside the key's limit; the cost is that a key spread over many processes may
be refused a few requests short of its limit near the end of a minute. Concurrency slots are
leased one at a time and handed back when the process has had a free one for `idle_s`; each
process's holding expires in the bank unless renewed, so a crashed process frees its slots.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from app.api.errors import RateLimitError
from app.security.keys import KeyLimits

MINUTE_S = 60.0
HOLD_TTL_S = 30.0  # a process's concurrency holding expires unless renewed this often


class Bank(ABC):
    """The cluster's shared counts."""

    @abstractmethod
    async def take(self, counter: str, wanted: int, limit: int, ttl_s: float) -> tuple[int, int]:
        """Add up to `wanted` to `counter` without passing `limit`; returns (granted, count
        after). The counter expires `ttl_s` after its creation."""

    @abstractmethod
    async def hold(
        self, counter: str, holder: str, count: int, limit: int, ttl_s: float
    ) -> tuple[int, int]:
        """Set `holder`'s share of `counter` to `count`: always when that is no more than it
        holds, else as much as `limit` leaves beside the other holders' unexpired shares (and
        at least what it held). Renews the holding for `ttl_s`; returns (its share, total)."""


@dataclass
class _Window:
    """This process's lease of one key's budget of one kind for one minute."""

    minute: int
    local: int = 0  # leased and not yet spent
    used: int = 0  # the bank's count after our last lease


@dataclass
class _Slots:
    limit: int
    leased: int = 0
    busy: int = 0
    free_since: float | None = None
    renewed_s: float = 0.0


@dataclass
class Permit:
    """One admitted request's claim: call `finish` once with the tokens it really used."""

    limiter: Limiter
    key_id: str
    limits: KeyLimits
    tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = False
    # Told the tokens finally charged (the usage if known, else the estimate): usage records.
    on_done: Callable[[int], None] | None = None

    async def finish(self, used_tokens: int | None = None) -> None:
        if self.done:
            return
        self.done = True
        if self.on_done is not None:
            self.on_done(self.tokens if used_tokens is None else used_tokens)
        await self.limiter._finish(self, used_tokens)


class Limiter:
    """One process's view of every key's limits."""

    def __init__(
        self,
        bank: Bank,
        holder: str,
        lease_fraction: float = 0.05,
        idle_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bank = bank
        self.holder = holder
        self.lease_fraction = lease_fraction
        self.idle_s = idle_s
        self.clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._slots: dict[str, _Slots] = {}

    async def admit(self, key_id: str, limits: KeyLimits, tokens: int) -> Permit:
        """Claim one request and `tokens` (an estimate) for the key; RateLimitError (429 with
        Retry-After and the x-ratelimit headers) when a limit is reached."""
        tokens = max(0, tokens)
        if limits.tokens_per_minute is not None:
            tokens = min(tokens, limits.tokens_per_minute)  # the most one minute can grant
        headers: dict[str, str] = {}
        taken: list[tuple[str, int]] = []
        try:
            for kind, limit, amount in (
                ("requests", limits.requests_per_minute, 1),
                ("tokens", limits.tokens_per_minute, tokens),
            ):
                if limit is None:
                    continue
                await self._spend(key_id, kind, limit, amount, headers)
                taken.append((kind, amount))
            if limits.max_concurrent is not None:
                await self._occupy(key_id, limits.max_concurrent)
        except RateLimitError:
            for kind, amount in taken:  # what this refused request took goes back
                self._refund(key_id, kind, amount)
            raise
        return Permit(self, key_id, limits, tokens, headers)

    async def _spend(
        self, key_id: str, kind: str, limit: int, amount: int, headers: dict[str, str]
    ) -> None:
        now = self.clock()
        minute = int(now // MINUTE_S)
        window = self._windows.get((key_id, kind))
        if window is None or window.minute != minute:
            window = self._windows[(key_id, kind)] = _Window(minute)
        if window.local < amount:
            lease = max(amount - window.local, math.ceil(limit * self.lease_fraction))
            counter = f"ratelimit:{key_id}:{kind}:{minute}"
            granted, window.used = await self.bank.take(counter, lease, limit, 2 * MINUTE_S)
            window.local += granted
        reset_s = (minute + 1) * MINUTE_S - now
        if window.local < amount:
            raise RateLimitError(
                f"rate limit reached for this key: {limit} {kind} per minute; retry in "
                f"{math.ceil(reset_s)}s",
                retry_after_s=max(1, math.ceil(reset_s)),
                limit_headers=_headers(kind, limit, limit - window.used + window.local, reset_s),
            )
        window.local -= amount
        headers.update(_headers(kind, limit, limit - window.used + window.local, reset_s))

    def _refund(self, key_id: str, kind: str, amount: int) -> None:
        window = self._windows.get((key_id, kind))
        if window is not None and window.minute == int(self.clock() // MINUTE_S):
            window.local += amount

    async def _occupy(self, key_id: str, limit: int) -> None:
        slots = self._slots.setdefault(key_id, _Slots(limit))
        slots.limit = limit
        if slots.busy >= slots.leased:
            counter = f"concurrency:{key_id}"
            want = slots.busy + 1
            held, _ = await self.bank.hold(counter, self.holder, want, limit, HOLD_TTL_S)
            slots.leased, slots.renewed_s = held, self.clock()
            if held < want:
                raise RateLimitError(
                    f"this key already has {limit} requests in flight (its max_concurrent); "
                    "retry when one finishes",
                    retry_after_s=1,
                )
        slots.busy += 1
        slots.free_since = None

    async def _finish(self, permit: Permit, used_tokens: int | None) -> None:
        limits = permit.limits
        if limits.tokens_per_minute is not None and used_tokens is not None:
            if used_tokens < permit.tokens:
                self._refund(permit.key_id, "tokens", permit.tokens - used_tokens)
            elif used_tokens > permit.tokens:
                # Spent already: charge what the estimate missed, even past the limit.
                window = self._windows.get((permit.key_id, "tokens"))
                if window is not None:
                    window.local -= used_tokens - permit.tokens
        if limits.max_concurrent is not None:
            slots = self._slots[permit.key_id]
            slots.busy -= 1
            if slots.busy < slots.leased and slots.free_since is None:
                slots.free_since = self.clock()
            await self.maintain(permit.key_id)

    async def maintain(self, key_id: str | None = None) -> None:
        """Hand back concurrency slots free for `idle_s`, and renew the holdings still in use
        before they expire (call it now and then; every finished request does)."""
        now = self.clock()
        for kid, slots in list(self._slots.items()):
            if key_id is not None and kid != key_id:
                continue
            idle = slots.free_since is not None and now - slots.free_since >= self.idle_s
            stale = slots.leased and now - slots.renewed_s >= HOLD_TTL_S / 3
            if (idle and slots.leased > slots.busy) or stale:
                keep = slots.busy if idle else slots.leased
                held, _ = await self.bank.hold(
                    f"concurrency:{kid}", self.holder, keep, slots.limit, HOLD_TTL_S
                )
                slots.leased, slots.renewed_s = held, now
                if slots.busy >= slots.leased:
                    slots.free_since = None


def _headers(kind: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    """OpenAI's rate-limit headers for one kind (requests or tokens)."""
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{max(0.0, reset_s):.0f}s",
    }
