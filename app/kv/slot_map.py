"""The slot map: which shard group owns each of the 16384 slots, versioned by an epoch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.kv.slots import NUM_SLOTS, slot_ranges


class SlotMap:
    """Slot → shard group id. Every change bumps `epoch` so clients can tell a stale copy."""

    def __init__(self, owners: list[int], epoch: int = 1) -> None:
        if len(owners) != NUM_SLOTS:
            raise ValueError(f"a slot map needs {NUM_SLOTS} owners, got {len(owners)}")
        self._owners = list(owners)
        self.epoch = epoch

    @classmethod
    def even(cls, gids: list[int]) -> SlotMap:
        """Contiguous, near-equal ranges: group i gets slots [i*N/n, (i+1)*N/n)."""
        if not gids:
            raise ValueError("a slot map needs at least one shard group")
        n = len(gids)
        owners = [gids[slot * n // NUM_SLOTS] for slot in range(NUM_SLOTS)]
        return cls(owners)

    def owner(self, slot: int) -> int:
        return self._owners[slot]

    @property
    def owners(self) -> list[int]:
        """A copy of the owner table, safe to hand to clients."""
        return list(self._owners)

    def gids(self) -> list[int]:
        return sorted(set(self._owners))

    def slots_of(self, gid: int) -> list[int]:
        return [slot for slot, owner in enumerate(self._owners) if owner == gid]

    def counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for owner in self._owners:
            counts[owner] = counts.get(owner, 0) + 1
        return counts

    def assign(self, slots: Iterable[int], gid: int) -> None:
        """Give `slots` to `gid` and bump the epoch."""
        for slot in slots:
            if not 0 <= slot < NUM_SLOTS:
                raise ValueError(f"slot {slot} is outside 0..{NUM_SLOTS - 1}")
            self._owners[slot] = gid
        self.epoch += 1

    def ranges(self, gid: int) -> list[tuple[int, int]]:
        return slot_ranges(self.slots_of(gid))

    def run_end(self, slot: int) -> int:
        """Last slot of the contiguous run that starts at `slot` and has the same owner."""
        owner = self._owners[slot]
        end = slot
        while end + 1 < NUM_SLOTS and self._owners[end + 1] == owner:
            end += 1
        return end

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: epoch plus inclusive ranges per group."""
        return {
            "epoch": self.epoch,
            "ranges": {str(gid): self.ranges(gid) for gid in self.gids()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlotMap:
        owners = [-1] * NUM_SLOTS
        for gid, ranges in data["ranges"].items():
            for first, last in ranges:
                owners[first : last + 1] = [int(gid)] * (last - first + 1)
        if -1 in owners:
            raise ValueError(f"slot map is missing slot {owners.index(-1)}")
        return cls(owners, epoch=int(data["epoch"]))
