"""Pure placement: how many members a group gets and which node each member goes on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def effective_replication(factor: int, nodes: int, allow_colocated: bool) -> int:
    """Members per group: the configured factor, capped by the node count unless members of one
    group may share a node."""
    if allow_colocated:
        return factor
    return max(1, min(factor, nodes))


def place_group(nodes: Sequence[str], size: int, index: int) -> list[str]:
    """Nodes for a new group's members, primary first.

    Members go on distinct nodes while there are enough; group `index` starts at node
    `index % len(nodes)`, so the primaries of successive groups land on different nodes.
    """
    if not nodes:
        raise ValueError("no alive nodes to place a shard group on")
    return [nodes[(index + i) % len(nodes)] for i in range(size)]


def place_member(
    nodes: Sequence[str],
    group_nodes: Sequence[str],
    all_members: Sequence[str],
    allow_colocated: bool,
) -> str | None:
    """Node for a replacement member: one its group does not use yet, least loaded first.

    With every node already used by the group it may share one (if allowed), else None.
    """
    if not nodes:
        return None
    load = Counter(all_members)
    used = set(group_nodes)
    fresh = [n for n in nodes if n not in used]
    pool = fresh or (list(nodes) if allow_colocated else [])
    if not pool:
        return None
    return min(pool, key=lambda n: (load[n], Counter(group_nodes)[n], n))
