"""Coordinator side of a restart: finding the members that outlived the previous coordinator
process and adopting them (the plan comes from app.kv.recovery)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

import ray

from app.kv.config import KVConfig
from app.kv.membership import Group, Member, alive_nodes, kill
from app.kv.placement import effective_replication
from app.kv.recovery import MemberReport, member_number, plan_recovery
from app.kv.slot_map import SlotMap
from app.kv.store import SLOT_OWNED

log = logging.getLogger(__name__)

_DESCRIBE_TIMEOUT_S = 60.0  # a member on a busy machine may take a while to answer


class RestartMixin:
    """Rebuilds `groups` and `slots` from the live members' reports."""

    cfg: KVConfig
    groups: dict[int, Group]
    slots: SlotMap
    _members: int

    async def _promote(self, group: Group) -> None:
        raise NotImplementedError

    def _repair_later(self, gid: int) -> None:
        raise NotImplementedError

    def _name_prefix(self) -> str:
        return f"{self.cfg.name}/"

    def _named_members(self) -> dict[str, Any]:
        """Handles of every member of this cluster that still holds its name."""
        prefix, namespace = self._name_prefix(), self.cfg.namespace
        handles = {}
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == namespace and actor["name"].startswith(prefix):
                with contextlib.suppress(ValueError):  # it died meanwhile
                    handles[actor["name"]] = ray.get_actor(actor["name"], namespace=namespace)
        return handles

    async def _discover(self) -> dict[str, tuple[Any, MemberReport]]:
        """Every live member of this cluster (found by name) and what it reports."""
        handles = self._named_members()
        replies = await asyncio.gather(
            *(asyncio.wait_for(h.describe.remote(), _DESCRIBE_TIMEOUT_S) for h in handles.values()),
            return_exceptions=True,
        )
        return {
            reply.member: (handle, reply)
            for handle, reply in zip(handles.values(), replies, strict=True)
            if isinstance(reply, MemberReport)
        }

    async def _adopt(self, found: dict[str, tuple[Any, MemberReport]]) -> None:
        """Rebuild groups and the slot map from the members' reports, finish a failover the
        previous coordinator started, and stop members no group uses."""
        default = effective_replication(
            self.cfg.replication_factor, len(alive_nodes()), self.cfg.allow_colocated_replicas
        )
        plan = plan_recovery((report for _, report in found.values()), default)
        self._members = max(member_number(mid) for mid in found)

        def member(mid: str) -> Member:
            return Member(mid, found[mid][0], found[mid][1].node)

        for mid in plan.discard:
            kill(found[mid][0])
        for gid, gp in plan.groups.items():
            primary = member(gp.primary) if gp.primary else Member("", None, "")
            replicas = {mid: member(mid) for mid in gp.replicas}
            self.groups[gid] = Group(gid, gp.term, gp.size, primary, replicas)
        self.slots = SlotMap(await self._claim_orphans(plan.owners))
        log.warning(
            "kv coordinator restarted: adopted %d members of %d groups",
            len(found) - len(plan.discard),
            len(plan.groups),
        )
        for gid, gp in plan.groups.items():
            if gp.primary is None:
                await self._promote(self.groups[gid])
                self._repair_later(gid)

    async def _claim_orphans(self, owners: list[int]) -> list[int]:
        """Slots no live group holds (their group died with the old coordinator, and a
        non-durable group's data with it) go to the group with the fewest slots."""
        orphans = [slot for slot, gid in enumerate(owners) if gid < 0]
        if not orphans:
            return owners
        counts = Counter(gid for gid in owners if gid >= 0)
        heir = min(self.groups, key=lambda gid: (counts[gid], gid))
        log.error("kv: %d slots had no live group; group %s takes them", len(orphans), heir)
        group = self.groups[heir]
        if group.primary.handle is None:
            await self._promote(group)
        await group.primary.handle.set_slot_states.remote(orphans, SLOT_OWNED, None)
        for slot in orphans:
            owners[slot] = heir
        return owners
