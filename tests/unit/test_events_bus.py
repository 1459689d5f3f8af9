"""EventBus and ConsumerGroup over an in-memory KV store: order, contiguous batches, groups
with acknowledgements and redelivery, retention, and following the stream."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from app.events import ConsumerGroup, EventBus, EventType, follow
from tests.unit.kv_fakes import FakeKV


def make(kv: FakeKV, **kwargs: Any) -> EventBus:
    kwargs.setdefault("trim_every", 0)
    return EventBus(kv, clock=kv.clock, **kwargs)


def publish(bus: EventBus, n: int, kind: str = EventType.JOB_PROGRESS) -> None:
    bus.publish_batch([(kind, {"i": i}, "test") for i in range(n)])


def test_publish_numbers_events_in_order_and_batches_contiguously() -> None:
    kv = FakeKV()
    bus = make(kv)
    first = bus.publish(EventType.JOB_SUBMITTED, {"job": "b1"}, source="api")
    batch = bus.publish_batch(
        [(EventType.JOB_STARTED, {"job": "b1"}, "runner"), ("custom.kind", {"x": 1}, "me")]
    )
    assert first.seq == 1 and [e.seq for e in batch] == [2, 3]
    assert first.type == "job.submitted" and first.time == kv.clock() and first.source == "api"
    assert [e.to_dict() for e in bus.read(0)] == [e.to_dict() for e in [first, *batch]]
    assert bus.last_seq() == 3
    assert kv.calls["cas"] == 2  # one reservation per batch


def test_concurrent_publishers_get_contiguous_batches_and_readers_see_one_order() -> None:
    kv = FakeKV()
    batches: list[list[int]] = []
    lock = threading.Lock()

    def publisher(name: str) -> None:
        bus = make(kv)
        for _ in range(20):
            events = bus.publish_batch([("job.progress", {"by": name}, name)] * 5)
            with lock:
                batches.append([e.seq for e in events])

    threads = [threading.Thread(target=publisher, args=(f"p{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(b == list(range(b[0], b[0] + 5)) for b in batches)
    assert sorted(s for b in batches for s in b) == list(range(1, 401))
    assert [e.seq for e in make(kv).read(0, limit=1000)] == list(range(1, 401))


def test_read_filters_by_type_and_pages() -> None:
    bus = make(FakeKV())
    bus.publish_batch(
        [
            (EventType.NODE_JOINED if i % 3 == 0 else EventType.JOB_PROGRESS, {"i": i}, "t")
            for i in range(30)
        ]
    )
    nodes = bus.read(0, types=["node.joined"], limit=100)
    assert [e.data["i"] for e in nodes] == list(range(0, 30, 3))
    first, pos = bus.read_page(0, limit=4, types=[EventType.NODE_JOINED])
    assert [e.seq for e in first] == [1, 4, 7, 10] and pos == 10
    assert [e.seq for e in bus.read(10, limit=2)] == [11, 12]
    assert bus.read(30) == []


def test_a_reserved_number_not_yet_written_holds_readers_until_its_timeout() -> None:
    kv = FakeKV()
    bus = make(kv, gap_timeout_s=30)
    publish(bus, 2)
    bus._reserve(1, kv.clock())  # a publisher between reserving and writing
    publish(bus, 2)
    assert [e.seq for e in bus.read(0)] == [1, 2]  # never past an event still to appear
    group = ConsumerGroup(bus, "g")
    assert [e.seq for e in group.poll("c")] == [1, 2]
    group.ack([1, 2])
    kv.clock.advance(31)  # its publisher died
    assert [e.seq for e in bus.read(0)] == [1, 2, 4, 5]
    assert [e.seq for e in group.poll("c")] == [4, 5]


def test_two_groups_each_see_every_event_in_order_exactly_once_after_acking() -> None:
    kv = FakeKV()
    bus = make(kv)
    publish(bus, 20)
    workers = ConsumerGroup(bus, "workers", ack_timeout_s=30)
    audit = ConsumerGroup(bus, "audit", ack_timeout_s=30)
    seen: dict[str, list[int]] = {"workers": [], "audit": []}
    for round_ in range(10):
        for group, consumer, limit in ((workers, f"w{round_ % 2}", 3), (audit, "a", 7)):
            events = group.poll(consumer, limit=limit)
            assert [e.seq for e in events] == sorted(e.seq for e in events)
            seen[group.group].extend(e.seq for e in events)
            group.ack(e.seq for e in events)
        if round_ == 4:
            publish(bus, 10)  # more arrive while they consume
    assert seen == {"workers": list(range(1, 31)), "audit": list(range(1, 31))}
    kv.clock.advance(3600)  # acked: never again, however long
    assert workers.poll("w0") == [] and audit.poll("a") == []
    assert workers.pending() == [] and audit.pending() == []


def test_an_unacked_event_is_redelivered_after_the_ack_timeout() -> None:
    kv = FakeKV()
    bus = make(kv)
    publish(bus, 3)
    group = ConsumerGroup(bus, "g", ack_timeout_s=30)
    t0 = kv.clock()
    assert [e.seq for e in group.poll("c1")] == [1, 2, 3]
    group.ack([1, 3])
    assert group.pending() == [(2, "c1", t0)]
    kv.clock.advance(29)
    assert group.poll("c2") == []
    kv.clock.advance(2)
    publish(bus, 1)
    assert [e.seq for e in group.poll("c2")] == [2, 4]  # in order, the late one first
    assert [(s, c) for s, c, _ in group.pending()] == [(2, "c2"), (4, "c2")]
    group.ack([2, 4])
    kv.clock.advance(100)
    assert group.poll("c2") == []


def test_a_group_started_at_the_end_sees_only_new_events() -> None:
    bus = make(FakeKV())
    publish(bus, 5)
    group = ConsumerGroup(bus, "late", start="latest")
    assert group.poll("c") == []
    publish(bus, 2)
    assert [e.seq for e in group.poll("c")] == [6, 7]


def test_retention_by_count_moves_the_low_water_mark_readers_respect() -> None:
    kv = FakeKV()
    bus = make(kv, max_events=10)
    group = ConsumerGroup(bus, "g")
    publish(bus, 25)
    assert bus.trim() == 15
    assert bus.trim() == 0
    assert [e.seq for e in bus.read(0, limit=100)] == list(range(16, 26))
    assert bus.low_seq() == 16
    assert [e.seq for e in group.poll("c", limit=100)] == list(range(16, 26))
    kv.clock.advance(1)
    assert len(kv.live_keys("events:events:e:")) == 10


def test_retention_by_age() -> None:
    kv = FakeKV()
    bus = make(kv, max_age_s=100)
    publish(bus, 5)
    kv.clock.advance(60)
    publish(bus, 5)
    kv.clock.advance(50)  # the first five are 110 s old, the others 50 s
    assert bus.trim() == 5
    assert [e.seq for e in bus.read(0)] == [6, 7, 8, 9, 10]


def test_publishing_trims_every_so_many_events() -> None:
    kv = FakeKV()
    bus = make(kv, max_events=50, trim_every=100)
    for _ in range(12):
        publish(bus, 10)
    assert bus.low_seq() == 51  # trimmed when publishing crossed 100
    assert bus.read(0, limit=1)[0].seq == 51


def test_an_unacked_event_trimmed_away_is_dropped_from_pending() -> None:
    kv = FakeKV()
    bus = make(kv, max_events=2)
    group = ConsumerGroup(bus, "g", ack_timeout_s=10)
    publish(bus, 3)
    assert [e.seq for e in group.poll("c", limit=1)] == [1]
    bus.trim()
    kv.clock.advance(11)
    assert [e.seq for e in group.poll("c")] == [2, 3]
    assert [s for s, _, _ in group.pending()] == [2, 3]


async def test_follow_yields_new_events_as_they_come() -> None:
    kv = FakeKV()
    bus = make(kv)
    publish(bus, 2)
    naps: list[float] = []

    async def nap(seconds: float) -> None:
        naps.append(seconds)
        bus.publish(EventType.SYSTEM_OVERLOAD, {"n": len(naps)}, source="gw")
        bus.publish(EventType.JOB_PROGRESS, {"n": len(naps)}, source="gw")

    got = []
    async for event in follow(bus, 1, types=["system.overload"], poll_s=0.5, sleep=nap):
        got.append(event)
        if len(got) == 2:
            break
    assert [e.data for e in got] == [{"n": 1}, {"n": 2}]
    assert naps == [0.5, 0.5]


async def test_follow_from_now_skips_the_past() -> None:
    bus = make(FakeKV())
    publish(bus, 3)

    async def nap(seconds: float) -> None:
        bus.publish("job.failed", {}, source="x")

    stream = follow(bus, poll_s=0, sleep=nap)
    first = await asyncio.wait_for(anext(stream), 5)
    assert first.seq == 4
