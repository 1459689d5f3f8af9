"""The shard actor: one member of a shard group, serving the data path for the slots it owns."""

from __future__ import annotations

from typing import Any

import ray

from app.kv.protocol import NotPrimary, Stale, TryAgain
from app.kv.shard_base import CONCURRENCY_GROUPS, UNCONFIRMED, large_payload, wire
from app.kv.shard_migration import MigrationMixin
from app.kv.shard_replication import ReplicationMixin
from app.kv.slots import key_slot
from app.kv.store import (
    OP_DELETE,
    OP_PUT,
    SLOT_IMPORTING,
    SLOT_MIGRATING,
    SLOT_OWNED,
    Entry,
)


class Shard(MigrationMixin, ReplicationMixin):
    """Data path. Payloads are pickled bytes or `[ObjectRef, size]` for large values; replies are
    a payload, None (missing), or a redirect from app.kv.protocol that the client follows.
    Reads flagged `own` come from a reader that found a large value's ref dead (its writer
    died): the primary re-owns those values before answering.

    Every method checks slot ownership first (one byte compare on the hot path) and runs its
    routing check and its state change inside one critical section.
    """

    @property
    def _max_key(self) -> int:
        return self.cfg.max_key_bytes

    # Strong reads (primary) --------------------------------------------------------------
    def get(self, key: str, slot: int, asking: bool = False, own: bool = False) -> Any:
        found = self._read_entry(key, slot, asking, own)
        return wire(found.payload) if isinstance(found, Entry) else found

    def get_entry(self, key: str, slot: int, asking: bool = False, own: bool = False) -> Any:
        """(payload, version), None if missing, or a redirect."""
        found = self._read_entry(key, slot, asking, own)
        return (wire(found.payload), found.version) if isinstance(found, Entry) else found

    def _read_entry(self, key: str, slot: int, asking: bool, own: bool = False) -> Any:
        """The key's Entry, None if missing, or the reply that replaces a read (a redirect, or
        UNCONFIRMED while the key's latest write has not reached a majority)."""
        with self.lock:
            if self.tracker.unsettled and not self._settle((key,)):
                return UNCONFIRMED
            if self.store.slot_state[slot] != SLOT_OWNED or not self.primary:
                route = self._route(slot, key, asking, False)
                if route is not None:
                    return route
            self.store.slot_ops[slot] += 1
            entry = self.store.get(key)
            if own and entry is not None:
                entry.payload = self._reown(entry.payload)
            return entry

    def mget(self, keys: list[str], own: bool = False) -> list[Any]:
        # Slots are recomputed here (cached CRC16) rather than sent: it trims every batch call.
        slots = [key_slot(k, self._max_key) for k in keys]
        with self.lock:
            if self.tracker.unsettled and not self._settle(keys):
                return [UNCONFIRMED] * len(keys)
            store, primary, out = self.store, self.primary, []
            for key, slot in zip(keys, slots, strict=True):
                if store.slot_state[slot] != SLOT_OWNED or not primary:
                    route = self._route(slot, key, False, False)
                    if route is not None:
                        out.append(route)
                        continue
                store.slot_ops[slot] += 1
                entry = store.get(key)
                if entry is None:
                    out.append(None)
                    continue
                if own:
                    entry.payload = self._reown(entry.payload)
                out.append(wire(entry.payload))
            return out

    # Replica reads (eventual / bounded staleness) ----------------------------------------
    def read(self, key: str, slot: int, max_lag_ms: float) -> Any:
        """A read any member may answer; max_lag_ms < 0 means any staleness is fine."""
        if self.primary:
            return self.get(key, slot)
        with self.lock:
            return self._replica_read(key, slot, max_lag_ms)

    def read_many(self, keys: list[str], max_lag_ms: float) -> list[Any]:
        if self.primary:
            return self.mget(keys)
        slots = [key_slot(k, self._max_key) for k in keys]
        with self.lock:
            return [self._replica_read(k, s, max_lag_ms) for k, s in zip(keys, slots, strict=True)]

    def _replica_read(self, key: str, slot: int, max_lag_ms: float) -> Any:
        lag = self.lag_ms()
        if max_lag_ms >= 0 and lag > max_lag_ms:
            return Stale(lag)
        entry = self.store.get(key)
        if entry is None:
            # Missing here may mean "moved away" or "not synced yet": let the primary decide.
            return None if self.store.slot_state[slot] == SLOT_OWNED else NotPrimary(self.term)
        self.store.slot_ops[slot] += 1
        return wire(entry.payload)  # a held large value's local value stays here

    # Writes ------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        slot: int,
        payload: Any,
        ttl: float | None,
        rid: str,
        code: int,
        asking: bool = False,
    ) -> Any:
        """Store a value; replies with its new version once write concern `code` is met."""
        blob = None
        if large_payload(payload):
            payload, blob = self._take([payload])[0]
        with self.lock:
            early = self._early_reply(slot, key, rid, code, asking)
            if early is not None:
                return early
            store = self.store
            store.slot_ops[slot] += 1
            version = store.next_version()
            seq = self._log(
                OP_PUT, key, slot, payload, version, store.expires_at(ttl), rid, version, blob
            )
            return self._ack(seq, code, version)

    def _early_reply(self, slot: int, key: str, rid: str, code: int, asking: bool) -> Any:
        """Under the lock, before a write: the stored reply for a retried request id, or a
        redirect when this member is not the slot's primary; None when the write proceeds."""
        seen = self.store.seen(rid)
        if seen is not None:
            return self._ack(seen[0], code, seen[1])
        if self.store.slot_state[slot] != SLOT_OWNED or not self.primary:
            return self._route_write(slot, key, asking)
        return None

    def delete(self, key: str, slot: int, rid: str, code: int, asking: bool = False) -> Any:
        with self.lock:
            early = self._early_reply(slot, key, rid, code, asking)
            if early is not None:
                return early
            self.store.slot_ops[slot] += 1
            if self.store.get(key) is None:
                return False
            seq = self._log(OP_DELETE, key, slot, rid=rid, result=True)
            return self._ack(seq, code, True)

    def cas(
        self,
        key: str,
        slot: int,
        expected: int | None,
        payload: Any,
        ttl: float | None,
        rid: str,
        code: int,
        asking: bool = False,
    ) -> Any:
        """Write only if the key's version is `expected` (None: only if missing).

        Replies (True, new version) or (False, current version or None)."""
        blob = None
        if large_payload(payload):
            payload, blob = self._take([payload])[0]
        with self.lock:
            early = self._early_reply(slot, key, rid, code, asking)
            if early is not None:
                return early
            store = self.store
            store.slot_ops[slot] += 1
            entry = store.get(key)
            current = None if entry is None else entry.version
            if current != expected:
                return (False, current)
            version = store.next_version()
            result = (True, version)
            seq = self._log(
                OP_PUT, key, slot, payload, version, store.expires_at(ttl), rid, result, blob
            )
            return self._ack(seq, code, result)

    def mset(self, items: list[tuple[str, Any]], ttl: float | None, rid: str, code: int) -> Any:
        """Store several values; per item a version or a redirect (those the client re-sends).

        Each item is deduplicated under "<rid>/<key>", the id the client also uses if it has to
        re-send that item on its own, so an item is applied once however it is retried.
        """
        owned = self._take_items(items)
        with self.lock:
            while self.moving and any(item[0] in self.moving for item in owned):
                self.cond.wait(1.0)
            store, primary, results, last = self.store, self.primary, [], 0
            for key, slot, payload, blob in owned:
                if store.slot_state[slot] != SLOT_OWNED or not primary:
                    route = self._route(slot, key, False, True)
                    if route is not None:
                        results.append(route)
                        continue
                item_rid = f"{rid}/{key}"
                seen = store.seen(item_rid)
                if seen is not None:
                    results.append(seen[1])
                    last = max(last, seen[0])
                    continue
                store.slot_ops[slot] += 1
                version = store.next_version()
                last = self._log(
                    OP_PUT,
                    key,
                    slot,
                    payload,
                    version,
                    store.expires_at(ttl),
                    item_rid,
                    version,
                    blob,
                )
                results.append(version)
            return self._ack(last, code, results) if last else results

    def _take_items(self, items: list[tuple[str, Any]]) -> list[tuple[str, int, Any, bytes | None]]:
        large = [payload for _, payload in items if large_payload(payload)]
        taken = iter(self._take(large) if large else ())
        owned: list[tuple[str, int, Any, bytes | None]] = []
        for key, payload in items:
            blob = None
            if large_payload(payload):
                payload, blob = next(taken)
            owned.append((key, key_slot(key, self._max_key), payload, blob))
        return owned

    # Prefix scan -------------------------------------------------------------------------
    def scan(self, prefix: str, first: int, last: int, after: str | None, limit: int) -> Any:
        """One page of (key, payload) in slots first..last; see ShardStore.scan."""
        with self.lock:
            if self.tracker.unsettled and not self._settle(()):
                return UNCONFIRMED
            if not self.primary:
                return NotPrimary(self.term)
            states = self.store.slot_state[first : last + 1]
            if states.count(SLOT_OWNED) != len(states):
                if SLOT_MIGRATING in states or SLOT_IMPORTING in states:
                    return TryAgain("a slot in the scanned range is migrating")
                return NotPrimary(self.term)  # not our range any more: the client reloads its map
            items, nxt = self.store.scan(prefix, first, last, after, limit)
            return [(key, wire(payload)) for key, payload in items], nxt


ShardActor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(Shard)  # type: ignore[call-overload]
