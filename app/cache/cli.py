"""`app cache ...` commands: per-shard statistics and invalidation of a running cache tier."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import ray

from app.cache.actor_tier import shard_name
from app.cache.client import Cache
from app.cache.config import CacheConfig, TierKind


def _config(args: argparse.Namespace) -> CacheConfig:
    if not ray.is_initialized():
        ray.init(address=args.address or "auto", log_to_driver=False)
    return CacheConfig.from_env(name=args.name, namespace=args.namespace)


def _stats_cmd(args: argparse.Namespace) -> int:
    config = _config(args)
    shards: list[dict[str, Any]] = []
    for i in range(config.num_shards):
        try:
            actor = ray.get_actor(shard_name(config, i), namespace=config.namespace)
        except ValueError:
            shards.append({"shard": i, "error": "not running"})
            continue
        stats: Any = ray.get(actor.stats.remote(), timeout=10)
        shards.append(stats)
    if args.json:
        print(json.dumps(shards, indent=2))
        return 0
    print(f"{'shard':>5} {'entries':>9} {'bytes':>12} {'hits':>9} {'misses':>9} {'evictions':>9}")
    for s in shards:
        if "error" in s:
            print(f"{s['shard']:>5} {s['error']}")
            continue
        print(
            f"{s['shard']:>5} {s['entries']:>9} {s['bytes']:>12} {s['hits']:>9} "
            f"{s['misses']:>9} {s['evictions']:>9}"
        )
    return 0


def _invalidate_cmd(args: argparse.Namespace) -> int:
    config = _config(args)

    async def run() -> int:
        # Only tiers that exist: invalidating must not create cache actors.
        cache = Cache(config.model_copy(update={"tiers": _running_tiers(config)}))
        await cache.start()
        try:
            if args.prefix is not None:
                return await cache.invalidate_prefix(args.prefix)
            if args.glob is not None:
                return await cache.invalidate_glob(args.glob)
            return await cache.invalidate(args.key)
        finally:
            await cache.close()

    print(f"removed {asyncio.run(run())} keys from L2; every L1 drops them too")
    return 0


def _running_tiers(config: CacheConfig) -> tuple[TierKind, ...]:
    def running(kind: TierKind) -> bool:
        if kind is not TierKind.ACTORS:
            return True
        try:
            ray.get_actor(shard_name(config, 0), namespace=config.namespace)
        except ValueError:
            return False
        return True

    tiers = tuple(kind for kind in config.tiers if running(kind))
    if not tiers:
        raise SystemExit(f"cache {config.name!r} has no running tier in {config.namespace!r}")
    return tiers


def add_cache_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `cache stats|invalidate` to an argparse subparsers object."""
    cache = subparsers.add_parser("cache", help="Inspect and invalidate the cache tier.")
    commands = cache.add_subparsers(dest="cache_command", required=True)
    stats = commands.add_parser("stats", help="Entries, bytes, hits and evictions per shard.")
    stats.add_argument("--json", action="store_true", help="Print JSON.")
    stats.set_defaults(func=_stats_cmd)
    inval = commands.add_parser("invalidate", help="Remove keys from L2 and from every L1.")
    target = inval.add_mutually_exclusive_group(required=True)
    target.add_argument("--key", help="One key.")
    target.add_argument("--prefix", help="Every key starting with this (e.g. resp:echo:).")
    target.add_argument("--glob", help="Every key matching this glob (*, ?, [...]).")
    inval.set_defaults(func=_invalidate_cmd)
    for parser in (stats, inval):
        parser.add_argument("--address", default="auto", help="Ray cluster address.")
        parser.add_argument("--name", default="cache", help="Cache name.")
        parser.add_argument("--namespace", default="app-cache", help="Namespace of its actors.")
    return cache
