"""The client's protocol engine: slot-map cache, redirects, failover retries, batching per shard.

Each operation is a generator that yields what it needs done (a Call to a shard member, an
ObjectRef to wait for, a list of those, where a list may also hold ReadMany requests, or a
Backoff to sleep) and receives the result, so the synchronous and the asyncio client drive the
very same logic. The common case is one yield: one call to a primary.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from app.kv import protocol
from app.kv.codec import decode_inline, encode
from app.kv.config import KVConfig
from app.kv.errors import DurabilityError, InvalidArgumentError, KVUnavailableError
from app.kv.pipeline import ReadMany
from app.kv.protocol import REDIRECTS, Ask, ByValue, Call, MapView, Moved, TryAgain
from app.kv.slots import NUM_SLOTS, key_slot

Op = Generator[Any, Any, Any]
# A DurabilityError comes from a member whose log failed: the coordinator replaces it, and the
# write, never acknowledged, is retried on the next primary (its request id makes that safe).
RETRYABLE = (RayActorError, GetTimeoutError, TimeoutError, ObjectLostError, DurabilityError)
_REDIRECT_TYPES = frozenset(REDIRECTS)
MISSING = object()


@dataclass(frozen=True, slots=True)
class Backoff:
    seconds: float


def _backoff(attempt: int) -> Backoff:
    return Backoff(min(0.005 * (2 ** min(attempt, 6)), 0.25) * (0.5 + random.random()))


class Router:
    """Routes calls by slot to shard groups, using a cached MapView from the coordinator."""

    def __init__(self, coordinator: Any, config: KVConfig, view: MapView) -> None:
        self.coordinator = coordinator
        self.cfg = config
        self.max_key = config.max_key_bytes
        # With the direct transport, large values are written whole (ByValue) to the primary,
        # which replicates them whole: no ray.put and no ref handed between processes.
        self.by_value = config.direct_transport
        self.view = view
        self.owners = list(view.owners)
        self.groups = view.groups

    def install(self, view: MapView) -> None:
        if view.epoch >= self.view.epoch:
            self.view, self.owners, self.groups = view, list(view.owners), view.groups

    def _deadline(self) -> float:
        return time.monotonic() + self.cfg.request_timeout_s

    def _check(self, deadline: float, why: object) -> None:
        if time.monotonic() > deadline:
            raise KVUnavailableError(f"gave up after {self.cfg.request_timeout_s}s (last: {why!r})")

    def reload(self) -> Op:
        self.install((yield self.coordinator.get_map.remote()))

    def recover(self, gid: int, term: int) -> Op:
        """A call to group `gid` failed: the coordinator checks it, fails over if needed."""
        self.install((yield self.coordinator.refresh.remote(gid, term)))

    # One key -----------------------------------------------------------------------------
    def single(self, slot: int, call: Callable[[Any, bool], Any]) -> Op:
        """Call the owner of `slot`, following MOVED/ASK and surviving failover."""
        ask, attempt, deadline = -1, 0, 0.0
        while True:
            gid = ask if ask >= 0 else self.owners[slot]
            group = self.groups.get(gid)
            if group is None:
                deadline = deadline or self._deadline()
                self._check(deadline, f"no group {gid}")
                yield from self.reload()
                yield _backoff(attempt)
                attempt, ask = attempt + 1, -1
                continue
            try:
                reply = yield call(group.primary, ask >= 0)
            except RETRYABLE as exc:
                deadline = deadline or self._deadline()
                self._check(deadline, exc)
                yield from self.recover(gid, group.term)
                if attempt:
                    yield _backoff(attempt)
                attempt, ask = attempt + 1, -1
                continue
            if type(reply) not in _REDIRECT_TYPES:
                return reply
            deadline = deadline or self._deadline()
            self._check(deadline, reply)
            attempt += 1
            ask = -1
            if type(reply) is Ask:
                ask = reply.gid
            elif type(reply) is Moved and reply.gid in self.groups and attempt < 4:
                self.owners[slot] = reply.gid
            elif type(reply) is TryAgain:
                yield _backoff(attempt)
            else:
                yield from self.reload()
                if attempt > 2:
                    yield _backoff(attempt)

    def replica_read(self, key: str, slot: int, max_lag_ms: float) -> Op:
        """Read from a random member; fall back to the primary when it is stale or unsure."""
        group = self.groups.get(self.owners[slot])
        if group is not None:
            members = group.members
            member = members[random.randrange(len(members))]
            try:
                reply = yield Call(member, "read", (key, slot, max_lag_ms))
            except RETRYABLE:
                reply = TryAgain("member unreachable")
            if type(reply) not in _REDIRECT_TYPES:
                return reply
        return (yield from self.single(slot, _get_call(key, slot)))

    def read_payload(self, key: str, read: int, max_lag_ms: float) -> Op:
        slot = key_slot(key, self.max_key)
        if read == protocol.READ_STRONG:
            return (yield from self.single(slot, _get_call(key, slot)))
        return (yield from self.replica_read(key, slot, max_lag_ms))

    def get(self, key: str, default: Any, read: int, max_lag_ms: float) -> Op:
        payload = yield from self.read_payload(key, read, max_lag_ms)
        if payload is None:
            return default
        if type(payload) is bytes:
            return decode_inline(payload)
        if type(payload) is ByValue:
            return payload.value
        values = yield from self.resolve([key], [payload], default)
        return values[0]

    def get_versioned(self, key: str) -> Op:
        slot = key_slot(key, self.max_key)
        for own in (False, True, True):
            reply = yield from self.single(
                slot,
                lambda h, a: Call(h, "get_entry", (key, slot, a, own)),  # noqa: B023
            )
            if reply is None:
                return None
            payload, version = reply
            try:
                values = yield from self.decode([payload], None)
            except ObjectLostError:
                continue  # the ref's owner died: read again, asking the primary to re-own it
            return values[0], version
        raise KVUnavailableError(f"large value of {key!r} was lost three times in a row")

    def put(self, key: str, value: Any, ttl: float | None, code: int, rid: str) -> Op:
        slot = key_slot(key, self.max_key)
        payload = encode(value, self.cfg.large_value_bytes, self.cfg.max_value_bytes, self.by_value)
        return (yield from self.single(slot, _put_call(key, slot, payload, ttl, rid, code)))

    def delete(self, key: str, code: int, rid: str) -> Op:
        slot = key_slot(key, self.max_key)
        return (
            yield from self.single(slot, lambda h, a: Call(h, "delete", (key, slot, rid, code, a)))
        )

    def cas(
        self, key: str, expected: int | None, value: Any, ttl: float | None, code: int, rid: str
    ) -> Op:
        slot = key_slot(key, self.max_key)
        payload = encode(value, self.cfg.large_value_bytes, self.cfg.max_value_bytes, self.by_value)
        reply = yield from self.single(
            slot,
            lambda h, a: Call(
                h, "cas", (key, slot, expected, payload, ttl, rid, code, a), _inline(payload)
            ),
        )
        return tuple(reply)

    # Many keys ---------------------------------------------------------------------------
    def _by_group(self, slots: list[int], todo: range | list[int]) -> dict[int, list[int]]:
        owners, groups = self.owners, self.groups
        out: dict[int, list[int]] = {}
        for i in todo:
            gid = owners[slots[i]]
            out.setdefault(gid if gid in groups else -1, []).append(i)
        return out

    def mget(self, keys: list[str], default: Any, read: int, max_lag_ms: float) -> Op:
        payloads = yield from self.mget_payloads(keys, read, max_lag_ms)
        return (yield from self.resolve(keys, payloads, default))

    def resolve(self, keys: list[str], payloads: list[Any], default: Any) -> Op:
        """Values of `keys` from their payloads. A large value's ref goes dead when its owner
        dies: the writer that put it, or a primary that died after answering. Then the keys
        are read again from their primaries, asking them to re-own what they hold."""
        for _ in range(3):
            try:
                return (yield from self.decode(payloads, default))
            except ObjectLostError:
                payloads = yield from self.mget_payloads(keys, protocol.READ_STRONG, 0.0, True)
        raise KVUnavailableError("large values were lost three times in a row")

    def mget_payloads(self, keys: list[str], read: int, max_lag_ms: float, own: bool = False) -> Op:
        """One call per shard group; keys redirected mid-migration are re-read one by one."""
        slots = [key_slot(k, self.max_key) for k in keys]
        payloads: list[Any] = [None] * len(keys)
        batches = self._by_group(slots, range(len(keys)))
        later = batches.pop(-1, [])
        calls: list[list[int]] = []
        refs: list[Call | ReadMany] = []
        for gid, idx in batches.items():
            group = self.groups[gid]
            batch = [keys[i] for i in idx]
            if own:
                refs.append(Call(group.primary, "mget", (batch, True)))
            elif read == protocol.READ_STRONG:
                refs.append(ReadMany(group.primary, batch))
            else:
                member = random.choice(group.members)
                refs.append(Call(member, "read_many", (batch, max_lag_ms)))
            calls.append(idx)
        try:
            replies = yield refs
        except RETRYABLE:
            replies = None
        if replies is None:
            later.extend(i for idx in calls for i in idx)
        else:
            for idx, reply in zip(calls, replies, strict=True):
                for i, payload in zip(idx, reply, strict=True):
                    if type(payload) in _REDIRECT_TYPES:
                        later.append(i)
                    else:
                        payloads[i] = payload
        for i in later:
            key, slot = keys[i], slots[i]
            payloads[i] = yield from self.single(slot, _get_call(key, slot, own))
        return payloads

    def decode(self, payloads: list[Any], default: Any) -> Op:
        out = [default] * len(payloads)
        where, refs = [], []
        for i, payload in enumerate(payloads):
            if payload is None:
                continue
            if type(payload) is bytes:
                out[i] = decode_inline(payload)
            elif type(payload) is ByValue:
                out[i] = payload.value
            else:
                where.append(i)
                refs.append(payload[0])
        if refs:
            for i, value in zip(where, (yield refs), strict=True):
                out[i] = value
        return out

    def mset(self, mapping: dict[str, Any], ttl: float | None, code: int, rid: str) -> Op:
        large, limit = self.cfg.large_value_bytes, self.cfg.max_value_bytes
        items = [
            (k, key_slot(k, self.max_key), encode(v, large, limit, self.by_value))
            for k, v in mapping.items()
        ]
        slots = [item[1] for item in items]
        batches = self._by_group(slots, range(len(items)))
        later = batches.pop(-1, [])
        calls, refs = [], []
        for gid, idx in batches.items():
            batch = [(items[i][0], items[i][2]) for i in idx]
            direct = all(_inline(payload) for _, payload in batch)
            refs.append(Call(self.groups[gid].primary, "mset", (batch, ttl, rid, code), direct))
            calls.append(idx)
        try:
            replies = yield refs
        except RETRYABLE:
            replies = [None] * len(refs)
        for idx, reply in zip(calls, replies, strict=True):
            if type(reply) is not list:
                later.extend(idx)
                continue
            later.extend(i for i, r in zip(idx, reply, strict=True) if type(r) in _REDIRECT_TYPES)
        for i in later:
            key, slot, payload = items[i]
            yield from self.single(slot, _put_call(key, slot, payload, ttl, f"{rid}/{key}", code))

    # Prefix scan -------------------------------------------------------------------------
    def scan(self, prefix: str, limit: int, cursor: str | None) -> Op:
        """One page of at most `limit` (key, value) pairs and the cursor of the next page."""
        slot, after = _parse_cursor(cursor)
        last = NUM_SLOTS - 1
        close = prefix.find("}", 1) if prefix.startswith("{") else -1
        if close > 1:
            # A leading, closed, non-empty hash tag pins every matching key to one slot.
            only = key_slot(prefix[: close + 1], self.max_key)
            slot, last = (max(slot, only), only) if slot <= only else (NUM_SLOTS, only)
        items: list[tuple[str, Any]] = []
        attempt, deadline = 0, 0.0
        while slot <= last and len(items) < limit:
            gid = self.owners[slot]
            end = min(self._run_end(slot), last)
            group = self.groups.get(gid)
            try:
                if group is None:
                    raise KeyError(gid)
                left = limit - len(items)
                reply = yield group.primary.scan.remote(prefix, slot, end, after, left)
            except (KeyError, *RETRYABLE) as exc:
                reply = exc
            if type(reply) is tuple:
                page, nxt = reply
                items.extend(page)
                slot, after = (end + 1, None) if nxt is None else nxt
                continue
            deadline = deadline or self._deadline()
            self._check(deadline, reply)
            attempt += 1
            if isinstance(reply, RETRYABLE) and group is not None:
                yield from self.recover(gid, group.term)
            elif type(reply) is not TryAgain:
                yield from self.reload()
            yield _backoff(attempt)
        values = yield from self.resolve([k for k, _ in items], [p for _, p in items], None)
        page_items = [(k, v) for (k, _), v in zip(items, values, strict=True)]
        more = slot <= last
        return page_items, (_cursor(slot, after) if more else None)

    def _run_end(self, slot: int) -> int:
        owners, owner, end = self.owners, self.owners[slot], slot
        while end + 1 < NUM_SLOTS and owners[end + 1] == owner:
            end += 1
        return end


def _inline(payload: Any) -> bool:
    """A payload without an ObjectRef in it (so a call carrying it may go direct)."""
    return type(payload) is not list


def _get_call(key: str, slot: int, own: bool = False) -> Callable[[Any, bool], Call]:
    if own:
        return lambda handle, asking: Call(handle, "get", (key, slot, asking, True))
    return lambda handle, asking: Call(handle, "get", (key, slot, asking))


def _put_call(
    key: str, slot: int, payload: Any, ttl: float | None, rid: str, code: int
) -> Callable[[Any, bool], Call]:
    args = (key, slot, payload, ttl, rid, code)
    return lambda handle, asking: Call(handle, "put", (*args, asking), _inline(payload))


def _cursor(slot: int, after: str | None) -> str:
    return str(slot) if after is None else f"{slot}:{after}"


def _parse_cursor(cursor: str | None) -> tuple[int, str | None]:
    if cursor is None:
        return 0, None
    try:
        head, sep, after = cursor.partition(":")
        slot = int(head)
    except (AttributeError, ValueError):
        raise InvalidArgumentError(f"not a scan cursor: {cursor!r}") from None
    if not 0 <= slot <= NUM_SLOTS:
        raise InvalidArgumentError(f"not a scan cursor: {cursor!r}")
    return slot, (after if sep else None)
