"""Commit tracking and replica streams, driven by fake replicas (no Ray)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from app.kv import protocol
from app.kv.replication import CommitTracker, ReplicaStream, choose_successor
from app.kv.store import OP_PUT, Op, ShardStore, StoreSnapshot


@pytest.mark.parametrize(("size", "needed"), [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_majority_counts_the_primary(size: int, needed: int) -> None:
    tracker = CommitTracker(size)
    with tracker.cond:  # the tracker is used with its lock held, as a shard does
        for i in range(size - 1):
            tracker.attach(f"r{i}")
        tracker.wrote(10, "k")
        for i in range(needed - 1):
            tracker.ack(f"r{i}", 10)
        if needed:
            assert not tracker.satisfied(10, protocol.WRITE_MAJORITY)
            tracker.ack(f"r{needed - 1}", 10)
        assert tracker.satisfied(10, protocol.WRITE_MAJORITY)
        assert tracker.satisfied(10, protocol.WRITE_ONE)


def test_all_needs_every_attached_replica() -> None:
    tracker = CommitTracker(3)
    with tracker.cond:
        tracker.attach("a")
        tracker.attach("b")
        tracker.wrote(5, None)
        tracker.ack("a", 5)
        assert tracker.satisfied(5, protocol.WRITE_MAJORITY)
        assert not tracker.satisfied(5, protocol.WRITE_ALL)
        tracker.ack("b", 5)
        assert tracker.satisfied(5, protocol.WRITE_ALL)
        tracker.ack("stranger", 9)  # a detached member's late answer counts for nothing
        assert "stranger" not in tracker.acked


def test_pending_keys_and_barrier_settle_on_commit() -> None:
    tracker = CommitTracker(3)
    with tracker.cond:
        tracker.attach("a")
        tracker.wrote(1, "x")
        tracker.wrote(2, "y")
        assert tracker.unsettled and tracker.settle_at(tracker.pending["x"]) == 1
        tracker.ack("a", 1)
        assert "x" not in tracker.pending and tracker.unsettled
        tracker.ack("a", 2)
        assert not tracker.unsettled
        tracker.set_barrier(7)
        assert tracker.unsettled and tracker.settle_at(0) == 7
        tracker.ack("a", 7)
        assert not tracker.unsettled


def test_waiters_wake_on_ack_and_time_out() -> None:
    tracker = CommitTracker(3)
    results: list[bool] = []
    with tracker.cond:
        tracker.attach("a")
        tracker.wrote(3, "k")

    def wait() -> None:
        with tracker.cond:
            results.append(tracker.wait(3, protocol.WRITE_MAJORITY, 5.0))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.01)
    with tracker.cond:
        tracker.ack("a", 3)
    waiter.join(5)
    assert results == [True]
    with tracker.cond:
        tracker.wrote(4, "k")
        assert not tracker.wait(4, protocol.WRITE_MAJORITY, 0.01)


class FakeReplica:
    """Applies what a stream sends to a real ShardStore, optionally slowly or failing."""

    def __init__(self, delay: float = 0.0, fail_after: int | None = None) -> None:
        self.store = ShardStore()
        self.batches: list[list[Op]] = []
        self.delay = delay
        self.fail_after = fail_after

    def send_ops(self, ops: list[Op], head: int, sent_at: float) -> int:
        time.sleep(self.delay)
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise ConnectionError("replica died")
        self.batches.append(ops)
        for op in ops:
            if op.seq > self.store.seq:
                self.store.apply(op)
        return self.store.seq

    def send_snapshot(self, snap: StoreSnapshot, sent_at: float) -> int:
        self.store.install(snap)
        return self.store.seq


def _op(seq: int) -> Op:
    return Op(seq, OP_PUT, f"k{seq}", 0, b"v", seq)


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def _stream(
    replica: FakeReplica,
    tracker: CommitTracker,
    heartbeat_s: float = 10,
    failures: list[str] | None = None,
) -> ReplicaStream:
    def failed(member: str, exc: BaseException) -> None:
        if failures is not None:
            failures.append(member)

    return ReplicaStream("r", replica.send_ops, replica.send_snapshot, tracker, failed, heartbeat_s)


def test_stream_replays_in_order_and_batches_while_busy() -> None:
    tracker = CommitTracker(2)
    replica = FakeReplica(delay=0.005)
    stream = _stream(replica, tracker)
    with tracker.cond:
        stream.start(None)
    for seq in range(1, 51):
        with tracker.cond:
            tracker.wrote(seq, f"k{seq}")
            stream.push(_op(seq))
        if seq % 10 == 0:
            time.sleep(0.002)
    _until(lambda: tracker.committed == 50)
    assert replica.store.seq == 50
    assert len(replica.batches) < 50  # ops queued during a send went out together
    with tracker.cond:
        stream.close()


def test_stream_starts_with_a_snapshot_and_skips_older_ops() -> None:
    source = ShardStore()
    for seq in range(1, 4):
        source.apply(_op(seq))
    tracker = CommitTracker(2)
    replica = FakeReplica()
    stream = _stream(replica, tracker)
    with tracker.cond:
        tracker.wrote(3, None)
        stream.push(_op(3))  # already inside the snapshot: must not be applied twice
        stream.start(source.snapshot())
    _until(lambda: tracker.committed == 3)
    assert len(replica.store) == 3
    with tracker.cond:
        stream.close()


def test_stream_failure_detaches_and_reports() -> None:
    failures: list[str] = []
    tracker = CommitTracker(3)
    stream = _stream(FakeReplica(fail_after=0), tracker, heartbeat_s=0.01, failures=failures)
    with tracker.cond:
        stream.start(None)
    _until(lambda: failures == ["r"])
    assert "r" not in tracker.acked and stream.closed


def test_idle_stream_sends_heartbeats() -> None:
    tracker = CommitTracker(2)
    replica = FakeReplica()
    stream = _stream(replica, tracker, heartbeat_s=0.005)
    with tracker.cond:
        stream.start(None)
    _until(lambda: len(replica.batches) >= 3)
    assert all(batch == [] for batch in replica.batches)
    with tracker.cond:
        stream.close()


def test_successor_is_the_most_advanced_replica() -> None:
    assert choose_successor({"a": 5, "b": 9, "c": 7}) == "b"
    assert choose_successor({"a": 5, "b": 5}) == "b"  # deterministic tie-break
    assert choose_successor({}) is None
