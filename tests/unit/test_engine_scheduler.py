"""The continuous engine's scheduler (pure): admission against the padded KV bound, arrival
order, the prefill budget, bounded waiting, refusals and Retry-After, and the capacity sizing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from app.catalog.engine import EngineSettings
from app.serving.engines import kv_capacity_tokens
from app.serving.engines.scheduler import ExceedsCapacity, QueueFull, Scheduler


@dataclass(eq=False)
class Seq:
    prompt_tokens: int
    max_tokens: int
    cancelled: bool = False
    background: bool = False

    @property
    def reservation(self) -> int:
        return self.prompt_tokens + self.max_tokens


def scheduler(
    capacity: int = 100,
    running: int = 4,
    waiting: int = 2,
    prefill: int = 1000,
    share: float = 1.0,
) -> Scheduler[Seq]:
    return Scheduler(
        capacity,
        max_running=running,
        max_waiting=waiting,
        max_prefill_tokens=prefill,
        background_share=share,
    )


def test_admission_counts_padding_not_the_sum() -> None:
    s = scheduler(capacity=100)
    long, short = Seq(10, 40), Seq(1, 4)  # 50 and 5 positions: 55 in all, but 2 x 50 padded
    s.offer(long)
    s.offer(short)
    assert s.admit() == [long, short]
    assert s.utilization == 1.0
    third = Seq(1, 4)
    s.offer(third)  # waits: three rows would pad to 150
    assert s.admit() == []
    s.release([long])
    assert s.admit() == [third]
    assert s.utilization == pytest.approx(2 * 5 / 100)


def test_arrival_order_is_kept_and_the_prefill_budget_splits_bursts() -> None:
    s = scheduler(capacity=10_000, running=8, prefill=100)
    a, b, c = Seq(60, 10), Seq(60, 10), Seq(5, 10)
    for seq in (a, b, c):
        s.offer(seq)
    assert s.admit() == [a]  # b would take the prefill past 100; c may not overtake it
    assert s.admit() == [b, c]
    huge = Seq(500, 10)
    s.offer(huge)
    assert s.admit() == [huge]  # one prompt is always taken, however long


def test_max_running_bounds_the_batch() -> None:
    s = scheduler(capacity=10_000, running=2, waiting=5)
    seqs = [Seq(1, 1) for _ in range(3)]
    for seq in seqs:
        s.offer(seq)
    assert s.admit() == seqs[:2]
    s.release(seqs[:1])
    assert s.admit() == seqs[2:]


def test_waiting_is_bounded_and_refusals_say_when_to_retry() -> None:
    s = scheduler(capacity=100, running=1, waiting=1)
    s.offer(Seq(10, 80))
    s.admit()
    s.offer(Seq(10, 80))  # waits (the one place)
    with pytest.raises(QueueFull) as full:
        s.offer(Seq(10, 80), tokens_per_s=20.0)
    assert full.value.retry_after_s == 4  # 80 queued tokens at 20 tokens/s
    assert scheduler().retry_after_s(0.0) == 1


def test_sequences_that_can_run_now_are_never_refused() -> None:
    s = scheduler(capacity=100, running=4, waiting=0)
    first, second = Seq(5, 5), Seq(5, 5)
    s.offer(first)
    s.offer(second)  # both fit together, so neither counts against max_waiting
    with pytest.raises(QueueFull):
        s.offer(Seq(60, 30))
    assert s.admit() == [first, second]


def test_cancelled_waiting_sequences_are_dropped() -> None:
    s = scheduler(capacity=100, running=1, waiting=1)
    s.offer(Seq(10, 80))
    s.admit()
    gone = Seq(10, 80)
    s.offer(gone)
    gone.cancelled = True
    assert s.queued == 0  # counted out at once, not at the next admission
    s.offer(Seq(10, 80))  # the cancelled one holds no place
    s.release(list(s.running))
    admitted = s.admit()
    assert len(admitted) == 1 and admitted[0] is not gone


def test_a_sequence_larger_than_the_cache_is_refused_for_good() -> None:
    with pytest.raises(ExceedsCapacity, match="101 KV cache positions"):
        scheduler(capacity=100).offer(Seq(1, 100))


def test_capacity_from_memory_and_overrides() -> None:
    settings = EngineSettings()
    gib = 1 << 30
    sized = kv_capacity_tokens(
        settings,
        bytes_per_token=1 << 20,
        free_bytes=10 * gib,
        on_gpu=True,
        max_running=1000,
        max_context=4096,
    )
    assert sized == int(10 * gib * 0.85) // (1 << 20)
    capped = kv_capacity_tokens(
        settings,
        bytes_per_token=1,
        free_bytes=10 * gib,
        on_gpu=False,
        max_running=8,
        max_context=512,
    )
    assert capped == 8 * 512  # no more than the batch can ever fill
    fixed = EngineSettings(kv_cache_tokens=123)
    assert (
        kv_capacity_tokens(
            fixed, bytes_per_token=1, free_bytes=1, on_gpu=False, max_running=1, max_context=1
        )
        == 123
    )


def test_arrivals_are_gathered_while_a_batch_runs() -> None:
    s = Scheduler(
        10_000, max_running=64, max_waiting=64, max_prefill_tokens=4096, max_prefill_delay_steps=4
    )
    assert not s.prefill_due(0)  # nothing waits
    first = Seq(5, 5)
    s.offer(first)
    assert s.prefill_due(0)  # nothing runs: at once
    s.admit()
    for _ in range(7):
        s.offer(Seq(5, 5))
        s.admit()
    s.offer(Seq(5, 5))
    assert not s.prefill_due(0)  # one waits beside eight running: gather more
    assert s.prefill_due(4)  # ... for at most four steps
    s.offer(Seq(5, 5))
    assert s.prefill_due(1)  # two waiting serve a quarter of the batch: worth a pass
    eager = Scheduler(10_000, max_running=64, max_waiting=64, max_prefill_tokens=4096)
    eager.offer(Seq(5, 5))
    eager.admit()
    eager.offer(Seq(5, 5))
    assert eager.prefill_due(0)


def test_cancelled_sequences_behind_a_blocked_head_hold_no_place() -> None:
    s = scheduler(capacity=100, running=1, waiting=1)
    s.offer(Seq(10, 80))
    s.admit()
    head = Seq(10, 80)
    s.offer(head)  # waits: the one place
    gone = [Seq(10, 80), Seq(10, 80)]
    s.waiting.extend(gone)  # as if offered when there was more room
    for seq in gone:
        seq.cancelled = True
    with pytest.raises(QueueFull):
        s.offer(Seq(10, 80))  # the live head holds the place ...
    head.cancelled = True
    s.offer(Seq(10, 80))  # ... and once it too is gone, there is room
    assert len(s.waiting) == 1


def test_background_work_runs_within_its_share_of_rows_and_cache() -> None:
    s = scheduler(capacity=1000, running=8, waiting=8, share=0.25)  # 2 rows, 250 positions
    lines = [Seq(10, 20, background=True) for _ in range(4)]
    for line in lines:
        s.offer(line)
    assert s.admit() == lines[:2]  # the rest wait although rows and cache are free
    s.release(lines[:1])
    assert s.admit() == [lines[2]]
    wide = scheduler(capacity=1000, running=8, waiting=8, share=0.25)
    big = [Seq(100, 100, background=True) for _ in range(2)]  # 2 x 200 > 250 positions
    for line in big:
        wide.offer(line)
    assert wide.admit() == big[:1]  # the first background row fits whatever its share
    assert wide.admit() == []


def test_interactive_sequences_overtake_waiting_background_ones() -> None:
    s = scheduler(capacity=1000, running=2, waiting=8, share=1.0)
    first, second = Seq(10, 20, background=True), Seq(10, 20, background=True)
    s.offer(first)
    assert s.admit() == [first]
    s.offer(second)
    urgent = Seq(10, 20)
    s.offer(urgent)  # arrived after `second`, admitted before it
    assert s.admit() == [urgent]
    assert s.admit() == []
    s.release([first])
    assert s.admit() == [second]


def test_no_background_sequence_is_admitted_while_an_interactive_one_waits() -> None:
    s = scheduler(capacity=100, running=4, waiting=8, share=1.0)
    running = Seq(10, 40)
    s.offer(running)
    assert s.admit() == [running]
    blocked, small = Seq(10, 50), Seq(1, 1, background=True)  # 2 x 60 > 100; 2 x 50 fits
    s.offer(blocked)
    s.offer(small)
    assert s.admit() == []  # the small line would fit, but it would take the blocked one's room
    assert s.queued == 2
    s.release([running])
    assert s.admit() == [blocked]  # and the small line still waits: 2 x 60 > 100
    s.release([blocked])
    assert s.admit() == [small]


def test_background_waiting_is_bounded_apart_from_interactive_waiting() -> None:
    s = scheduler(capacity=1000, running=4, waiting=1, share=0.25)  # one background row
    lines = [Seq(10, 10, background=True) for _ in range(2)]
    for line in lines:
        s.offer(line)  # one runs, one waits
    with pytest.raises(QueueFull, match="background"):
        s.offer(Seq(10, 10, background=True))
    s.offer(Seq(10, 10))  # interactive work still gets in
    assert [x.background for x in s.admit()] == [False, True]
    assert len(s.drain()) == 1 and s.queued == 0


def test_background_can_be_held_back_from_an_interactive_prefill() -> None:
    s = scheduler(capacity=1000, running=4, waiting=4)
    line, urgent = Seq(10, 10, background=True), Seq(10, 10)
    s.offer(line)
    s.offer(urgent)
    assert s.admit(background_with_interactive=False) == [urgent]
    assert s.admit(background_with_interactive=False) == [line]  # next time, alone
    later = Seq(10, 10, background=True)
    s.offer(later)
    assert s.admit(background=False) == []  # the engine says lines stand aside now
    assert len(s.drain()) == 1 and s.queued == 0


def test_retry_after_counts_only_the_work_queued_ahead_of_the_class() -> None:
    s = scheduler(capacity=100, running=1, waiting=8)
    s.offer(Seq(10, 90))
    s.admit()
    for _ in range(3):
        s.offer(Seq(10, 90, background=True))  # 270 tokens of batch work waiting
    s.offer(Seq(10, 90))  # 90 tokens of interactive work waiting
    assert s.retry_after_s(30.0) == 3  # interactive work never waits behind batch lines
    assert s.retry_after_s(30.0, background=True) == 12


def test_lines_held_back_do_not_make_a_prefill_due() -> None:
    s: Scheduler[Seq] = Scheduler(
        10_000, max_running=8, max_waiting=8, max_prefill_tokens=4096, max_prefill_delay_steps=4
    )
    for _ in range(7):
        s.offer(Seq(5, 5))
    s.admit()
    for _ in range(2):
        s.offer(Seq(5, 5, background=True))
    s.offer(Seq(5, 5))  # one arrival: 1 x 4 < 7 running, so it is gathered with later ones
    assert not s.prefill_due(0, background=False)
    assert s.prefill_due(0)  # counting the lines, three arrivals are worth a pass
