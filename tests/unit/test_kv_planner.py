"""The pure rebalance and split planners."""

from __future__ import annotations

from app.kv.planner import ShardLoad, SlotMove, hottest, plan_rebalance, plan_split


def _apply(loads: list[ShardLoad], moves: list[SlotMove]) -> dict[int, int]:
    keys = {s.gid: dict(s.slot_keys) for s in loads}
    for move in moves:
        for slot in move.slots:
            keys[move.target][slot] = keys[move.source].pop(slot, 0)
    return {gid: sum(per.values()) for gid, per in keys.items()}


def test_balanced_cluster_needs_no_moves() -> None:
    loads = [
        ShardLoad(0, {s: 10 for s in range(0, 100)}, owned=list(range(100))),
        ShardLoad(1, {s: 10 for s in range(100, 200)}, owned=list(range(100, 200))),
    ]
    assert plan_rebalance(loads) == []
    assert plan_rebalance(loads[:1]) == []


def test_size_imbalance_moves_slots_from_big_to_small() -> None:
    loads = [
        ShardLoad(0, {s: 10 for s in range(0, 300)}),  # 3000 keys
        ShardLoad(1, {s: 10 for s in range(300, 350)}),  # 500 keys
        ShardLoad(2, {s: 10 for s in range(350, 450)}),  # 1000 keys
    ]
    moves = plan_rebalance(loads)
    assert moves and all(m.source == 0 for m in moves)
    totals = _apply(loads, moves)
    mean = sum(totals.values()) / 3
    assert all(0.8 * mean <= t <= 1.2 * mean for t in totals.values()), totals
    moved = [s for m in moves for s in m.slots]
    assert len(moved) == len(set(moved))  # no slot moves twice


def test_load_imbalance_is_balanced_when_sizes_are_even() -> None:
    loads = [
        ShardLoad(0, {s: 1 for s in range(10)}, {s: 100 for s in range(10)}),
        ShardLoad(1, {s: 1 for s in range(10, 20)}, {s: 5 for s in range(10, 20)}),
    ]
    moves = plan_rebalance(loads)
    assert moves and moves[0].source == 0 and moves[0].target == 1
    # Moving hot slots must not push the receiver's size out of band.
    sizes = _apply(loads, moves)
    assert max(sizes.values()) <= 1.2 * sum(sizes.values()) / 2


def test_a_single_giant_slot_is_not_bounced_around() -> None:
    loads = [ShardLoad(0, {1: 1000}), ShardLoad(1, {2: 10})]
    assert plan_rebalance(loads) == []


def test_split_takes_a_contiguous_prefix_with_half_the_weight() -> None:
    owned = list(range(100))
    weights = {s: 1.0 for s in owned}
    taken = plan_split(owned, weights)
    assert taken == list(range(50))
    skewed = {s: (100.0 if s < 10 else 1.0) for s in owned}
    assert plan_split(owned, skewed) == list(range(5))


def test_split_without_weight_halves_by_count_and_keeps_one_slot() -> None:
    assert plan_split(list(range(10)), {}) == list(range(5))
    assert plan_split([7], {7: 5}) == []
    assert plan_split([1, 2], {2: 100}) == [1]


def test_hottest_prefers_load_then_size() -> None:
    loads = [ShardLoad(0, {1: 100}, {1: 5}), ShardLoad(1, {2: 1}, {2: 50})]
    assert hottest(loads) == 1
    assert hottest([ShardLoad(0, {1: 1}), ShardLoad(1, {2: 9})]) == 1
