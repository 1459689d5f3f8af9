"""DurableQueue over an in-memory KV store: idempotent enqueue, exclusive leases, redelivery,
backoff, dead letters, and per-item cost that does not grow with the queue."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from app.jobs.queue import DurableQueue, QueueStats
from tests.unit.kv_fakes import FakeClock, FakeKV


def make(kv: FakeKV, name: str = "q", **kwargs: Any) -> DurableQueue:
    return DurableQueue(kv, name, clock=kv.clock, **kwargs)


def items(n: int, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
    return [(f"line-{i}", {"i": i}) for i in range(start, start + n)]


def drain(queue: DurableQueue, owner: str = "w", batch: int = 10) -> list[str]:
    seen: list[str] = []
    while leases := queue.lease(batch, owner):
        for lease in leases:
            seen.append(lease.item_id)
            assert queue.ack(lease)
    return seen


def test_enqueue_ignores_keys_seen_before_in_any_state() -> None:
    kv = FakeKV()
    queue = make(kv, max_attempts=1)
    assert queue.enqueue(items(3)) == 3
    assert queue.enqueue([*items(2), ("line-3", {"i": 3}), ("line-3", {"i": 99})]) == 1
    done, dead = queue.lease(2, "w")
    assert queue.ack(done)
    queue.nack(dead, "boom")  # one attempt allowed: dead at once
    assert queue.enqueue(items(4)) == 0  # pending, leased, done and dead alike
    assert queue.stats() == QueueStats(pending=2, leased=0, done=1, dead=1)
    assert [(x.item_id, x.payload) for x in queue.lease(5, "w")] == [
        ("line-2", {"i": 2}),
        ("line-3", {"i": 3}),  # the first payload of a key wins
    ]


def test_enqueue_writes_in_batches() -> None:
    kv = FakeKV()
    queue = make(kv)
    kv.reset_counts()
    assert queue.enqueue(items(2500)) == 2500
    assert kv.calls["mset"] == 6  # records then index, per chunk of 1,000
    assert kv.calls["mget"] == 3
    assert kv.calls["put"] == 0 and kv.calls["scan"] == 0


def test_items_are_leased_in_enqueue_order_with_their_payloads() -> None:
    queue = make(FakeKV())
    queue.enqueue(items(5))
    leases = queue.lease(3, "w")
    assert [(x.item_id, x.payload, x.attempt) for x in leases] == [
        ("line-0", {"i": 0}, 1),
        ("line-1", {"i": 1}, 1),
        ("line-2", {"i": 2}, 1),
    ]
    assert all(x.queue == "q" for x in leases)
    assert len({x.lease_id for x in leases}) == 3


def test_two_workers_never_lease_the_same_item() -> None:
    kv = FakeKV()
    make(kv).enqueue(items(600))
    seen: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        queue = make(kv)  # each worker its own instance, as in separate processes
        while leases := queue.lease(7, name):
            with lock:
                seen.extend(x.item_id for x in leases)
            for lease in leases:
                assert queue.ack(lease)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 600 and len(set(seen)) == 600
    assert make(kv).stats() == QueueStats(pending=0, leased=0, done=600, dead=0)


def test_an_unacked_item_is_redelivered_after_its_visibility_timeout() -> None:
    kv = FakeKV()
    a, b = make(kv, visibility_s=60), make(kv, visibility_s=60)
    a.enqueue(items(1))
    (first,) = a.lease(5, "a")
    kv.clock.advance(59)
    assert b.lease(5, "b") == []
    kv.clock.advance(2)
    (again,) = b.lease(5, "b")
    assert (again.item_id, again.attempt) == ("line-0", 2)
    assert again.lease_id != first.lease_id
    assert a.ack(first) is False  # lost: expired and re-leased
    assert b.ack(again) is True
    assert a.stats() == QueueStats(pending=0, leased=0, done=1, dead=0)


def test_a_late_ack_of_an_expired_lease_nobody_took_still_counts() -> None:
    kv = FakeKV()
    queue = make(kv, visibility_s=10)
    queue.enqueue(items(1))
    (lease,) = queue.lease(1, "w")
    kv.clock.advance(30)
    assert queue.ack(lease) is True
    assert queue.ack(lease) is True  # a retried ack
    assert queue.lease(1, "w") == []


def test_extend_keeps_an_item_past_its_first_expiry() -> None:
    kv = FakeKV()
    queue = make(kv, visibility_s=10)
    queue.enqueue(items(1))
    (lease,) = queue.lease(1, "w")
    kv.clock.advance(8)
    extended = queue.extend(lease, 30)
    assert extended is not None and extended.expires_at == kv.clock() + 30
    kv.clock.advance(5)  # past the first expiry
    assert queue.lease(1, "other") == []
    assert queue.ack(lease)  # the lease from before the extension still acks
    kv.clock.advance(60)
    assert queue.lease(1, "other") == []


def test_extend_of_a_lost_lease_is_none() -> None:
    kv = FakeKV()
    queue = make(kv, visibility_s=10)
    queue.enqueue(items(1))
    (lease,) = queue.lease(1, "w")
    kv.clock.advance(11)
    assert queue.lease(1, "other")
    assert queue.extend(lease) is None


def test_nack_backs_off_exponentially_then_dead_letters() -> None:
    kv = FakeKV()
    queue = make(kv, max_attempts=3, backoff_s=1.0, max_backoff_s=60)
    queue.enqueue(items(1))
    (lease,) = queue.lease(1, "w")
    queue.nack(lease, "first")
    assert queue.stats() == QueueStats(pending=1, leased=0, done=0, dead=0)
    assert queue.lease(1, "w") == []  # waits 1 s
    kv.clock.advance(1.0)
    (lease,) = queue.lease(1, "w")
    assert lease.attempt == 2
    queue.nack(lease, "second")
    kv.clock.advance(1.5)
    assert queue.lease(1, "w") == []  # waits 2 s
    kv.clock.advance(0.5)
    (lease,) = queue.lease(1, "w")
    assert lease.attempt == 3
    queue.nack(lease, "third")
    kv.clock.advance(3600)
    assert queue.lease(1, "w") == []
    assert queue.stats() == QueueStats(pending=0, leased=0, done=0, dead=1)
    assert queue.dead_letters() == [("line-0", {"i": 0}, "third")]
    assert queue.enqueue(items(1)) == 0


def test_retry_after_overrides_backoff_and_an_uncharged_nack_keeps_the_attempt() -> None:
    kv = FakeKV()
    queue = make(kv, max_attempts=1, backoff_s=100)
    queue.enqueue(items(1))
    for _ in range(3):  # three 429s in a row: never dead-lettered
        (lease,) = queue.lease(1, "w")
        queue.nack(lease, "429", retry_after_s=2.0, charge=False)
        assert queue.lease(1, "w") == []
        kv.clock.advance(2.0)
    (lease,) = queue.lease(1, "w")
    assert lease.attempt == 1
    assert queue.ack(lease)


def test_a_lease_that_keeps_expiring_is_dead_lettered() -> None:
    kv = FakeKV()
    queue = make(kv, visibility_s=5, max_attempts=2)
    queue.enqueue(items(1))
    for attempt in (1, 2):
        (lease,) = queue.lease(1, "w")  # the worker dies each time
        assert lease.attempt == attempt
        kv.clock.advance(6)
    assert queue.lease(1, "w") == []
    assert queue.stats().dead == 1
    ((key, payload, error),) = queue.dead_letters()
    assert (key, payload) == ("line-0", {"i": 0}) and "expired" in error


def test_stats_count_every_state() -> None:
    kv = FakeKV()
    queue = make(kv)
    queue.enqueue(items(10))
    a, b, c, _ = queue.lease(4, "w")
    queue.ack(a)
    queue.ack(b)
    queue.nack(c, "later")
    assert queue.stats() == QueueStats(pending=7, leased=1, done=2, dead=0)


def test_lease_and_ack_cost_per_item_does_not_grow_with_the_queue() -> None:
    def cost(n: int) -> tuple[float, float, int]:
        kv = FakeKV()
        queue = make(kv)
        queue.enqueue(items(n))
        kv.reset_counts()
        biggest = 0
        while leases := queue.lease(50, "w"):
            biggest = max(biggest, len(kv.value("jobs:q:q:meta")["inflight"]))
            for lease in leases:
                assert queue.ack(lease)
        assert kv.calls["scan"] == 0
        return sum(kv.calls.values()) / n, kv.keys_touched / n, biggest

    small_calls, small_keys, _ = cost(1_000)
    calls, keys, inflight = cost(10_000)
    assert calls < 3.5  # about 2 per lease, 1 per ack, 3 per lease call of 50
    assert keys < 4.5  # the record read and written, its index entry, the ack
    assert calls == pytest.approx(small_calls, rel=0.05)
    assert keys == pytest.approx(small_keys, rel=0.05)
    assert inflight <= 100  # acked items are folded out: meta stays the size of the work


def test_an_enqueue_that_died_halfway_and_was_retried_delivers_each_key_once() -> None:
    kv = FakeKV()
    queue = make(kv)
    start = queue._reserve(3)  # the first try reserved and wrote records, then died
    kv.mset(
        {
            f"jobs:q:q:i:{start + i}": {"key": k, "payload": p, "state": "pending"}
            | {"attempt": 0, "due_at": 0.0, "error": None}
            for i, (k, p) in enumerate(items(3))
        }
    )
    assert queue.enqueue(items(3)) == 3  # the index never named them: enqueued again
    assert sorted(drain(queue)) == ["line-0", "line-1", "line-2"]
    assert queue.stats() == QueueStats(pending=0, leased=0, done=3, dead=0)


def test_numbers_reserved_but_never_written_are_waited_for_then_skipped() -> None:
    kv = FakeKV()
    queue = make(kv, enqueue_timeout_s=30)
    queue._reserve(2)  # an enqueue that died before writing anything
    queue.enqueue(items(1))
    assert [x.item_id for x in queue.lease(5, "w")] == ["line-0"]
    assert set(kv.value("jobs:q:q:meta")["inflight"]) == {0, 1, 2}  # 0 and 1 looked at again
    kv.clock.advance(31)
    assert queue.lease(5, "w") == []
    meta = kv.value("jobs:q:q:meta")
    assert meta["holes"] == 2 and set(meta["inflight"]) == {2}
    assert queue.stats() == QueueStats(pending=0, leased=1, done=0, dead=0)


def test_drop_deletes_only_its_own_queue() -> None:
    kv = FakeKV(FakeClock())
    a, ab = make(kv, "a"), make(kv, "a:b")
    a.enqueue(items(30))
    ab.enqueue(items(5))
    (lease,) = a.lease(1, "w")
    a.nack(lease, "x", retry_after_s=0)
    a.drop()
    kv.clock.advance(1)
    assert kv.live_keys("jobs:q:a:") == []
    assert ab.stats().pending == 5
    assert a.stats() == QueueStats(0, 0, 0, 0)
    assert a.enqueue(items(2)) == 2  # a dropped queue starts afresh


def test_long_keys_are_indexed_by_hash() -> None:
    queue = make(FakeKV())
    key = "x" * 5000
    assert queue.enqueue([(key, {}), ("#short", {})]) == 2
    assert queue.enqueue([(key, {"again": True})]) == 0
    assert sorted(drain(queue)) == sorted([key, "#short"])
