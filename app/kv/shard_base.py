"""State and shared helpers of a shard actor: the store, its role, logging a write, acknowledging.

A shard actor is one member (primary or replica) of one shard group, run as a threaded actor:
each call gets a thread, and one lock (`self.lock`, with Condition `self.cond`) guards all state.
Code paths check routing and change state inside one critical section, so no migration step or
other write can interleave; waits (for replicas, for a migration batch) release the lock.
The data path (shard.py), replication (shard_replication.py) and slot migration
(shard_migration.py) build on this base.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import ray

from app.kv import protocol
from app.kv.config import KVConfig, WALSync
from app.kv.direct import DirectClient
from app.kv.direct_server import DirectServer, Endpoint
from app.kv.errors import DurabilityError, InvalidArgumentError
from app.kv.frames import max_frame_bytes
from app.kv.protocol import USE_RAY, Ask, ByValue, Moved, NotPrimary, TryAgain
from app.kv.recovery import MemberReport
from app.kv.replication import CommitTracker, ReplicaStream
from app.kv.store import (
    OP_PUT,
    SLOT_IMPORTING,
    SLOT_MIGRATING,
    SLOT_OWNED,
    Op,
    ShardStore,
    StoreSnapshot,
)
from app.kv.tls import ray_tls
from app.kv.wal import LargeBlob, WriteAheadLog, prune_logs
from app.observability.recorder import metrics

log = logging.getLogger(__name__)

# Thread pools of a shard actor besides the data path's: health checks and membership changes,
# and the replication stream, must not queue behind client calls blocked on replicas.
CONCURRENCY_GROUPS = {"control": 2, "replication": 2}

# `_route` answers this when a write must wait for an in-flight migration batch to finish.
WAIT = object()
UNCONFIRMED = TryAgain("waiting for replicas to confirm the latest write")

# Calls the direct transport may carry (see app.kv.direct): the data path and the replication
# stream. Each is safe to repeat through Ray when a connection breaks mid-call: reads are
# reads, writes carry request ids, apply_ops skips what it has applied.
DIRECT_METHODS = frozenset(
    {"get", "get_entry", "mget", "read", "read_many", "put", "delete", "cas", "mset", "apply_ops"}
)
# Set on the direct transport's threads: `wire` leaves large values whole there, for
# `by_value` to send them by value.
_DIRECT = threading.local()


class ShardBase:
    """One member of a shard group. Large values are held as `[ref, size, value]` (see
    `_take`; `ref` is None for a value that arrived whole, ByValue, until a Ray reader needs
    one, see `wire`) until a member re-owns them as `[ObjectRef, size]` (see `_reown`)."""

    wal_class: type[WriteAheadLog] = WriteAheadLog

    def __init__(
        self,
        gid: int,
        member: str,
        config: KVConfig,
        coordinator: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gid = gid
        self.member = member
        self.cfg = config
        self.coordinator = coordinator
        self.store = ShardStore(clock, config.dedupe_window)
        self.primary = False
        self.term = 0
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.tracker = CommitTracker(1, self.cond)
        self.streams: dict[str, ReplicaStream] = {}
        self.moving: set[str] = set()  # keys of the migration batch in flight
        self.caught_up_at = 0.0  # primary's clock when this replica last matched its head
        self.wal: WriteAheadLog | None = None
        self._direct: DirectServer | None = None
        self._peer_client: DirectClient | None = None  # replication streams' (a primary's)
        self._closed = False
        # A replica's distance behind its primary, for the replication-lag alert.
        metrics().sample_replication_lag(config.name, gid, member, lambda: self.lag_ms() / 1000)
        threading.Thread(target=self._sweep, name="kv-expiry", daemon=True).start()
        if coordinator is not None:
            threading.Thread(target=self._watch_cluster, name="kv-watch", daemon=True).start()

    # Lifecycle -------------------------------------------------------------------------------
    @ray.method(concurrency_group="control")
    def ready(self) -> str:
        """Returns the node this member runs on."""
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def ping(self) -> int:
        """This member's term; DurabilityError once its log failed, so the coordinator's health
        check replaces it."""
        self._check_durable()
        return self.term

    def _check_durable(self) -> None:
        """Raise DurabilityError when this member's write-ahead log has failed: it takes no more
        writes, and fails health checks until the coordinator replaces it."""
        wal = self.wal
        if wal is not None and wal.failed is not None:
            raise DurabilityError(f"kv member {self.member} stopped: {wal.failed}")

    @ray.method(concurrency_group="control")
    def endpoint(self) -> Endpoint | None:
        """Where this member takes direct-transport calls (opened on first request), or None
        when the cluster runs without it."""
        if not self.cfg.direct_transport:
            return None
        with self.lock:
            if self._closed:
                return None
            if self._direct is None:
                tls = ray_tls()
                if not tls.usable:  # Ray runs with TLS we cannot use: no plain-text socket
                    return None
                self._direct = DirectServer(
                    self._direct_call,
                    ray.util.get_node_ip_address(),
                    max_frame=max_frame_bytes(self.cfg.max_value_bytes),
                    tls=tls.server,
                )
            return self._direct.endpoint

    def _direct_call(self, method: str, args: tuple[Any, ...]) -> Any:
        if method not in DIRECT_METHODS:
            raise InvalidArgumentError(f"{method!r} is not a direct-transport call")
        _DIRECT.active = True
        return by_value(getattr(self, method)(*args), self.cfg.direct_max_reply_bytes)

    def _sweep(self) -> None:
        while not self._closed:
            time.sleep(self.cfg.expiry_sweep_interval_s)
            with self.lock:
                self.store.expire()

    def _watch_cluster(self, period_s: float = 2.0) -> None:
        """Exit once the cluster's coordinator is gone for good.

        Members are detached actors, so that a coordinator restarted by Ray (which ends the
        actors its old process owned) does not take the data with it. They would outlive the
        cluster, though: a coordinator that Ray will not restart (its job ended, or
        shutdown_kv) releases its name, and that is the members' cue to stop. A restarting
        coordinator keeps its name."""
        misses = 0
        while not self._closed:
            time.sleep(period_s)
            try:
                ray.get_actor(self.cfg.name, namespace=self.cfg.namespace)
                misses = 0
            except ValueError:
                misses += 1
            except Exception:  # GCS briefly unreachable: not a verdict
                continue
            if misses >= 2 and not self._closed:
                log.warning("kv member %s: cluster %r is gone; exiting", self.member, self.cfg.name)
                os._exit(0)

    def group_dir(self) -> Path:
        assert self.cfg.data_dir is not None
        return Path(self.cfg.data_dir) / self.cfg.name / f"group-{self.gid}"

    def member_dir(self) -> Path:
        return self.group_dir() / self.member

    # Routing (lock held) -----------------------------------------------------------------
    def _route(self, slot: int, key: str, asking: bool, write: bool) -> Any:
        """None to serve the request here, else the redirect (or WAIT) to answer with."""
        if not self.primary:
            return NotPrimary(self.term)
        state = self.store.slot_state[slot]
        if state == SLOT_OWNED:
            return None
        peer = self.store.slot_peer.get(slot, -1)
        if state == SLOT_MIGRATING:
            if write and key in self.moving:
                return WAIT
            # Keys still here are served here; the rest already moved (or are new): ask the target.
            return None if self.store.get(key) is not None else Ask(peer)
        if state == SLOT_IMPORTING and asking:
            return None
        return Moved(peer, 0)

    def _route_write(self, slot: int, key: str, asking: bool) -> Any:
        route = self._route(slot, key, asking, True)
        while route is WAIT:
            self.cond.wait(1.0)
            route = self._route(slot, key, asking, True)
        return route

    # Writing (lock held) -----------------------------------------------------------------
    def _log(
        self,
        kind: str,
        key: str | None,
        slot: int = 0,
        payload: Any = None,
        version: int = 0,
        expires_at: float | None = None,
        rid: str | None = None,
        result: Any = None,
        blob: bytes | None = None,
    ) -> int:
        """Log one write to the WAL (large values as their bytes), then apply it locally and
        queue it for every replica; returns its seq. The WAL comes first: a write the disk
        refuses raises DurabilityError with nothing applied or replicated."""
        op = Op(self.store.seq + 1, kind, key, slot, payload, version, expires_at, rid, result)
        large = kind == OP_PUT and type(payload) is list
        if self.wal is not None:
            self.wal.append(op._replace(payload=LargeBlob(blob or b"")) if large else op)
        self.store.apply(op)
        self.tracker.wrote(op.seq, key)
        if self.streams:
            sent = op._replace(payload=self._replicated(payload)) if large else op
            for stream in self.streams.values():
                stream.push(sent)
        self._snapshot_if_due()
        return op.seq

    def _snapshot_if_due(self) -> None:
        """Snapshot the store (as it is now, the latest op applied) when the WAL asks for one."""
        if self.wal is not None and self.wal.snapshot_due:
            self.wal.write_snapshot(self._disk_snapshot())

    def _commit(self) -> None:
        """Make the records logged so far durable before acknowledging them (one fsync for
        all of a call's records; see app.kv.wal); DurabilityError if that fails, or failed."""
        if self.wal is not None:
            self.wal.commit()

    def _ack(self, seq: int, code: int, result: Any) -> Any:
        """`result` once `seq` is durable here and meets write concern `code`, else TryAgain
        (the client retries). Never acknowledges a write this member failed to make durable:
        DurabilityError instead."""
        self._commit()
        if code == protocol.WRITE_ONE or self.tracker.satisfied(seq, code):
            return result
        if self.tracker.wait(seq, code, self.cfg.write_timeout_s):
            return result
        return TryAgain("replicas did not acknowledge in time")

    def _settle(self, keys: Collection[str]) -> bool:
        """Wait until the newest writes of `keys` (all writes if empty) are committed, so a
        strong read never returns a value a failover could still roll back. The caller reads
        right after, still holding the lock, so it reads exactly the settled state."""
        tracker = self.tracker

        def settled() -> bool:
            if not tracker.unsettled:
                return True
            if not keys:
                return not tracker.settle_at(tracker.head)
            return not any(tracker.settle_at(tracker.pending.get(k, 0)) for k in keys)

        return self.cond.wait_for(settled, self.cfg.write_timeout_s)

    # Large values -----------------------------------------------------------------------
    def _replicated(self, payload: list[Any]) -> Any:
        """What a replica is sent for a large value: the value whole (ByValue) when this
        member holds it and the direct transport carries replication, else its ref."""
        if len(payload) == 3 and (payload[0] is None or self.cfg.direct_transport):
            return ByValue(payload[2], payload[1])
        return payload[:2]

    def _take(self, payloads: list[Any]) -> list[tuple[list[Any], bytes | None]]:
        """Large values arriving from a writer (or a migration source), without a copy.

        Every member holds a large value as `[ref, size, value]`: the ref readers are given
        (at first the writer's own, put once by the writer) and the local value `ray.get`
        returns, for arrays a zero-copy view that pins the object-store buffer. Ray ties an
        object's lifetime to its owner and `ray.put(_owner=...)` is gone (Ray 2.56), so if the
        writer dies its ref goes dead, but every member still holds the bytes: the first reader
        that finds the ref dead asks the primary to re-own the value (`_reown`), and snapshots
        and migrations only ever hand out refs the primary owns. A put thus costs one copy
        (the writer's) instead of two. The bytes for the WAL come along when durability is on.

        A value sent whole (ByValue, over the direct transport) is held as `[None, size,
        value]`: no object-store copy is made unless a Ray reader asks for a ref.
        """
        refs = [p[0] for p in payloads if type(p) is list]
        fetched = iter(ray.get(refs) if refs else ())
        durable = self.cfg.durable
        out: list[tuple[list[Any], bytes | None]] = []
        for p in payloads:
            held = [None, p.size, p.value] if type(p) is ByValue else [p[0], p[1], next(fetched)]
            out.append((held, pickle.dumps(held[2], protocol=5) if durable else None))
        return out

    @staticmethod
    def _hold(payloads: list[list[Any]]) -> list[list[Any]]:
        """Replica copies of large values: `[sender's ref, size, local value]` (see `_take`)."""
        values = ray.get([p[0] for p in payloads])
        return [[p[0], p[1], v] for p, v in zip(payloads, values, strict=True)]

    @staticmethod
    def _reown(payload: Any) -> Any:
        """`payload` with a ref this member owns: a held value is put once more, by us
        (call with the lock held; the caller stores the result)."""
        if type(payload) is list and len(payload) == 3:
            return [ray.put(payload[2]), payload[1]]
        return payload

    def _own_held(self) -> None:
        """Turn every held large value into an object this member owns: on promotion, and
        before a snapshot or migration hands refs to members that resolve them later."""
        self.store.map_payloads(self._reown)

    # Durability (lock held) --------------------------------------------------------------
    def _disk_snapshot(self) -> StoreSnapshot:
        snap = self.store.snapshot()
        for i, (key, payload, version, expires_at, slot) in enumerate(snap.entries):
            if type(payload) is list:
                value = payload[2] if len(payload) == 3 else ray.get(payload[0])
                blob = LargeBlob(pickle.dumps(value, protocol=5))
                snap.entries[i] = (key, blob, version, expires_at, slot)
        return snap

    def _start_wal(self, members: Collection[str] = ()) -> None:
        """Log this term from a snapshot of the store as it is now (a promoted primary, or a
        replica taking its primary's snapshot). A primary also removes the logs of former
        members (not in `members`): its new snapshot supersedes them."""
        if self.wal is None:
            fsync = self.cfg.wal_fsync == WALSync.COMMIT
            self.wal = self.wal_class(self.member_dir(), fsync, self.cfg.snapshot_every_ops)
        self.wal.begin_term(self.term, self._disk_snapshot())
        if self.primary:
            prune_logs(self.group_dir(), {self.member, *members}, self.term)

    # Introspection -----------------------------------------------------------------------
    def lag_ms(self) -> float:
        if self.primary:
            return 0.0
        return max(0.0, (time.time() - self.caught_up_at) * 1000.0)

    @ray.method(concurrency_group="control")
    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "gid": self.gid,
                "member": self.member,
                "role": "primary" if self.primary else "replica",
                "term": self.term,
                "seq": self.store.seq,
                "committed": self.tracker.committed if self.primary else None,
                "lag_ms": round(self.lag_ms(), 1),
                "keys": len(self.store),
                "bytes": self.store.bytes,
                "node_id": ray.get_runtime_context().get_node_id(),
                "replicas": dict(self.tracker.acked) if self.primary else {},
                "direct": (
                    f"{self._direct.endpoint.host}:{self._direct.endpoint.port}"
                    if self._direct is not None
                    else None
                ),
            }

    @ray.method(concurrency_group="control")
    def describe(self) -> MemberReport:
        """This member's part of the cluster metadata, for a restarted coordinator."""
        with self.lock:
            states = self.store.slot_state
            return MemberReport(
                member=self.member,
                gid=self.gid,
                primary=self.primary,
                term=self.term,
                seq=self.store.seq,
                group_size=self.tracker.group_size,
                replicas=tuple(self.streams) if self.primary else (),
                owned=tuple(i for i, state in enumerate(states) if state == SLOT_OWNED),
                migrating=tuple(i for i, state in enumerate(states) if state == SLOT_MIGRATING),
                node=ray.get_runtime_context().get_node_id(),
            )

    @ray.method(concurrency_group="control")
    def load_stats(self, reset: bool = True) -> tuple[dict[int, int], dict[int, int]]:
        """(keys per slot, operations per slot since the last reset) for the rebalancer."""
        with self.lock:
            ops = {slot: n for slot, n in enumerate(self.store.slot_ops) if n}
            if reset:
                self.store.slot_ops = [0] * len(self.store.slot_ops)
            return self.store.slot_keys(), ops

    @ray.method(concurrency_group="control")
    def close(self) -> None:
        with self.lock:
            self._closed = True
            for stream in list(self.streams.values()):
                stream.close()
            if self.wal is not None:
                self.wal.close()
            if self._direct is not None:
                self._direct.close()
            if self._peer_client is not None:
                self._peer_client.close()


def large_payload(payload: Any) -> bool:
    """A large value as a writer or a primary sends it: `[ObjectRef, size]` or ByValue."""
    return type(payload) is list or type(payload) is ByValue


def large_value_op(op: Op) -> bool:
    return op.kind == OP_PUT and large_payload(op.payload)


def wire(payload: Any) -> Any:
    """A stored payload as readers get it: a held large value without its local value, except
    on the direct transport, which sends the local value itself (see `by_value`). A value that
    arrived whole gets its ref here, on its first Ray read: put once, by this member (two
    threads may race to it; either ref is good)."""
    if type(payload) is not list or getattr(_DIRECT, "active", False):
        return payload
    if payload[0] is None:
        payload[0] = ray.put(payload[2])
    return payload[:2]


def _is_large(value: Any) -> bool:
    """A stored large-value payload: `[ObjectRef, size]` or `[ObjectRef or None, size, value]`
    (never an mget reply: their items are bytes, None, lists or redirects, not ints)."""
    return (
        type(value) is list
        and 2 <= len(value) <= 3
        and type(value[1]) is int
        and (value[0] is None or isinstance(value[0], ray.ObjectRef))
    )


def _fetched(payload: list[Any]) -> ByValue:
    return ByValue(payload[2] if len(payload) == 3 else ray.get(payload[0]), payload[1])


def by_value(reply: Any, budget: int) -> Any:
    """A direct-transport reply with its large values sent by value (called outside the lock),
    or USE_RAY when they add up to more than `budget` bytes: past about 1.5 MiB two socket
    copies cost more than one Ray call that hands over refs the reader maps without a copy."""
    if _is_large(reply):
        return USE_RAY if reply[1] > budget else _fetched(reply)
    if type(reply) is tuple and reply and _is_large(reply[0]):
        return USE_RAY if reply[0][1] > budget else (_fetched(reply[0]), *reply[1:])
    if type(reply) is list and any(_is_large(item) for item in reply):
        if sum(item[1] for item in reply if _is_large(item)) > budget:
            return USE_RAY
        return [_fetched(item) if _is_large(item) else item for item in reply]
    return reply
