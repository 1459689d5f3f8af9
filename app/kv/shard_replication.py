"""Replication on a shard member: applying the primary's log, promotion, attaching replicas."""

from __future__ import annotations

import logging
import pickle
import time
from typing import Any

import ray

from app.kv.direct import DirectClient
from app.kv.frames import max_frame_bytes
from app.kv.protocol import Call
from app.kv.replication import CommitTracker, ReplicaStream
from app.kv.shard_base import ShardBase, large_value_op, wire
from app.kv.store import Op, StoreSnapshot
from app.kv.wal import LargeBlob, best_log, member_logs, read_log

log = logging.getLogger(__name__)


class ReplicationMixin(ShardBase):
    """Replica side (`apply_ops`, `install_snapshot`) and primary side (streams, promotion)."""

    # Replica side ------------------------------------------------------------------------
    @ray.method(concurrency_group="replication")
    def apply_ops(self, term: int, ops: list[Op], head: int, sent_at: float) -> int:
        """Apply a batch from the primary of `term`; returns the seq applied so far.

        A batch from an older term comes from a deposed primary and is refused (-1), which
        fences it off once the coordinator has started a promotion. Each op is logged before it
        is applied, and the batch is made durable before its seq is reported (the primary
        counts that report towards the write concern); a member whose log failed answers
        DurabilityError, which ends the primary's stream to it.
        """
        large = [i for i, op in enumerate(ops) if large_value_op(op)]
        disk: dict[int, Op] = {}  # what the WAL gets for large values: their bytes
        if large:
            held = self._take([ops[i].payload for i in large])
            ops = list(ops)
            for i, (payload, blob) in zip(large, held, strict=True):
                if blob is not None:
                    disk[i] = ops[i]._replace(payload=LargeBlob(blob))
                ops[i] = ops[i]._replace(payload=payload)
        with self.lock:
            if term < self.term or self.primary:
                return -1
            self._check_durable()
            self.term = term
            for i, op in enumerate(ops):
                if op.seq > self.store.seq:
                    if self.wal is not None:
                        self.wal.append(disk.get(i, op))
                    self.store.apply(op)
                    self._snapshot_if_due()
            self._commit()
            if self.store.seq >= head:
                self.caught_up_at = sent_at
            return self.store.seq

    @ray.method(concurrency_group="replication")
    def install_snapshot(self, term: int, snap: StoreSnapshot, sent_at: float) -> int:
        """Become an exact copy of the primary at `snap.seq` (new replica, or after failover)."""
        large = [i for i, entry in enumerate(snap.entries) if type(entry[1]) is list]
        if large:
            held = self._hold([snap.entries[i][1] for i in large])
            for i, payload in zip(large, held, strict=True):
                key, _, version, expires_at, slot = snap.entries[i]
                snap.entries[i] = (key, payload, version, expires_at, slot)
        with self.lock:
            if term < self.term or self.primary:
                return -1
            self._check_durable()
            self.term = term
            self.store.install(snap)
            self.caught_up_at = sent_at
            if self.cfg.durable:
                self._start_wal()  # a replica logs too: the primary's disk is not the only copy
            return self.store.seq

    @ray.method(concurrency_group="control")
    def prepare_promotion(self, term: int) -> int:
        """Fence off older primaries and report how far this replica got (its applied seq)."""
        with self.lock:
            self.term = max(self.term, term)
            return self.store.seq

    # Primary side ------------------------------------------------------------------------
    @ray.method(concurrency_group="control")
    def become_primary(
        self, term: int, replicas: dict[str, Any], group_size: int, recover: bool = False
    ) -> int:
        """Take over the group at `term` with these replicas; returns the seq taken over at.

        Everything up to that seq becomes a read barrier: it is served only once a majority has
        it, because this member cannot know which of its entries the old primary had committed.
        """
        with self.lock:
            self._check_durable()
            self.term = term
            self.primary = True
            if recover:
                self._recover_from_disk()
            self._own_held()
            self.tracker = CommitTracker(group_size, self.cond)
            self.tracker.set_barrier(self.store.seq)
            for member, handle in replicas.items():
                self._attach(member, handle)
            if self.cfg.durable:
                self._start_wal(replicas)
            return self.store.seq

    @ray.method(concurrency_group="control")
    def add_replica(self, member: str, handle: Any) -> int:
        """Start streaming to a new replica, beginning with a snapshot of this store."""
        with self.lock:
            if not self.primary:
                return -1
            self._own_held()  # the snapshot's refs must outlive their writers
            self._attach(member, handle)
            return self.store.seq

    @ray.method(concurrency_group="control")
    def remove_replica(self, member: str) -> None:
        with self.lock:
            stream = self.streams.pop(member, None)
            if stream is not None:
                stream.close()

    @ray.method(concurrency_group="control")
    def set_group_size(self, group_size: int) -> None:
        with self.lock:
            self.tracker.group_size = group_size
            self.tracker.refresh()

    def _attach(self, member: str, handle: Any) -> None:
        term, timeout = self.term, self.cfg.health_check_timeout_s
        peers = self._peers()

        def send_ops(ops: list[Op], head: int, sent_at: float) -> int:
            # Batches that carry refs go through Ray, the rest (values whole) go direct.
            call = Call(
                handle,
                "apply_ops",
                (term, ops, head, sent_at),
                peers is not None and not any(type(op.payload) is list for op in ops),
            )
            if peers is None:
                return int(ray.get(call.submit(), timeout=timeout))
            return int(peers.call(call, timeout))

        def send_snapshot(snap: StoreSnapshot, sent_at: float) -> int:
            ref = handle.install_snapshot.remote(term, snap, sent_at)
            return int(ray.get(ref, timeout=timeout))

        old = self.streams.pop(member, None)
        if old is not None:
            old.close()
        stream = ReplicaStream(
            member,
            send_ops,
            send_snapshot,
            self.tracker,
            self._stream_failed,
            self.cfg.heartbeat_interval_ms / 1000.0,
        )
        self.streams[member] = stream
        stream.start(self.store.snapshot(wire))

    def _peers(self) -> DirectClient | None:
        """The direct-transport client this primary's replication streams share."""
        if not self.cfg.direct_transport:
            return None
        if self._peer_client is None:
            self._peer_client = DirectClient(
                self.cfg.health_check_timeout_s,
                max_frame=max_frame_bytes(self.cfg.max_value_bytes),
            )
        return self._peer_client

    def _stream_failed(self, member: str, exc: BaseException) -> None:
        log.warning("kv group %s: replica %s failed: %r", self.gid, member, exc)
        with self.lock:
            self.streams.pop(member, None)
            term = self.term
        if self.coordinator is not None:
            self.coordinator.member_failed.remote(self.gid, member, term)

    def _recover_from_disk(self) -> None:
        """Load the group's furthest member log (this member is new: its own is empty)."""
        source = best_log(self.group_dir())
        if source is None:
            if any(next(d.glob("snap-*"), None) for d in member_logs(self.group_dir())):
                log.error("kv group %s: no intact log to recover from; it starts empty", self.gid)
            return
        snap, ops, _ = read_log(source)
        if snap is None:
            return
        started = time.monotonic()
        snap.entries = [(k, _load(p), v, e, s) for k, p, v, e, s in snap.entries]
        self.store.install(snap)
        for op in ops:
            if isinstance(op.payload, LargeBlob):
                op = op._replace(payload=_load(op.payload))
            self.store.apply(op)
        log.info(
            "kv group %s recovered %d keys at seq %d from %s in %.2fs",
            self.gid,
            len(self.store),
            self.store.seq,
            source.name,
            time.monotonic() - started,
        )


def _load(payload: Any) -> Any:
    """A payload read from disk: large values go back into the object store, owned by us."""
    if isinstance(payload, LargeBlob):
        return [ray.put(pickle.loads(payload.data)), len(payload.data)]
    return payload
