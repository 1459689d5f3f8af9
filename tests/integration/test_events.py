"""The event bus on the real KV store: two consumer groups each see every event, in order and
exactly once after acknowledging, with two publishers writing at once; an event left
unacknowledged is delivered again after the group's timeout, and not before."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from app.events.bus import ConsumerGroup, Event, EventBus
from tests.integration.support import running_kv


def drain(group: ConsumerGroup, consumer: str) -> list[int]:
    seen: list[int] = []
    while batch := group.poll(consumer, limit=7):
        seen += [event.seq for event in batch]
        group.ack(event.seq for event in batch)
    return seen


def test_two_groups_see_every_event_in_order_once_and_unacked_ones_again(
    ray_cluster: object,
) -> None:
    with running_kv("events-it") as kv:
        bus = EventBus(kv, "it")

        def publish(source: str) -> list[Event]:
            out: list[Event] = []
            for i in range(5):
                out += bus.publish_batch(
                    [("job.progress", {"i": i, "n": n}, source) for n in range(6)]
                )
            return out

        with ThreadPoolExecutor(2) as pool:
            published = [e for part in pool.map(publish, ["p1", "p2"]) for e in part]
        seqs = sorted(e.seq for e in published)
        assert seqs == list(range(seqs[0], seqs[0] + 60))  # contiguous: no gap, no repeat
        a = ConsumerGroup(bus, "a", ack_timeout_s=1.0)
        b = ConsumerGroup(bus, "b", ack_timeout_s=1.0)
        assert drain(a, "a-1") == seqs
        assert drain(b, "b-1") == seqs
        assert a.poll("a-2") == [] and b.poll("b-2") == []  # acknowledged: never again

        late = bus.publish("job.completed", {"batch": "x"}, source="it")
        assert [e.seq for e in a.poll("a-1")] == [late.seq]  # delivered, not acknowledged
        assert a.poll("a-2") == []  # not due yet
        time.sleep(1.3)
        assert [e.seq for e in a.poll("a-2")] == [late.seq]  # redelivered to another consumer
        a.ack([late.seq])
        time.sleep(1.3)
        assert a.poll("a-1") == []
        assert [e.seq for e in b.poll("b-1")] == [late.seq]  # the other group still gets it
