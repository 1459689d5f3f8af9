"""Primary-side replication: one ordered stream per replica and the commit tracker writers wait on.

Shard actors are threaded (sync actors run calls ~25% faster than asyncio ones in Ray 2.60), so
this is monitor-style code: one lock per shard, a Condition on it, and a sender thread per
replica. Nothing here imports Ray: streams are given `send` callables, so tests use fakes.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from app.kv import protocol
from app.kv.store import Op, StoreSnapshot

log = logging.getLogger(__name__)

SendOps = Callable[[list[Op], int, float], int]
SendSnapshot = Callable[[StoreSnapshot, float], int]


class CommitTracker:
    """Replica acknowledgements → the majority-committed seq; writers wait on `cond`.

    Every method must be called with `cond`'s lock held (the shard's lock). `group_size` is the
    configured number of members, so majority means a majority of the group the store promised,
    not of whichever members happen to be alive.
    """

    def __init__(self, group_size: int, cond: threading.Condition | None = None) -> None:
        self.group_size = group_size
        self.cond = cond or threading.Condition()
        self.head = 0  # last seq the primary applied
        self.committed = 0
        self.acked: dict[str, int] = {}
        self.pending: dict[str, int] = {}  # key -> seq of its newest write not yet committed
        # A promoted primary cannot tell which of its entries a majority holds: every read waits
        # until its whole log up to `barrier` is committed (normally one replica round trip).
        self.barrier = 0
        self.unsettled = False  # pending or barrier outstanding: reads must check (hot-path flag)

    def _majority_seq(self) -> int:
        need = self.group_size // 2
        if need == 0:
            return self.head
        acks = sorted(self.acked.values(), reverse=True)
        return acks[need - 1] if len(acks) >= need else 0

    def satisfied(self, seq: int, code: int) -> bool:
        if code == protocol.WRITE_ONE:
            return True
        if self.committed < seq:
            return False
        if code == protocol.WRITE_ALL:
            return all(acked >= seq for acked in self.acked.values())
        return True

    def wrote(self, seq: int, key: str | None) -> None:
        """The primary applied `seq`; strong reads of `key` wait for its commit."""
        self.head = seq
        if key is not None:
            self.pending.pop(key, None)
            self.pending[key] = seq
        self._advance()

    def ack(self, member: str, seq: int) -> None:
        if member in self.acked and seq > self.acked[member]:
            self.acked[member] = seq
            self._advance()

    def attach(self, member: str) -> None:
        self.acked.setdefault(member, 0)

    def detach(self, member: str) -> None:
        if self.acked.pop(member, None) is not None:
            self._advance()

    def refresh(self) -> None:
        """Recompute the commit point (after group_size changed) and wake satisfied writers."""
        self._advance()

    def set_barrier(self, seq: int) -> None:
        self.head = max(self.head, seq)
        self.barrier = seq
        self._advance()

    def settle_at(self, seq: int) -> int:
        """The seq a strong read of a key last written at `seq` must see committed (0: none)."""
        need = max(seq, self.barrier)
        return need if need > self.committed else 0

    def _advance(self) -> None:
        before = self.committed
        self.committed = max(self.committed, self._majority_seq())
        # Keys were re-inserted on every write, so the dict is ordered by seq.
        while self.pending:
            key, seq = next(iter(self.pending.items()))
            if seq > self.committed:
                break
            del self.pending[key]
        self.unsettled = bool(self.pending) or self.barrier > self.committed
        if self.committed != before or self.acked:
            self.cond.notify_all()

    def wait(self, seq: int, code: int, timeout: float) -> bool:
        """Block (releasing the lock) until `seq` meets write concern `code`; False on timeout."""
        return self.cond.wait_for(lambda: self.satisfied(seq, code), timeout)


class ReplicaStream:
    """Ships the primary's log to one replica in order, from a sender thread, one batch in flight.

    Batching is natural: while a batch is in flight new ops queue up and go in the next one, so
    a busy primary sends few large messages and an idle one sends heartbeats that let replicas
    measure their lag.
    """

    def __init__(
        self,
        member: str,
        send_ops: SendOps,
        send_snapshot: SendSnapshot,
        tracker: CommitTracker,
        on_failure: Callable[[str, BaseException], None],
        heartbeat_s: float,
        max_batch: int = 512,
    ) -> None:
        self.member = member
        self._send_ops = send_ops
        self._send_snapshot = send_snapshot
        self._tracker = tracker
        self._on_failure = on_failure
        self._heartbeat_s = heartbeat_s
        self._max_batch = max_batch
        self._queue: collections.deque[Op] = collections.deque()
        self._snapshot: StoreSnapshot | None = None
        self._wake = threading.Event()
        self.closed = False

    def start(self, snapshot: StoreSnapshot | None) -> None:
        """Begin streaming (call with the lock held); a snapshot goes before any queued op."""
        self._snapshot = snapshot
        self._tracker.attach(self.member)
        threading.Thread(target=self._run, name=f"kv-stream-{self.member}", daemon=True).start()

    def push(self, op: Op) -> None:
        self._queue.append(op)
        self._wake.set()

    def close(self) -> None:
        """Stop sending (call with the lock held); the thread exits after its current call."""
        self.closed = True
        self._tracker.detach(self.member)
        self._wake.set()

    def _run(self) -> None:
        try:
            if self._snapshot is not None:
                snap, self._snapshot = self._snapshot, None
                acked = self._send_snapshot(snap, time.time())
                self._acked(acked)
                while self._queue and self._queue[0].seq <= snap.seq:
                    self._queue.popleft()
            while not self.closed:
                self._next_batch()
        except BaseException as exc:
            with self._tracker.cond:
                if self.closed:
                    return
                self.close()
            self._on_failure(self.member, exc)

    def _acked(self, seq: int) -> None:
        with self._tracker.cond:
            if not self.closed:
                self._tracker.ack(self.member, seq)

    def _next_batch(self) -> None:
        if not self._queue:
            self._wake.wait(self._heartbeat_s)
            self._wake.clear()
        if self.closed:
            return
        batch: list[Op] = []
        while self._queue and len(batch) < self._max_batch:
            batch.append(self._queue.popleft())
        # Every batch (heartbeats too) carries the primary's head: a replica that reaches it knows
        # it reflects the primary as of the send time, which is how it measures its lag.
        head = self._tracker.head
        self._acked(self._send_ops(batch, head, time.time()))


def choose_successor(applied: dict[str, int]) -> str | None:
    """The replica to promote: highest applied seq (it holds every committed write); ties by id."""
    if not applied:
        return None
    return max(applied, key=lambda member: (applied[member], member))
