"""Rebuilding a restarted coordinator's view from the shard members' own reports.

The coordinator keeps no state the members do not also hold: every member knows its group, role,
term and applied seq, a primary knows which replicas it streams to and the group size it counts
a majority of, and slot states are replicated log records. So a coordinator restarted by Ray
(after a crash, without a data directory) asks every live member and rebuilds the slot map and
the membership from the answers. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from app.kv.slots import NUM_SLOTS


@dataclass(frozen=True)
class MemberReport:
    """What one live member says about itself (`Shard.describe`)."""

    member: str
    gid: int
    primary: bool
    term: int
    seq: int
    group_size: int
    replicas: tuple[str, ...] = ()  # members a primary streams its log to
    owned: tuple[int, ...] = ()  # slots in state OWNED
    migrating: tuple[int, ...] = ()  # slots in state MIGRATING (still served here)
    node: str = ""


@dataclass
class GroupPlan:
    gid: int
    term: int
    size: int
    primary: str | None  # None: no live primary (the old one died mid-failover): promote one
    replicas: list[str] = field(default_factory=list)


@dataclass
class RecoveryPlan:
    groups: dict[int, GroupPlan]
    owners: list[int]  # owning group per slot; -1 where no live group holds the slot
    discard: list[str]  # members to stop: deposed primaries and replicas no primary feeds


def plan_recovery(reports: Iterable[MemberReport], default_size: int) -> RecoveryPlan:
    """Groups, slot owners and members to stop, from the reports of every live member."""
    by_gid: dict[int, list[MemberReport]] = {}
    for report in reports:
        by_gid.setdefault(report.gid, []).append(report)
    groups: dict[int, GroupPlan] = {}
    leaders: dict[int, MemberReport] = {}
    discard: list[str] = []
    for gid, members in sorted(by_gid.items()):
        primaries = [m for m in members if m.primary]
        if primaries:
            # Two primaries only if the coordinator died between fencing and killing the old
            # one: the newer term wins, the other is deposed (its replicas refuse it anyway).
            leader = max(primaries, key=lambda m: (m.term, m.seq, m.member))
            fed = set(leader.replicas)
            replicas = [m.member for m in members if m.member in fed]
            discard += [m.member for m in members if m is not leader and m.member not in fed]
            groups[gid] = GroupPlan(gid, leader.term, leader.group_size, leader.member, replicas)
        else:
            leader = max(members, key=lambda m: (m.seq, m.member))
            term = max(m.term for m in members)
            groups[gid] = GroupPlan(gid, term, default_size, None, [m.member for m in members])
        leaders[gid] = leader
    return RecoveryPlan(groups, slot_owners(leaders.values()), discard)


def slot_owners(leaders: Iterable[MemberReport]) -> list[int]:
    """Owner per slot: the group holding it OWNED, else the one still MIGRATING it away.

    Both at once happens when the coordinator died between a migration's last two steps: the
    target has every key (it ends its import only after the last batch), so it wins, and the
    source's leftover MIGRATING state is finished by the resumed migration.
    """
    owners = [-1] * NUM_SLOTS
    leaders = list(leaders)
    for report in leaders:
        for slot in report.migrating:
            owners[slot] = report.gid
    for report in leaders:
        for slot in report.owned:
            owners[slot] = report.gid
    return owners


def member_number(member: str) -> int:
    """The counter in a member id `g<gid>-m<n>` (0 if it has another form)."""
    _, _, tail = member.rpartition("-m")
    return int(tail) if tail.isdigit() else 0
