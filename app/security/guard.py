"""The check every request passes when the fleet's `auth.mode` is `keys`: a Bearer key known
to the region's KV store, not revoked, with the endpoint's scope, inside its limits.

Key records are cached per process for `auth.key_cache_s` (unknown ids too, which blunts
guessing), so the store is asked once per key and period, not per request. Without a reachable
store the guard fails closed: 503, never an open door.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from cachetools import TTLCache

from app.api.errors import AuthenticationError, PermissionDeniedError, ServiceUnavailableError
from app.security.bank import KVBank
from app.security.config import Auth, AuthMode
from app.security.keys import KeyRecord, Scope, key_id_of, matches, record_key
from app.security.limits import Bank, Limiter, Permit

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 256  # the estimate for a request that sets no max_tokens
CHARS_PER_TOKEN = 4


class KeyLookup(ABC):
    @abstractmethod
    async def fetch(self, key_id: str) -> KeyRecord | None:
        """The stored record of `key_id`, or None."""


class KVKeyLookup(KeyLookup):
    def __init__(self, client: Callable[[], Awaitable[Any]]) -> None:
        self.client = client  # gives the app.kv KVClient (connected on first use)

    async def fetch(self, key_id: str) -> KeyRecord | None:
        value = await (await self.client()).aget(record_key(key_id))
        return None if value is None else KeyRecord.model_validate(value)


class Guard:
    def __init__(
        self,
        auth: Auth,
        lookup: KeyLookup,
        limiter: Limiter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.lookup = lookup
        self.limiter = limiter
        self.clock = clock
        self.usage = UsageRecorder(limiter.bank, clock)
        self._cache: TTLCache[str, KeyRecord | None] = TTLCache(
            maxsize=100_000, ttl=max(auth.key_cache_s, 1e-6), timer=clock
        )

    async def check(self, authorization: str | None, scope: Scope, tokens: int = 0) -> Permit:
        """Admit one request: 401 without a valid key, 403 without the scope, 429 past a
        limit. The caller finishes the permit when the request ends."""
        return await self.admit(await self.authenticate(authorization), scope, tokens)

    async def admit(self, record: KeyRecord, scope: Scope, tokens: int = 0) -> Permit:
        """`check` for a key already authenticated."""
        if not record.allows(scope):
            raise PermissionDeniedError(
                f"this API key (name {record.name!r}) lacks the {scope.value!r} scope this "
                f"endpoint needs; it has {[s.value for s in record.scopes]}"
            )
        permit = await self.limiter.admit(record.key_id, record.limits, tokens)
        permit.on_done = lambda charged: self.usage.record(record.key_id, charged)
        self.usage.flush_soon()
        return permit

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        if not authorization:
            raise AuthenticationError(
                "missing API key: send it as `Authorization: Bearer <key>` (keys come from "
                "`app keys create`)"
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        key_id = key_id_of(key) if scheme.lower() == "bearer" else None
        if key_id is None:
            raise AuthenticationError(
                "malformed API key: expected `Authorization: Bearer sk-app-...`"
            )
        record = await self._record(key_id)
        if record is None or not matches(record, key):
            raise AuthenticationError("invalid API key")
        if record.revoked_s is not None:
            raise AuthenticationError(f"API key {record.key_id} was revoked")
        return record

    async def _record(self, key_id: str) -> KeyRecord | None:
        if key_id in self._cache:
            return self._cache[key_id]
        try:
            record = await asyncio.wait_for(
                self.lookup.fetch(key_id), timeout=self.auth.lookup_timeout_s
            )
        except Exception as exc:  # the store down or slow: refuse, never admit unchecked
            logger.warning("API key lookup failed: %s", type(exc).__name__)
            raise ServiceUnavailableError(
                "cannot check API keys right now (the key store is unavailable)", retry_after_s=5
            ) from exc
        if self.auth.key_cache_s > 0:
            self._cache[key_id] = record
        return record


class UsageRecorder:
    """Each key's requests and charged tokens per UTC day, added up here and written to the
    store every FLUSH_S (`app keys usage` reads them): one store call per key and period."""

    FLUSH_S = 10.0

    def __init__(self, bank: Bank, clock: Callable[[], float]) -> None:
        self.bank = bank
        self.clock = clock
        self._pending: dict[str, list[int]] = {}
        self._last = clock()
        self._task: asyncio.Task[None] | None = None

    def record(self, key_id: str, tokens: int) -> None:
        counts = self._pending.setdefault(key_id, [0, 0])
        counts[0] += 1
        counts[1] += max(0, tokens)

    def flush_soon(self) -> None:
        if self.clock() - self._last < self.FLUSH_S or (self._task and not self._task.done()):
            return
        self._last = self.clock()
        self._task = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        day = time.strftime("%Y-%m-%d", time.gmtime(self.clock()))
        for key_id, (requests, tokens) in pending.items():
            try:
                for kind, amount in (("requests", requests), ("tokens", tokens)):
                    if amount:
                        counter = usage_counter(key_id, day, kind)
                        await self.bank.take(counter, amount, 2**62, USAGE_TTL_S)
            except Exception as exc:  # usage is bookkeeping: never fail a request over it
                logger.warning("recording API key usage failed: %s", type(exc).__name__)


USAGE_TTL_S = 400 * 86400.0  # a day's usage is kept for about 13 months


def usage_counter(key_id: str, day: str, kind: str) -> str:
    return f"apikey-usage:{key_id}:{day}:{kind}"


def estimate_tokens(body_bytes: int, max_tokens: int | None, sequences: int) -> int:
    """A request's token cost before it runs: its text at ~4 characters a token plus what it
    may generate. Unary responses are charged their real usage afterwards."""
    completion = (max_tokens or DEFAULT_COMPLETION_TOKENS) * max(1, sequences)
    return body_bytes // CHARS_PER_TOKEN + completion


class LazyKV:
    """The region's KV client, connected on first use from inside the cluster."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    from app.kv import KVClient

                    self._client = await KVClient.aconnect(
                        self.auth.kv_name, self.auth.kv_namespace
                    )
        return self._client


def guard_for(auth: Auth) -> Guard | None:
    """The guard a replica or gateway uses; None when auth is off."""
    if auth.mode is AuthMode.OFF:
        return None
    kv = LazyKV(auth)
    holder = f"{os.uname().nodename}:{os.getpid()}:{id(kv):x}"
    limiter = Limiter(KVBank(kv.get), holder, lease_fraction=auth.lease_fraction)
    return Guard(auth, KVKeyLookup(kv.get), limiter)
