"""A shard's state machine: entries, per-slot index, slot states, TTL, versions and request ids.

The primary and its replicas apply the same ordered log of `Op`s to a `ShardStore`, so they hold
the same state. Nothing here knows about Ray: a large value's payload is an opaque handle.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from app.kv.slots import NUM_SLOTS

# Slot states, one byte per slot.
SLOT_NONE = 0  # not ours: answer MOVED
SLOT_OWNED = 1
SLOT_MIGRATING = 2  # ours, keys leaving: serve keys still here, ASK for the rest
SLOT_IMPORTING = 3  # not ours yet: serve only requests flagged ASKING

OP_PUT = "p"
OP_DELETE = "d"
OP_SLOTS = "s"
OP_NOOP = "n"
OP_REQUESTS = "r"  # request ids migrated in with their slots


class Op(NamedTuple):
    """One replicated log record. For OP_SLOTS, payload is (slots, state, peer gid); for
    OP_REQUESTS, a tuple of (request id, result, slot)."""

    seq: int
    kind: str
    key: str | None = None
    slot: int = 0
    payload: Any = None
    version: int = 0
    expires_at: float | None = None
    rid: str | None = None
    result: Any = None


@dataclass(slots=True)
class Entry:
    """A stored value. payload is pickled bytes, or [handle, size] for a large value."""

    payload: Any
    version: int
    expires_at: float | None
    slot: int
    seq: int


def payload_size(payload: Any) -> int:
    return len(payload) if type(payload) is bytes else int(payload[1])


@dataclass
class StoreSnapshot:
    """Everything a replica needs to become an exact copy of a store at `seq`."""

    seq: int
    vclock: int
    entries: list[tuple[str, Any, int, float | None, int]]
    slot_state: bytes
    slot_peer: dict[int, int]
    dedupe: list[tuple[str, tuple[Any, ...]]]  # request id -> (seq, result, slot)


class ShardStore:
    """In-memory shard data plus the log position (`seq`) and version counter (`vclock`).

    Versions come from `vclock`, which only grows (imports and replicated writes raise it too),
    so a key deleted and written again never reuses a version a compare-and-set might hold.
    """

    def __init__(self, clock: Callable[[], float] = time.time, dedupe_window: int = 100_000):
        self._clock = clock
        self._data: dict[str, Entry] = {}
        self._by_slot: dict[int, set[str]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._dedupe: OrderedDict[str, tuple[Any, ...]] = OrderedDict()  # -> (seq, result, slot)
        self._dedupe_window = dedupe_window
        self.slot_state = bytearray(NUM_SLOTS)
        self.slot_peer: dict[int, int] = {}
        self.slot_ops = [0] * NUM_SLOTS
        self.seq = 0
        self.vclock = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    # Reads -------------------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The live entry for `key`; an expired one reads as missing (the sweep drops it)."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= self._clock():
            return None
        return entry

    def raw(self, key: str) -> Entry | None:
        """The entry for `key` even if expired (migration moves those too)."""
        return self._data.get(key)

    def seen(self, rid: str) -> tuple[int, Any] | None:
        """(seq, result) of an already applied request id."""
        entry = self._dedupe.get(rid)
        return None if entry is None else (entry[0], entry[1])

    def requests_in_slots(self, slots: set[int]) -> list[tuple[str, Any, int]]:
        """(request id, result, slot) of remembered writes to `slots`: they migrate with the
        slots, so a write retried at the new owner is answered instead of applied twice.
        (Entries from snapshots written before slots were recorded have no slot.)"""
        return [
            (rid, entry[1], entry[2])
            for rid, entry in self._dedupe.items()
            if len(entry) > 2 and entry[2] in slots
        ]

    def keys_in_slot(self, slot: int) -> list[str]:
        return sorted(self._by_slot.get(slot, ()))

    def keys_in_slots(self, slots: set[int], limit: int) -> list[str]:
        """Up to `limit` keys from any of `slots`, visiting only slots that hold keys."""
        keys: list[str] = []
        for slot in sorted(s for s in self._by_slot if s in slots):
            keys.extend(sorted(self._by_slot[slot])[: limit - len(keys)])
            if len(keys) >= limit:
                break
        return keys

    def slot_keys(self) -> dict[int, int]:
        return {slot: len(keys) for slot, keys in self._by_slot.items() if keys}

    def scan(
        self, prefix: str, first: int, last: int, after: str | None, limit: int
    ) -> tuple[list[tuple[str, Any]], tuple[int, str] | None]:
        """Up to `limit` live (key, payload) pairs with `prefix`, ordered by (slot, key).

        Starts in slot `first` after key `after` and stops at slot `last`; the second value is
        where the next page starts, or None when the range is exhausted.
        """
        now = self._clock()
        items: list[tuple[str, Any]] = []
        for slot in sorted(s for s in self._by_slot if first <= s <= last):
            for key in sorted(k for k in self._by_slot[slot] if k.startswith(prefix)):
                if slot == first and after is not None and key <= after:
                    continue
                entry = self._data[key]
                if entry.expires_at is not None and entry.expires_at <= now:
                    continue
                items.append((key, entry.payload))
                if len(items) == limit:
                    return items, (slot, key)
        return items, None

    # Writes (log application) ------------------------------------------------------------
    def next_version(self) -> int:
        return self.vclock + 1

    def expires_at(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self._clock() + ttl_s

    def apply(self, op: Op) -> Entry | None:
        """Apply the next log record; returns the entry it replaced or removed, if any."""
        if op.seq != self.seq + 1:
            raise ValueError(f"log gap: at seq {self.seq}, got op {op.seq}")
        self.seq = op.seq
        removed: Entry | None = None
        if op.kind == OP_PUT:
            assert op.key is not None
            removed = self._put(
                op.key, Entry(op.payload, op.version, op.expires_at, op.slot, op.seq)
            )
        elif op.kind == OP_DELETE:
            assert op.key is not None
            removed = self._remove(op.key)
        elif op.kind == OP_SLOTS:
            slots, state, peer = op.payload
            self.set_slots(slots, state, peer)
        elif op.kind == OP_REQUESTS:
            for rid, result, slot in op.payload:
                if rid not in self._dedupe:
                    self._remember(rid, op.seq, result, slot)
        if op.rid is not None:
            self._remember(op.rid, op.seq, op.result, op.slot)
        return removed

    def set_slots(self, slots: Iterable[int], state: int, peer: int | None) -> None:
        for slot in slots:
            self.slot_state[slot] = state
            if peer is None:
                self.slot_peer.pop(slot, None)
            else:
                self.slot_peer[slot] = peer

    def _put(self, key: str, entry: Entry) -> Entry | None:
        old = self._remove(key)
        self._data[key] = entry
        self._by_slot.setdefault(entry.slot, set()).add(key)
        self.bytes += payload_size(entry.payload)
        self.vclock = max(self.vclock, entry.version)
        if entry.expires_at is not None:
            heapq.heappush(self._expiry, (entry.expires_at, key))
        return old

    def _remove(self, key: str) -> Entry | None:
        old = self._data.pop(key, None)
        if old is not None:
            keys = self._by_slot[old.slot]
            keys.discard(key)
            if not keys:
                del self._by_slot[old.slot]
            self.bytes -= payload_size(old.payload)
        return old

    def _remember(self, rid: str, seq: int, result: Any, slot: int) -> None:
        self._dedupe[rid] = (seq, result, slot)
        if len(self._dedupe) > self._dedupe_window:
            self._dedupe.popitem(last=False)

    def expire(self, limit: int = 1000) -> list[Entry]:
        """Drop up to `limit` expired entries. Each member sweeps on its own: expiry times are
        part of the replicated state, so members agree on what is expired without a log record."""
        now = self._clock()
        dropped: list[Entry] = []
        while self._expiry and self._expiry[0][0] <= now and len(dropped) < limit:
            expires_at, key = heapq.heappop(self._expiry)
            entry = self._data.get(key)
            if entry is not None and entry.expires_at == expires_at:
                self._remove(key)
                dropped.append(entry)
        return dropped

    def map_payloads(self, convert: Callable[[Any], Any]) -> None:
        """Replace every payload with `convert(payload)` (sizes are unchanged)."""
        for entry in self._data.values():
            entry.payload = convert(entry.payload)

    # Snapshots ---------------------------------------------------------------------------
    def snapshot(self, payload: Callable[[Any], Any] = lambda p: p) -> StoreSnapshot:
        """A consistent copy at `seq`; `payload` may convert large-value handles (e.g. to bytes)."""
        entries = [
            (key, payload(e.payload), e.version, e.expires_at, e.slot)
            for key, e in self._data.items()
        ]
        return StoreSnapshot(
            self.seq,
            self.vclock,
            entries,
            bytes(self.slot_state),
            dict(self.slot_peer),
            list(self._dedupe.items()),
        )

    def install(self, snap: StoreSnapshot) -> list[Entry]:
        """Replace all state with `snap`; returns the entries that were dropped."""
        dropped = list(self._data.values())
        self._data.clear()
        self._by_slot.clear()
        self._expiry.clear()
        self.bytes = 0
        for key, payload, version, expires_at, slot in snap.entries:
            self._put(key, Entry(payload, version, expires_at, slot, snap.seq))
        self.seq = snap.seq
        self.vclock = max(snap.vclock, self.vclock)
        self.slot_state = bytearray(snap.slot_state)
        self.slot_peer = dict(snap.slot_peer)
        self._dedupe = OrderedDict(snap.dedupe)
        return dropped
