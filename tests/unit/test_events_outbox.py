"""The event outbox (app.events.outbox): queued at once, published in one batch, kept and sent
later while the store is away, bounded."""

from __future__ import annotations

from typing import Any

from app.events.bus import EventBus
from app.events.outbox import Notice, Outbox
from tests.unit.kv_fakes import FakeClock, FakeKV


class Flaky:
    """Connects to the fake store only once `up`."""

    def __init__(self, kv: FakeKV) -> None:
        self.kv, self.up = kv, False

    def __call__(self) -> Any:
        if not self.up:
            raise ConnectionError("store away")
        return self.kv


def test_events_wait_while_the_store_is_away_and_go_in_order_later() -> None:
    kv = FakeKV(FakeClock())
    connect = Flaky(kv)
    outbox = Outbox(connect, "fleet-router", retry_s=0)
    outbox.add("replica.unhealthy", {"replica": "a"})
    assert outbox.flush() == 0 and len(outbox) == 1
    outbox.add("replica.healthy", {"replica": "a"})
    connect.up = True
    assert outbox.flush() == 2 and len(outbox) == 0
    events = EventBus(kv).read(0)
    assert [(e.type, e.data["replica"], e.source) for e in events] == [
        ("replica.unhealthy", "a", "fleet-router"),
        ("replica.healthy", "a", "fleet-router"),
    ]
    assert [e.seq for e in events] == [events[0].seq, events[0].seq + 1]


def test_a_full_outbox_keeps_the_newest_and_counts_the_dropped() -> None:
    outbox = Outbox(Flaky(FakeKV(FakeClock())), "x", capacity=3, retry_s=0)
    for i in range(5):
        outbox.add("node.joined", {"i": i})
    assert outbox.flush() == 0
    assert len(outbox) == 3 and outbox.dropped == 2


def test_a_notice_publishes_at_most_once_a_period_with_its_count() -> None:
    kv, clock = FakeKV(FakeClock()), FakeClock()
    outbox = Outbox(lambda: kv, "replica")
    notice = Notice(
        outbox, "system.overload", {"model": "m"}, every_s=60, clock=clock, send=lambda f: None
    )
    assert notice.notice() is True  # the first occurrence is told at once
    assert [notice.notice() for _ in range(5)] == [False] * 5
    clock.advance(61)
    assert notice.notice() is True
    outbox.flush()
    events = EventBus(kv).read(0)
    assert [(e.type, e.data["count"]) for e in events] == [
        ("system.overload", 1),
        ("system.overload", 6),
    ]


def test_a_store_that_is_away_is_not_tried_again_at_once() -> None:
    kv = FakeKV(FakeClock())
    connect = Flaky(kv)
    outbox = Outbox(connect, "x", retry_s=60)
    outbox.add("node.left", {})
    assert outbox.flush() == 0
    connect.up = True
    assert outbox.flush() == 0 and len(outbox) == 1  # within the retry period: not tried
