"""Pure rebalance and split planning: which slots move from which shard group to which."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class ShardLoad:
    """What one shard group holds: per owned slot, its keys (size) and recent operations (load)."""

    gid: int
    slot_keys: dict[int, int] = field(default_factory=dict)
    slot_ops: dict[int, int] = field(default_factory=dict)
    owned: list[int] = field(default_factory=list)

    @property
    def keys(self) -> int:
        return sum(self.slot_keys.values())

    @property
    def ops(self) -> int:
        return sum(self.slot_ops.values())


@dataclass(frozen=True)
class SlotMove:
    """Move `slots` from shard group `source` to shard group `target`."""

    source: int
    target: int
    slots: tuple[int, ...]


class _Balance:
    """Working totals of both metrics while moves are being chosen."""

    def __init__(self, loads: Sequence[ShardLoad]) -> None:
        self.metrics = {
            "size": {s.gid: dict(s.slot_keys) for s in loads},
            "load": {s.gid: dict(s.slot_ops) for s in loads},
        }
        self.totals = {
            name: {gid: float(sum(per.values())) for gid, per in by_gid.items()}
            for name, by_gid in self.metrics.items()
        }

    def mean(self, metric: str) -> float:
        values = self.totals[metric].values()
        return sum(values) / len(values) if values else 0.0

    def move(self, slot: int, source: int, target: int) -> None:
        for name, by_gid in self.metrics.items():
            weight = by_gid[source].pop(slot, 0)
            if weight:
                by_gid[target][slot] = weight
            self.totals[name][source] -= weight
            self.totals[name][target] += weight


def plan_rebalance(
    loads: Sequence[ShardLoad], high: float = 1.2, low: float = 0.8, max_slots: int = 4096
) -> list[SlotMove]:
    """Move slots from groups above `high` x mean (size, then load) to groups below `low` x mean.

    A slot moves only if that leaves the receiver no larger than the donor on the metric being
    balanced and under `high` x mean on the other one, so a plan never swaps one imbalance for
    another. Heaviest slots go first: fewer slots move for the same effect.
    """
    if len(loads) < 2:
        return []
    balance = _Balance(loads)
    moved: dict[tuple[int, int], list[int]] = {}
    budget = max_slots
    for metric, other in (("size", "load"), ("load", "size")):
        budget -= _balance_metric(balance, metric, other, high, low, moved, budget)
    return [SlotMove(src, dst, tuple(sorted(slots))) for (src, dst), slots in moved.items()]


def _balance_metric(
    balance: _Balance,
    metric: str,
    other: str,
    high: float,
    low: float,
    moved: dict[tuple[int, int], list[int]],
    budget: int,
) -> int:
    mean, other_mean = balance.mean(metric), balance.mean(other)
    totals, other_totals = balance.totals[metric], balance.totals[other]
    if mean <= 0:
        return 0
    donors = sorted((g for g in totals if totals[g] > high * mean), key=lambda g: -totals[g])
    receivers = [g for g in totals if totals[g] < low * mean]
    count = 0
    for donor in donors:
        weights = balance.metrics[metric][donor]
        for slot in sorted(weights, key=lambda s: -weights[s]):
            if count >= budget or totals[donor] <= mean:
                break
            target = min(receivers, key=lambda g: totals[g], default=None)
            if target is None or totals[target] >= mean:
                break
            weight = weights[slot]
            other_weight = balance.metrics[other][donor].get(slot, 0)
            if totals[target] + weight > totals[donor] - weight:
                continue  # too heavy: moving it would overshoot, try a lighter slot
            if other_mean > 0 and other_totals[target] + other_weight > high * other_mean:
                continue
            balance.move(slot, donor, target)
            moved.setdefault((donor, target), []).append(slot)
            count += 1
    return count


def hottest(loads: Sequence[ShardLoad]) -> int:
    """The group a split should relieve: most operations, then most keys."""
    if not loads:
        raise ValueError("no shard groups to choose from")
    return max(loads, key=lambda s: (s.ops, s.keys, -s.gid)).gid


def plan_split(owned: Sequence[int], weights: Mapping[int, float]) -> list[int]:
    """Slots to hand to a new group: a contiguous prefix of `owned` holding about half the weight.

    Weight is keys plus operations per slot; with no weight at all, half the slots by count.
    The donor always keeps at least one slot.
    """
    slots = sorted(owned)
    if len(slots) < 2:
        return []
    total = sum(weights.get(s, 0) for s in slots)
    if total <= 0:
        return slots[: len(slots) // 2]
    taken: list[int] = []
    acc = 0.0
    for slot in slots[:-1]:
        weight = weights.get(slot, 0)
        # Take a slot when at least half of it fits under the halfway mark: closest cut.
        if taken and acc + weight / 2 > total / 2:
            break
        taken.append(slot)
        acc += weight
    return taken
