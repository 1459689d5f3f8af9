"""Slot migration on a shard primary: marking slots, moving keys in batches, handing slots over.

The protocol follows Redis Cluster. The target marks the slots IMPORTING, the source MIGRATING;
the source then moves keys in batches (target imports with its write concern, source deletes),
then the request ids it remembers for those slots; finally the target marks them OWNED and the
source gives them up. Clients are redirected with ASK
for keys already gone from the source and with MOVED once the slots have left it.
"""

from __future__ import annotations

from typing import Any

import ray

from app.kv import protocol
from app.kv.shard_base import ShardBase
from app.kv.store import (
    OP_DELETE,
    OP_PUT,
    OP_REQUESTS,
    OP_SLOTS,
    SLOT_IMPORTING,
    SLOT_MIGRATING,
    SLOT_NONE,
    SLOT_OWNED,
)

# An exported entry: (key, slot, payload, version, expires_at).
Exported = tuple[str, int, Any, int, float | None]


class MigrationMixin(ShardBase):
    """Both ends of a slot migration. Every state change is a replicated log record, so a
    replica promoted mid-migration carries on with the same slot states."""

    def set_slot_states(self, slots: list[int], state: int, peer: int | None) -> int:
        """Replicate a slot-state change (IMPORTING/MIGRATING/OWNED/NONE); returns its seq."""
        with self.lock:
            if not self.primary:
                raise RuntimeError(f"group {self.gid}: slot states change on the primary only")
            seq = self._log(OP_SLOTS, None, payload=(list(slots), state, peer))
            if not isinstance(self._ack(seq, protocol.WRITE_MAJORITY, seq), int):
                raise TimeoutError(f"group {self.gid}: slot change not acknowledged by replicas")
            return seq

    def begin_import(self, slots: list[int], source: int) -> int:
        return self.set_slot_states(slots, SLOT_IMPORTING, source)

    def begin_migrate(self, slots: list[int], target: int) -> int:
        return self.set_slot_states(slots, SLOT_MIGRATING, target)

    def end_import(self, slots: list[int]) -> int:
        return self.set_slot_states(slots, SLOT_OWNED, None)

    def end_migrate(self, slots: list[int], target: int) -> int:
        return self.set_slot_states(slots, SLOT_NONE, target)

    def migrating_slots(self) -> dict[int, list[int]]:
        """Slots this primary is giving away, by target group (to resume after a failure)."""
        with self.lock:
            out: dict[int, list[int]] = {}
            for slot, state in enumerate(self.store.slot_state):
                if state == SLOT_MIGRATING:
                    out.setdefault(self.store.slot_peer.get(slot, -1), []).append(slot)
            return out

    def migrate_batch(self, slots: list[int], target: Any, batch_keys: int) -> int:
        """Move up to `batch_keys` keys of `slots` to `target`; returns how many moved (0: done,
        and then the slots' request ids have moved too).

        While a batch is in flight its keys can still be read here but writes to them wait, so
        the copy the target imports is the final one and no write lands on a key mid-move.
        """
        with self.lock:
            leaving = {s for s in slots if self.store.slot_state[s] == SLOT_MIGRATING}
            keys = self.store.keys_in_slots(leaving, batch_keys)
            if keys:
                self.moving = set(keys)
                entries = self._export(keys)
            else:
                # No key left means no new write here either (they are ASKed to the target).
                requests = self.store.requests_in_slots(leaving)
        if not keys:
            if requests and ray.get(target.import_requests.remote(requests)) < 0:
                raise RuntimeError(f"group {self.gid}: target refused the request ids")
            return 0
        try:
            reply = ray.get(target.import_entries.remote(entries))
            if reply != len(entries):
                raise RuntimeError(f"group {self.gid}: target refused the batch ({reply!r})")
            with self.lock:
                last = 0
                for key in keys:
                    last = self._log(OP_DELETE, key)
                if not isinstance(self._ack(last, protocol.WRITE_MAJORITY, last), int):
                    raise TimeoutError(f"group {self.gid}: migration deletes not acknowledged")
        finally:
            with self.lock:
                self.moving = set()
                self.cond.notify_all()
        return len(keys)

    def _export(self, keys: list[str]) -> list[Exported]:
        out: list[Exported] = []
        for key in keys:
            entry = self.store.raw(key)  # expired-but-unswept keys move too
            if entry is not None:
                # The target resolves a large value's ref later: hand it one we own.
                entry.payload = self._reown(entry.payload)
                out.append((key, entry.slot, entry.payload, entry.version, entry.expires_at))
        return out

    def import_entries(self, entries: list[Exported]) -> int:
        """Store migrated entries with their versions; returns how many were accepted.

        An entry already here with a newer version wins, so a replayed batch (after a failover
        mid-migration) can never roll a key back.
        """
        large = [e[2] for e in entries if type(e[2]) is list]
        taken = iter(self._take(large) if large else ())
        owned = []
        for key, slot, payload, version, expires_at in entries:
            blob = None
            if type(payload) is list:
                payload, blob = next(taken)
            owned.append((key, slot, payload, version, expires_at, blob))
        with self.lock:
            if not self.primary:
                return -1
            last = self.store.seq
            for key, slot, payload, version, expires_at, blob in owned:
                current = self.store.raw(key)
                if current is not None and current.version >= version:
                    continue
                last = self._log(OP_PUT, key, slot, payload, version, expires_at, blob=blob)
            if not isinstance(self._ack(last, protocol.WRITE_MAJORITY, last), int):
                return -1
            return len(entries)

    def import_requests(self, requests: list[tuple[str, Any, int]]) -> int:
        """Remember the request ids of writes the source applied to slots moving here, so a
        client retrying one of them here gets its original answer; -1 if not primary."""
        with self.lock:
            if not self.primary:
                return -1
            fresh = tuple(r for r in requests if self.store.seen(r[0]) is None)
            if not fresh:
                return 0
            seq = self._log(OP_REQUESTS, None, payload=fresh)
            if not isinstance(self._ack(seq, protocol.WRITE_MAJORITY, seq), int):
                return -1
            return len(fresh)
