"""DurableQueue: a work queue in the KV store, with leases and visibility timeouts, retries
with exponential backoff and a dead-letter list.

Key layout, under `jobs:q:<name>:` (app.jobs.store):
- `meta`: {"next": items numbered so far, "cursor": items below it were handed out at least
  once, "inflight": {number: when to look at it next}, "reserved": recent [start, end, at]
  number reservations, "dead": dead-lettered count, "holes": numbers skipped}, changed only by
  compare-and-set. `inflight` holds the items leased or waiting out a backoff, plus acked ones
  until the acking process's next lease folds them out (or any lease, at their check time):
  it stays the size of the work in flight, not of the queue.
- `i:<number>`: an item's record (idempotency key, payload, state, attempt, lease, error).
- `k:<key>`: the idempotency index, key to number (long keys by hash).
- `d:<number>`: a dead-letter marker, so listing dead letters never reads live items.

Costs, with f items in flight: enqueue is three calls and a meta compare-and-set per 1,000
items; lease is three calls (five when it has news for the meta record) plus two per item
leased, and ships the O(f) meta value; ack is one call; nack three or four; extend two; stats
two, O(f). Only dead_letters and drop page through keys. Nothing scans the items, so a
100k-item queue costs the same per item as a 10-item one.

Two workers never hold one item: an item changes hands only by compare-and-set on its record
(the meta record's reservations just keep workers from contending for the same items).
Enqueue writes the records, then the index; a never-delivered item is leased only once the
index names it, so one whose enqueue died halfway and was retried under another number is
skipped as a duplicate, and numbers reserved but never written are skipped after
`enqueue_timeout_s`. Two processes enqueueing one key at the same instant can still both
succeed; the Batch runner enqueues a batch's lines from one workflow step.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from app.jobs.store import (
    DEAD,
    DONE,
    LEASED,
    PAGE,
    PENDING,
    Meta,
    QueueBusyError,
    QueueKeys,
    QueueKV,
    dead_record,
    delete_all,
    empty_meta,
    first_delivery,
    scan_all,
    update_meta,
)

__all__ = ["DurableQueue", "Lease", "QueueBusyError", "QueueKV", "QueueStats"]

ENQUEUE_CHUNK = 1000  # keys per mget/mset of an enqueue
RECHECK_S = 1.0  # how soon an item not yet written (its enqueue in progress) is looked at again


@dataclass(frozen=True)
class Lease:
    """One delivery of an item; `seq` and `version` locate and guard its record."""

    queue: str
    item_id: str
    payload: dict[str, Any]
    attempt: int
    lease_id: str
    expires_at: float
    seq: int = -1
    version: int = 0


@dataclass(frozen=True)
class QueueStats:
    pending: int
    leased: int
    done: int
    dead: int


@dataclass
class _Fixes:
    """What a lease call learnt about the items it looked at, for the meta record."""

    recheck: dict[int, float] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)  # done (or a duplicate already settled)
    holes: set[int] = field(default_factory=set)


class DurableQueue:
    """A named queue of (idempotency key, payload) items in the KV store; see the module
    docstring for its layout and costs. Safe to share between threads of a process."""

    def __init__(
        self,
        kv: QueueKV,
        name: str,
        *,
        visibility_s: float = 60.0,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        enqueue_timeout_s: float = 60.0,
    ) -> None:
        if not name:
            raise ValueError("a queue needs a name")
        if max_attempts < 1 or visibility_s <= 0:
            raise ValueError("max_attempts must be >= 1 and visibility_s > 0")
        self.name = name
        self.visibility_s = visibility_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.enqueue_timeout_s = enqueue_timeout_s
        self._kv = kv
        self._clock = clock
        self._keys = QueueKeys(name)
        self._lock = threading.Lock()
        self._acked: set[int] = set()  # folded out of `inflight` by this process's next lease

    # Enqueue ----------------------------------------------------------------------------
    def enqueue(self, items: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Add items; a key enqueued before (in any state) is ignored. Returns how many were
        new. Once this returns, every item is durable."""
        unique: dict[str, dict[str, Any]] = {}
        for key, payload in items:
            unique.setdefault(key, payload)
        pairs = list(unique.items())
        return sum(
            self._enqueue_chunk(pairs[i : i + ENQUEUE_CHUNK])
            for i in range(0, len(pairs), ENQUEUE_CHUNK)
        )

    def _enqueue_chunk(self, pairs: list[tuple[str, dict[str, Any]]]) -> int:
        known = self._kv.mget([self._keys.index(key) for key, _ in pairs])
        new = [pair for pair, n in zip(pairs, known, strict=True) if n is None]
        if not new:
            return 0
        start = self._reserve(len(new))
        self._kv.mset(
            {
                self._keys.item(start + i): {"key": key, "payload": payload, "state": PENDING}
                | {"attempt": 0, "due_at": 0.0, "error": None}
                for i, (key, payload) in enumerate(new)
            }
        )
        # The index last: a key it names is a stored item, so an enqueue retried after a
        # failure between the two writes enqueues again rather than losing the item.
        self._kv.mset({self._keys.index(key): start + i for i, (key, _) in enumerate(new)})
        return len(new)

    def _reserve(self, count: int) -> int:
        now = self._clock()
        start = 0

        def change(meta: Meta) -> bool:
            nonlocal start
            start = meta["next"]
            meta["next"] = start + count
            fresh = [r for r in meta["reserved"] if now - r[2] < self.enqueue_timeout_s]
            meta["reserved"] = [*fresh, [start, start + count, now]]
            return True

        update_meta(self._kv, self._keys.meta, change)
        return start

    # Lease ------------------------------------------------------------------------------
    def lease(self, max_items: int, owner: str) -> list[Lease]:
        """Up to `max_items` items that are pending and due, or whose lease expired (the
        oldest first, then new items in enqueue order)."""
        if max_items <= 0:
            return []
        now = self._clock()
        expires = now + self.visibility_s
        picked: list[int] = []
        with self._lock:
            acked, self._acked = self._acked, set()

        def reserve(meta: Meta) -> bool:
            picked.clear()
            inflight: dict[int, float] = meta["inflight"]
            for n in acked:
                inflight.pop(n, None)
            due = sorted((at, n) for n, at in inflight.items() if at <= now)[:max_items]
            picked.extend(n for _, n in due)
            stop = min(meta["next"], meta["cursor"] + max_items - len(picked))
            picked.extend(range(meta["cursor"], stop))
            meta["cursor"] = max(meta["cursor"], stop)
            inflight.update(dict.fromkeys(picked, expires))
            return bool(picked or acked)

        try:
            meta = update_meta(self._kv, self._keys.meta, reserve)
        except Exception:
            with self._lock:
                self._acked |= acked
            raise
        if not picked:
            return []
        leases, fixes = self._claim(picked, owner, now, expires, meta)
        if fixes.recheck or fixes.dead or fixes.gone or fixes.holes:
            self._apply(fixes, expires)
        return leases

    def _claim(
        self, picked: list[int], owner: str, now: float, expires: float, meta: Meta
    ) -> tuple[list[Lease], _Fixes]:
        got = [self._kv.get_versioned(self._keys.item(n)) for n in picked]
        # A never-delivered item counts only once the index names it (see the docstring).
        first = [g[0]["key"] for g in got if g is not None and first_delivery(g[0])]
        found = self._kv.mget([self._keys.index(key) for key in first]) if first else []
        pointers = dict(zip(first, found, strict=True))
        leases: list[Lease] = []
        fixes = _Fixes()
        for n, entry in zip(picked, got, strict=True):
            record, version = entry if entry is not None else ({}, 0)
            pointer = pointers.get(record.get("key", ""), n) if record else None
            if not record or (first_delivery(record) and pointer is None):
                if self._young(meta, n, now):  # its enqueue is still writing
                    fixes.recheck[n] = now + RECHECK_S
                else:
                    fixes.holes.add(n)
            elif pointer != n:
                fixes.holes.add(n)  # a duplicate: the key was enqueued again under `pointer`
            elif record["state"] in (DONE, DEAD):
                (fixes.dead if record["state"] == DEAD else fixes.gone).add(n)
            elif record["state"] == LEASED and record["expires_at"] > now:
                fixes.recheck[n] = record["expires_at"]  # extended by its holder
            elif record["state"] == PENDING and record["due_at"] > now:
                fixes.recheck[n] = record["due_at"]
            elif record["attempt"] >= self.max_attempts:  # its last lease expired
                error = record.get("error") or f"lease expired {record['attempt']} times"
                if self._kv.cas(self._keys.item(n), version, dead_record(record, error))[0]:
                    fixes.dead.add(n)
            else:
                lease = self._take(n, record, version, owner, expires)
                if lease is None:
                    fixes.recheck[n] = now + RECHECK_S
                else:
                    leases.append(lease)
        return leases, fixes

    def _take(
        self, n: int, record: dict[str, Any], version: int, owner: str, expires: float
    ) -> Lease | None:
        lease_id = uuid.uuid4().hex
        attempt = record["attempt"] + 1
        leased = record | {"state": LEASED, "attempt": attempt, "lease_id": lease_id}
        leased |= {"owner": owner, "expires_at": expires}
        ok, new_version = self._kv.cas(self._keys.item(n), version, leased)
        if not ok or new_version is None:
            return None
        return Lease(
            self.name, record["key"], record["payload"], attempt, lease_id, expires, n, new_version
        )

    def _young(self, meta: Meta, n: int, now: float) -> bool:
        return any(
            start <= n < end and now - at < self.enqueue_timeout_s
            for start, end, at in meta["reserved"]
        )

    def _apply(self, fixes: _Fixes, reserved_until: float) -> None:
        for n in fixes.dead:
            self._kv.put(self._keys.dead(n), n)

        def change(meta: Meta) -> bool:
            inflight: dict[int, float] = meta["inflight"]
            for n, at in fixes.recheck.items():
                if inflight.get(n) == reserved_until:  # nobody has moved it since
                    inflight[n] = at
            for kind, ids in (("dead", fixes.dead), ("holes", fixes.holes), ("", fixes.gone)):
                for n in ids:
                    if inflight.pop(n, None) is not None and kind:
                        meta[kind] += 1
            return True

        update_meta(self._kv, self._keys.meta, change)

    # Settle -----------------------------------------------------------------------------
    def ack(self, lease: Lease) -> bool:
        """Mark the item done; False if the lease was lost (it expired and was re-leased)."""
        done = {"key": lease.item_id, "state": DONE, "attempt": lease.attempt}
        done |= {"lease_id": lease.lease_id, "done_at": self._clock()}
        if not self._settle(lease, done):
            return False
        with self._lock:
            self._acked.add(lease.seq)
        return True

    def nack(
        self,
        lease: Lease,
        error: str,
        *,
        retry_after_s: float | None = None,
        charge: bool = True,
    ) -> None:
        """Give the item back: pending again after exponential backoff (or `retry_after_s`),
        dead-lettered once it has had `max_attempts` deliveries. `charge=False` (a 429, a
        shutdown) leaves the delivery off the count. A lost lease changes nothing."""
        now = self._clock()
        attempt = lease.attempt if charge else lease.attempt - 1
        record = {"key": lease.item_id, "payload": lease.payload, "attempt": attempt}
        record |= {"lease_id": lease.lease_id, "error": error, "owner": None}
        dead = attempt >= self.max_attempts
        if dead:
            record |= {"state": DEAD, "dead_at": now}
        else:
            delay = self._backoff(lease.attempt) if retry_after_s is None else retry_after_s
            record |= {"state": PENDING, "due_at": now + max(0.0, delay), "expires_at": 0.0}
        if not self._settle(lease, record):
            return
        if dead:
            self._kv.put(self._keys.dead(lease.seq), lease.seq)

        def change(meta: Meta) -> bool:
            if not dead:
                meta["inflight"][lease.seq] = record["due_at"]
            elif meta["inflight"].pop(lease.seq, None) is not None:
                meta["dead"] += 1
            return True

        update_meta(self._kv, self._keys.meta, change)

    def extend(self, lease: Lease, visibility_s: float | None = None) -> Lease | None:
        """The lease with a later expiry, or None if it was lost."""
        key = self._keys.item(lease.seq)
        got = self._kv.get_versioned(key)
        if got is None or got[0].get("lease_id") != lease.lease_id or got[0]["state"] != LEASED:
            return None
        expires = self._clock() + (self.visibility_s if visibility_s is None else visibility_s)
        ok, version = self._kv.cas(key, got[1], got[0] | {"expires_at": expires})
        if not ok or version is None:
            return None
        return replace(lease, expires_at=expires, version=version)

    def _settle(self, lease: Lease, record: dict[str, Any]) -> bool:
        key = self._keys.item(lease.seq)
        if self._kv.cas(key, lease.version, record)[0]:
            return True
        got = self._kv.get_versioned(key)  # extended since, or a retried call
        if got is None or got[0].get("lease_id") != lease.lease_id:
            return False
        if got[0]["state"] == record["state"]:
            return True
        return got[0]["state"] == LEASED and self._kv.cas(key, got[1], record)[0]

    def _backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1)))

    # Reading ----------------------------------------------------------------------------
    def stats(self) -> QueueStats:
        got = self._kv.get_versioned(self._keys.meta)
        meta = got[0] if got is not None else empty_meta()
        inflight: dict[int, float] = meta["inflight"]
        records = self._kv.mget([self._keys.item(n) for n in inflight]) if inflight else []
        states = [r["state"] if r else PENDING for r in records]
        leased, done_late, dead_late = (states.count(s) for s in (LEASED, DONE, DEAD))
        pending = meta["next"] - meta["cursor"] + states.count(PENDING)
        done = meta["cursor"] - len(inflight) - meta["dead"] - meta["holes"] + done_late
        return QueueStats(pending, leased, done, meta["dead"] + dead_late)

    def dead_letters(self) -> list[tuple[str, dict[str, Any], str]]:
        """(item_id, payload, last error) of every dead-lettered item, in enqueue order."""
        found = scan_all(self._kv, self._keys.dead_prefix)
        numbers = sorted(int(k.rsplit(":", 1)[1]) for k, _ in found)
        out: list[tuple[str, dict[str, Any], str]] = []
        for i in range(0, len(numbers), PAGE):
            chunk = numbers[i : i + PAGE]
            for record in self._kv.mget([self._keys.item(n) for n in chunk]):
                if record and record["state"] == DEAD:
                    out.append((record["key"], record["payload"], record.get("error") or ""))
        return out

    def drop(self) -> None:
        """Delete the whole queue: every record, index entry, marker and the meta record."""
        delete_all(self._kv, self._keys.prefix)
        self._kv.delete(self._keys.meta)
