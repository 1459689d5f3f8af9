"""Shard group membership as the coordinator tracks it: members, groups, nodes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import ray


@dataclass
class Member:
    mid: str
    handle: Any
    node: str


@dataclass
class Group:
    gid: int
    term: int
    size: int  # members the group should have (effective replication factor)
    primary: Member
    replicas: dict[str, Member] = field(default_factory=dict)

    def members(self) -> list[Member]:
        return [self.primary, *self.replicas.values()]


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


def kill(handle: Any) -> None:
    """Stop a member for good (it is never restarted: failover is the coordinator's)."""
    with contextlib.suppress(Exception):
        ray.kill(handle, no_restart=True)
