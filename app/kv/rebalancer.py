"""Coordinator side of elasticity: rebalancing slots between groups and splitting a hot group."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import Any

from app.kv.config import KVConfig
from app.kv.planner import ShardLoad, hottest, plan_rebalance, plan_split
from app.kv.slot_map import SlotMap

log = logging.getLogger(__name__)


class RebalanceMixin:
    """Plans with app.kv.planner and carries moves out with the shard migration protocol.

    One admin operation runs at a time; each slot move survives a failover of either end by
    waiting for the failover and replaying the (idempotent) protocol.
    """

    cfg: KVConfig
    groups: dict[int, Any]
    slots: SlotMap
    _admin: asyncio.Lock

    async def start(self) -> int:
        raise NotImplementedError

    async def _failover(self, gid: int, seen_term: int) -> None:
        raise NotImplementedError

    async def _create_group(
        self, gid: int, index: int, size: int, slots: list[int], old_term: int | None = None
    ) -> Any:
        raise NotImplementedError

    def _bump(self) -> None:
        raise NotImplementedError

    async def rebalance(self) -> list[dict[str, Any]]:
        """Move slots from groups above rebalance_high x mean size or load to those below
        rebalance_low x mean; returns the moves made."""
        await self.start()
        async with self._admin:
            moves = plan_rebalance(
                await self._loads(), self.cfg.rebalance_high, self.cfg.rebalance_low
            )
            for move in moves:
                await self._migrate(move.source, move.target, list(move.slots))
            return [asdict(move) for move in moves]

    async def split(self, gid: int | None = None) -> dict[str, Any]:
        """Add a group and move it about half of group `gid`'s weight (default: the hottest)."""
        await self.start()
        async with self._admin:
            loads = await self._loads()
            source = gid if gid is not None else hottest(loads)
            load = next(item for item in loads if item.gid == source)
            weights = {s: load.slot_keys.get(s, 0) + load.slot_ops.get(s, 0) for s in load.owned}
            slots = plan_split(load.owned, weights)
            if not slots:
                return {"source": source, "target": None, "slots": 0}
            target = max(self.groups) + 1
            await self._create_group(target, target, self.groups[source].size, [])
            self._bump()
            await self._migrate(source, target, slots)
            return {"source": source, "target": target, "slots": len(slots)}

    async def move_slots(self, slots: list[int], target: int) -> int:
        """Move `slots` (from whichever groups own them) to group `target`; returns how many."""
        await self.start()
        async with self._admin:
            by_source: dict[int, list[int]] = {}
            for slot in slots:
                owner = self.slots.owner(slot)
                if owner != target:
                    by_source.setdefault(owner, []).append(slot)
            for source, moving in by_source.items():
                await self._migrate(source, target, moving)
            return sum(len(v) for v in by_source.values())

    async def resume_migrations(self) -> None:
        """Finish migrations a failure or restart interrupted (primaries remember them)."""
        async with self._admin:
            for gid in sorted(self.groups):
                pending = await self.groups[gid].primary.handle.migrating_slots.remote()
                for target, slots in pending.items():
                    if target in self.groups:
                        await self._migrate(gid, target, slots)

    async def _loads(self) -> list[ShardLoad]:
        gids = sorted(self.groups)
        stats = await asyncio.gather(
            *(self.groups[g].primary.handle.load_stats.remote(True) for g in gids)
        )
        loads = []
        for gid, (keys, ops) in zip(gids, stats, strict=True):
            owned = self.slots.slots_of(gid)
            mine = set(owned)
            loads.append(
                ShardLoad(
                    gid,
                    {s: n for s, n in keys.items() if s in mine},
                    {s: n for s, n in ops.items() if s in mine},
                    owned,
                )
            )
        return loads

    async def _migrate(self, source: int, target: int, slots: list[int]) -> None:
        for attempt in range(8):
            src, dst = self.groups[source], self.groups[target]
            try:
                await self._migrate_once(src, dst, slots)
                return
            except Exception as exc:
                log.warning("kv migration %s -> %s interrupted (%r); retrying", source, target, exc)
                await self._failover(source, src.term)
                await self._failover(target, dst.term)
                await asyncio.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"kv migration of {len(slots)} slots {source} -> {target} failed")

    async def _migrate_once(self, src: Any, dst: Any, slots: list[int]) -> None:
        source, target = src.primary.handle, dst.primary.handle
        await target.begin_import.remote(slots, src.gid)
        await source.begin_migrate.remote(slots, dst.gid)
        while await source.migrate_batch.remote(slots, target, self.cfg.migration_batch_keys):
            pass
        await target.end_import.remote(slots)
        await source.end_migrate.remote(slots, dst.gid)
        self.slots.assign(slots, dst.gid)
        self._bump()
