"""`app kv ...` commands: slots, shards, sizes and replication lag of a running KV cluster."""

from __future__ import annotations

import argparse
import json
from typing import Any

import ray

from app.kv.client import coordinator_handle
from app.kv.slots import NUM_SLOTS


def _coordinator(address: str | None, name: str, namespace: str) -> Any:
    if not ray.is_initialized():
        ray.init(address=address or "auto", log_to_driver=False)
    return coordinator_handle(name, namespace)


def kv_status(
    address: str | None = "auto", name: str = "kv", namespace: str = "app-kv"
) -> dict[str, Any]:
    """Status of the KV cluster `name`: per group its slots, members, keys, bytes and lag.

    Joins the Ray cluster at `address` unless this process is already connected.
    """
    status: dict[str, Any] = ray.get(_coordinator(address, name, namespace).status.remote())
    members = [m for g in status["groups"] for m in g["members"] if "error" not in m]
    primaries = [m for m in members if m["role"] == "primary"]
    status["slots_total"] = NUM_SLOTS
    status["keys"] = sum(m["keys"] for m in primaries)
    status["bytes"] = sum(m["bytes"] for m in primaries)
    status["max_lag_ms"] = max((m["lag_ms"] for m in members), default=0.0)
    return status


def format_status(status: dict[str, Any]) -> str:
    """A human-readable table of `kv_status` output."""
    lines = [
        f"KV cluster {status['name']!r}: {len(status['groups'])} shard groups, "
        f"{status['keys']} keys, {status['bytes']} bytes, map version {status['version']}",
        f"{'group':>5} {'slots':>6} {'ranges':<22} {'member':<10} {'role':<8} "
        f"{'seq':>8} {'lag_ms':>8} {'keys':>8} {'bytes':>12} {'node':<12} direct",
    ]
    for group in status["groups"]:
        ranges = ",".join(f"{a}-{b}" for a, b in group["ranges"][:3])
        if len(group["ranges"]) > 3:
            ranges += f",+{len(group['ranges']) - 3}"
        for i, m in enumerate(group["members"]):
            head = f"{group['gid']:>5} {group['slots']:>6} {ranges:<22}" if i == 0 else " " * 35
            if "error" in m:
                lines.append(f"{head} {m['member']:<10} unreachable: {m['error']}")
                continue
            lines.append(
                f"{head} {m['member']:<10} {m['role']:<8} {m['seq']:>8} {m['lag_ms']:>8.1f} "
                f"{m['keys']:>8} {m['bytes']:>12} {m['node_id'][:12]:<12} {m.get('direct') or '-'}"
            )
    return "\n".join(lines)


def _status_cmd(args: argparse.Namespace) -> int:
    status = kv_status(args.address, args.name, args.namespace)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _rebalance_cmd(args: argparse.Namespace) -> int:
    coordinator = _coordinator(args.address, args.name, args.namespace)
    moves = ray.get(coordinator.rebalance.remote())
    print(json.dumps(moves) if args.json else f"{len(moves)} slot moves: {moves}")
    return 0


def _split_cmd(args: argparse.Namespace) -> int:
    coordinator = _coordinator(args.address, args.name, args.namespace)
    print(json.dumps(ray.get(coordinator.split.remote(args.group))))
    return 0


def add_kv_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `kv status|rebalance|split` to an argparse subparsers object.

    Each leaf parser sets `func(args) -> int` (the exit code) as its default.
    """
    kv = subparsers.add_parser("kv", help="Inspect and manage the sharded KV store.")
    commands = kv.add_subparsers(dest="kv_command", required=True)
    for name, func, text in (
        ("status", _status_cmd, "Slots, shard groups, sizes and replication lag."),
        ("rebalance", _rebalance_cmd, "Move slots from overloaded to underloaded groups."),
        ("split", _split_cmd, "Add a shard group and move half of a hot group's slots to it."),
    ):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("--address", default="auto", help="Ray cluster address.")
        parser.add_argument("--name", default="kv", help="KV cluster (coordinator) name.")
        parser.add_argument("--namespace", default="app-kv", help="Namespace of the cluster.")
        parser.add_argument("--json", action="store_true", help="Print JSON.")
        if name == "split":
            parser.add_argument("--group", type=int, default=None, help="Group to split.")
        parser.set_defaults(func=func)
    return kv
