"""The slot map: even layout, reassignment, epochs and its on-disk form."""

from __future__ import annotations

import pytest

from app.kv.slot_map import SlotMap
from app.kv.slots import NUM_SLOTS


def test_even_map_splits_contiguously() -> None:
    m = SlotMap.even([0, 1, 2])
    counts = m.counts()
    assert sum(counts.values()) == NUM_SLOTS
    assert max(counts.values()) - min(counts.values()) <= 1
    assert m.ranges(0) == [(0, 5461)]
    assert m.owner(0) == 0 and m.owner(NUM_SLOTS - 1) == 2


def test_assign_moves_slots_and_bumps_epoch() -> None:
    m = SlotMap.even([0, 1])
    before = m.epoch
    m.assign([0, 1, 2, 10], 1)
    assert m.epoch == before + 1
    assert [m.owner(s) for s in (0, 1, 2, 3, 10)] == [1, 1, 1, 0, 1]
    assert m.run_end(0) == 2
    assert m.run_end(3) == 9
    with pytest.raises(ValueError, match="outside"):
        m.assign([NUM_SLOTS], 0)


def test_round_trip_through_dict() -> None:
    m = SlotMap.even([3, 7])
    m.assign(range(100, 200), 3)
    again = SlotMap.from_dict(m.to_dict())
    assert again.owners == m.owners and again.epoch == m.epoch
    assert again.gids() == [3, 7]


def test_incomplete_maps_are_rejected() -> None:
    with pytest.raises(ValueError, match="missing slot"):
        SlotMap.from_dict({"epoch": 1, "ranges": {"0": [[0, 100]]}})
    with pytest.raises(ValueError, match="needs"):
        SlotMap([0] * 10)
    with pytest.raises(ValueError, match="at least one"):
        SlotMap.even([])


def test_owners_is_a_copy() -> None:
    m = SlotMap.even([0, 1])
    owners = m.owners
    owners[0] = 99
    assert m.owner(0) == 0
