"""Rebuilding the coordinator's view from member reports (app.kv.recovery), without Ray."""

from __future__ import annotations

from app.kv.recovery import MemberReport, member_number, plan_recovery, slot_owners
from app.kv.slots import NUM_SLOTS

HALF = NUM_SLOTS // 2
LOW, HIGH = tuple(range(HALF)), tuple(range(HALF, NUM_SLOTS))


def primary(mid: str, gid: int, term: int, replicas: tuple[str, ...], **kw: object) -> MemberReport:
    owned = kw.pop("owned", LOW if gid == 0 else HIGH)
    return MemberReport(mid, gid, True, term, 10, 3, replicas, owned, **kw)  # type: ignore[arg-type]


def replica(mid: str, gid: int, term: int, seq: int = 9) -> MemberReport:
    return MemberReport(mid, gid, False, term, seq, 3)


def test_healthy_cluster_is_adopted_as_is() -> None:
    reports = [
        primary("g0-m1", 0, 2, ("g0-m2", "g0-m3")),
        replica("g0-m2", 0, 2),
        replica("g0-m3", 0, 2),
        primary("g1-m4", 1, 1, ("g1-m5",)),
        replica("g1-m5", 1, 1),
    ]
    plan = plan_recovery(reports, default_size=3)
    assert plan.discard == []
    g0, g1 = plan.groups[0], plan.groups[1]
    assert (g0.primary, sorted(g0.replicas), g0.term, g0.size) == (
        "g0-m1",
        ["g0-m2", "g0-m3"],
        2,
        3,
    )
    assert (g1.primary, g1.replicas) == ("g1-m4", ["g1-m5"])
    assert plan.owners == [0] * HALF + [1] * HALF


def test_deposed_primary_and_unfed_replica_are_discarded() -> None:
    reports = [
        primary("g0-m1", 0, 1, ("g0-m2",)),  # fenced off, but the old coordinator died first
        primary("g0-m2", 0, 2, ("g0-m3",)),
        replica("g0-m3", 0, 2),
        replica("g0-m9", 0, 2, seq=0),  # spawned by a repair that never attached it
    ]
    plan = plan_recovery(reports, default_size=3)
    assert plan.groups[0].primary == "g0-m2" and plan.groups[0].replicas == ["g0-m3"]
    assert sorted(plan.discard) == ["g0-m1", "g0-m9"]


def test_group_without_primary_is_left_for_promotion() -> None:
    reports = [replica("g0-m2", 0, 3, seq=7), replica("g0-m3", 0, 4, seq=9)]
    plan = plan_recovery(reports, default_size=3)
    group = plan.groups[0]
    assert group.primary is None and sorted(group.replicas) == ["g0-m2", "g0-m3"]
    assert group.term == 4 and group.size == 3  # promotion must use a newer term than any seen
    assert plan.owners == [-1] * NUM_SLOTS  # replicas report no slots: the promoted one will


def test_interrupted_migration_goes_to_the_target() -> None:
    source = primary("g0-m1", 0, 1, (), owned=LOW[:-2], migrating=LOW[-2:])
    target = primary("g1-m2", 1, 1, (), owned=LOW[-1:] + HIGH)  # one slot already handed over
    owners = slot_owners([source, target])
    assert owners[HALF - 2] == 0  # still migrating: the source serves it
    assert owners[HALF - 1] == 1  # imported and owned: the target wins
    assert owners[0] == 0 and owners[-1] == 1


def test_member_number() -> None:
    assert member_number("g3-m17") == 17
    assert member_number("odd") == 0
