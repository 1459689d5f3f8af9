"""The coordinator actor: owns the slot map and group membership, detects failures, fails over.

It is never on the data path: clients fetch the map once and talk to shard primaries directly,
coming back only when a call fails or a redirect leaves them without a handle. Ray restarts it
after a crash; it then rebuilds its state from the members themselves (see app.kv.recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from app.kv.config import KVConfig
from app.kv.disk import private_dir, write_private_text
from app.kv.errors import DurabilityError
from app.kv.membership import Group, Member, alive_nodes, kill
from app.kv.placement import effective_replication, place_group, place_member
from app.kv.protocol import GroupView, MapView
from app.kv.rebalancer import RebalanceMixin
from app.kv.replication import choose_successor
from app.kv.restart import RestartMixin
from app.kv.shard import ShardActor
from app.kv.slot_map import SlotMap
from app.kv.store import SLOT_OWNED

log = logging.getLogger(__name__)

_SHARD_THREADS = 64
_START_TIMEOUT_S = 60.0  # a new worker process on a busy 2-core machine can take a while


class Coordinator(RestartMixin, RebalanceMixin):
    """Slot map, membership, health checks, failover and replica repair for one KV cluster."""

    def __init__(self, config: KVConfig) -> None:
        self.cfg = config
        self.groups: dict[int, Group] = {}
        self.slots = SlotMap.even([0])
        self.version = 0
        self._members = 0
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._admin = asyncio.Lock()
        self._misses: Counter[str] = Counter()
        self._repairing: set[int] = set()
        self._view: MapView | None = None
        self._starting: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Start on our own: after a restart by Ray nobody else would (and health checks must
        # run without clients). start() is idempotent, so start_kv calling it too is harmless.
        ray.get_runtime_context().current_actor.start.remote()

    # Start-up ----------------------------------------------------------------------------
    async def start(self) -> int:
        """Create (or recover) every group once; later calls wait for the first to finish."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)
        return self.version

    async def _start(self) -> None:
        reports = await self._discover()
        if reports:
            await self._adopt(reports)
        else:
            await self._create_all()
        self._bump()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._health_loop())]
        if self.cfg.auto_rebalance_s is not None:
            self._tasks.append(loop.create_task(self._rebalance_loop(self.cfg.auto_rebalance_s)))
        await self.resume_migrations()

    async def _create_all(self) -> None:
        """A new cluster, or a durable one whose members are all gone: recover from disk."""
        meta = self._load_meta()
        gids = [int(g) for g in meta["terms"]] if meta else list(range(self.cfg.num_shards))
        self.slots = SlotMap.from_dict(meta["slots"]) if meta else SlotMap.even(gids)
        nodes = alive_nodes()
        size = effective_replication(
            self.cfg.replication_factor, len(nodes), self.cfg.allow_colocated_replicas
        )
        terms = {int(g): t for g, t in meta["terms"].items()} if meta else {}
        await asyncio.gather(
            *(
                self._create_group(gid, i, size, self.slots.slots_of(gid), terms.get(gid))
                for i, gid in enumerate(gids)
            )
        )

    async def _create_group(
        self, gid: int, index: int, size: int, slots: list[int], old_term: int | None = None
    ) -> Group:
        """Spawn a group's members and make the first one primary (recovering from disk when
        `old_term` says the group existed before a restart)."""
        nodes = place_group(alive_nodes(), size, index)
        members = await asyncio.gather(*(self._start_member(gid, node) for node in nodes))
        primary, replicas = members[0], {m.mid: m for m in members[1:]}
        term = (old_term or 0) + 1
        handles = {mid: m.handle for mid, m in replicas.items()}
        await primary.handle.become_primary.remote(term, handles, size, old_term is not None)
        if old_term is None and slots:
            await primary.handle.set_slot_states.remote(slots, SLOT_OWNED, None)
        group = Group(gid, term, size, primary, replicas)
        self.groups[gid] = group
        return group

    async def _start_member(self, gid: int, node: str | None) -> Member:
        """Spawn a member on `node` and wait until it runs; anywhere if that node cannot host it."""
        member = self._spawn(gid, node)
        try:
            member.node = await asyncio.wait_for(member.handle.ready.remote(), _START_TIMEOUT_S)
        except (TimeoutError, RayActorError):
            if node is None:
                raise
            kill(member.handle)
            return await self._start_member(gid, None)
        return member

    def _spawn(self, gid: int, node: str | None) -> Member:
        self._members += 1
        mid = f"g{gid}-m{self._members}"
        strategy: Any = "DEFAULT"
        if node:
            # Hard affinity: Ray 2.60 ignores soft affinity for zero-resource actors, and spread
            # is the point. A node that vanished meanwhile is handled by _start_member.
            strategy = NodeAffinitySchedulingStrategy(node, soft=False)
        handle = ShardActor.options(
            # Named and detached, so members outlive a crash of this process (Ray ends the
            # actors a process owns with it) and a restarted coordinator finds them again.
            name=self._name_prefix() + mid,
            namespace=self.cfg.namespace,
            lifetime="detached",
            num_cpus=self.cfg.shard_num_cpus,
            max_restarts=0,  # failover is ours: a restarted member would come back empty
            # A threaded actor: this many calls at once (writers waiting for replicas hold one).
            max_concurrency=_SHARD_THREADS,
            scheduling_strategy=strategy,
        ).remote(gid, mid, self.cfg, ray.get_runtime_context().current_actor)
        return Member(mid, handle, node or "")

    # Client-facing -----------------------------------------------------------------------
    async def config(self) -> KVConfig:
        return self.cfg

    async def get_map(self) -> MapView:
        await self.start()
        return self._map_view()

    async def refresh(self, gid: int, term: int) -> MapView:
        """A client's call to group `gid` failed: check its primary, fail over if it is dead,
        and return the current map either way."""
        await self.start()  # after a restart: only once the members are adopted
        group = self.groups.get(gid)
        if group is not None and group.term == term:
            await self._failover(gid, term)
        return self._map_view()

    def _map_view(self) -> MapView:
        if self._view is None or self._view.epoch != self.version:
            groups = {
                gid: GroupView(
                    gid, g.term, g.primary.handle, tuple(m.handle for m in g.replicas.values())
                )
                for gid, g in self.groups.items()
            }
            self._view = MapView(self.version, self.slots.owners, groups)
        return self._view

    def _bump(self) -> None:
        # Clients install a map only if its epoch is not older than theirs, and a restarted
        # coordinator starts from nothing: a clock-based epoch keeps growing across restarts.
        self.version = max(self.version + 1, time.time_ns() // 1000)
        self._save_meta()

    # Failure handling --------------------------------------------------------------------
    async def _alive(self, member: Member, timeout: float) -> bool:
        if member.handle is None:  # a group adopted without a primary, not yet promoted
            return False
        try:
            await asyncio.wait_for(member.handle.ping.remote(), timeout)
        except (RayActorError, DurabilityError):  # dead, or its log failed (it takes no writes)
            return False
        except TimeoutError:
            self._misses[member.mid] += 1
            return self._misses[member.mid] < 2
        self._misses.pop(member.mid, None)
        return True

    async def _failover(self, gid: int, seen_term: int) -> None:
        async with self._locks[gid]:
            group = self.groups.get(gid)
            if group is None or group.term != seen_term:
                return  # someone else already handled it
            if await self._alive(group.primary, self.cfg.health_check_timeout_s):
                return
            await self._promote(group)
        self._repair_later(gid)

    async def _promote(self, group: Group) -> None:
        """Fence the old primary, promote the replica with the highest applied seq."""
        kill(group.primary.handle)
        term = group.term + 1
        replies = await asyncio.gather(
            *(
                asyncio.wait_for(m.handle.prepare_promotion.remote(term), 5.0)
                for m in group.replicas.values()
            ),
            return_exceptions=True,
        )
        applied: dict[str, int] = {}
        for member, reply in zip(list(group.replicas.values()), replies, strict=True):
            if isinstance(reply, int):
                applied[member.mid] = reply
            else:
                log.warning("kv group %s: replica %s unusable: %r", group.gid, member.mid, reply)
                kill(group.replicas.pop(member.mid).handle)
        successor = choose_successor(applied)
        if successor is None:
            await self._recreate(group)
            return
        new = group.replicas.pop(successor)
        others = {mid: m.handle for mid, m in group.replicas.items()}
        await new.handle.become_primary.remote(term, others, group.size)
        group.primary, group.term = new, term
        log.warning(
            "kv group %s: %s promoted at term %s (seq %s)",
            group.gid,
            successor,
            term,
            applied[successor],
        )
        self._bump()

    async def _recreate(self, group: Group) -> None:
        """Every member is gone: a durable group comes back from disk, else it restarts empty."""
        log.error("kv group %s lost every member; recreating it", group.gid)
        index = sorted(self.groups).index(group.gid)
        old_term = group.term if self.cfg.durable else None
        slots = self.slots.slots_of(group.gid)
        await self._create_group(group.gid, index, group.size, slots, old_term)
        self._bump()

    async def member_failed(self, gid: int, mid: str, term: int) -> None:
        """A primary's replication stream to `mid` broke: drop that replica and replace it."""
        await self.start()
        group = self.groups.get(gid)
        if group is None or mid not in group.replicas:
            return
        async with self._locks[gid]:
            member = group.replicas.pop(mid, None)
            if member is not None:
                kill(member.handle)
                self._bump()
        self._repair_later(gid)

    def _repair_later(self, gid: int) -> None:
        if gid not in self._repairing:
            self._repairing.add(gid)
            asyncio.get_running_loop().create_task(self._repair(gid))

    async def _repair(self, gid: int) -> None:
        """Add replicas until the group is back to its size (runs off the failover path)."""
        try:
            while (group := self.groups.get(gid)) and len(group.members()) < group.size:
                nodes = [m.node for m in group.members()]
                everyone = [m.node for g in self.groups.values() for m in g.members()]
                node = place_member(
                    alive_nodes(), nodes, everyone, self.cfg.allow_colocated_replicas
                )
                if node is None:
                    return
                member = await self._start_member(gid, node)
                async with self._locks[gid]:
                    reply = await group.primary.handle.add_replica.remote(member.mid, member.handle)
                    if reply < 0:
                        kill(member.handle)
                        return
                    group.replicas[member.mid] = member
                    self._bump()
        except Exception as exc:  # the health loop retries; a dead primary fails over first
            log.warning("kv group %s: replica repair failed: %r", gid, exc)
        finally:
            self._repairing.discard(gid)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_check_interval_s)
            try:
                await self._check_all()
            except Exception:
                log.exception("kv health check failed")

    async def _rebalance_loop(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                moves = await self.rebalance()
                if moves:
                    log.info("kv rebalance moved %d slot sets", len(moves))
            except Exception:
                log.exception("kv rebalance failed")

    async def _check_all(self) -> None:
        timeout = self.cfg.health_check_timeout_s
        for gid, group in list(self.groups.items()):
            members = group.members()
            alive = await asyncio.gather(*(self._alive(m, timeout) for m in members))
            if not alive[0]:
                await self._failover(gid, group.term)
            for member, ok in zip(members[1:], alive[1:], strict=True):
                if not ok:
                    await self.member_failed(gid, member.mid, group.term)
            if len(group.members()) < group.size:
                self._repair_later(gid)

    # Introspection and lifecycle ---------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """Slots, members, sizes and replication lag of every group (for the CLI)."""
        await self.start()
        out: dict[str, Any] = {
            "name": self.cfg.name,
            "version": self.version,
            "coordinator_node_id": ray.get_runtime_context().get_node_id(),
            "groups": [],
        }
        for gid, group in sorted(self.groups.items()):
            listed = group.members()  # membership may change while we wait for the answers
            replies = await asyncio.gather(
                *(asyncio.wait_for(m.handle.status.remote(), 5.0) for m in listed),
                return_exceptions=True,
            )
            members = [
                r if isinstance(r, dict) else {"member": m.mid, "error": repr(r)}
                for m, r in zip(listed, replies, strict=True)
            ]
            out["groups"].append(
                {
                    "gid": gid,
                    "term": group.term,
                    "size": group.size,
                    "slots": len(self.slots.slots_of(gid)),
                    "ranges": self.slots.ranges(gid),
                    "members": members,
                }
            )
        return out

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for group in self.groups.values():
            for member in group.members():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(member.handle.close.remote(), 2.0)
                kill(member.handle)
        self.groups.clear()
        # Members are named and detached: stop any this process does not know of, and wait
        # until every name is released, so that a cluster started next under the same name
        # cannot adopt a member that is still dying.
        deadline = time.monotonic() + 30
        while (left := self._named_members()) and time.monotonic() < deadline:
            for handle in left.values():
                kill(handle)
            await asyncio.sleep(0.05)

    # Metadata on disk (durable clusters) -------------------------------------------------
    def _meta_path(self) -> Path | None:
        if not self.cfg.durable or not self.cfg.data_dir:
            return None
        return Path(self.cfg.data_dir) / self.cfg.name / "cluster.json"

    def _load_meta(self) -> dict[str, Any] | None:
        path = self._meta_path()
        if path is None or not path.exists():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def _save_meta(self) -> None:
        path = self._meta_path()
        if path is None:
            return
        private_dir(path.parent)
        data = {
            "slots": self.slots.to_dict(),
            "terms": {str(gid): g.term for gid, g in self.groups.items()},
        }
        write_private_text(path, json.dumps(data))


CoordinatorActor = ray.remote(Coordinator)
