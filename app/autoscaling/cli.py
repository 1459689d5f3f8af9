"""`app autoscale status`: per model and region the replicas (current, target, bounds), the last
signals, forecast and floors, and the last decisions with their reasons, from the KV store."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from app.autoscaling.store import read_summaries


def format_summaries(rows: list[dict[str, Any]], now: float) -> str:
    """A readable report of `read_summaries` output."""
    if not rows:
        return "no autoscaled deployments have reported (none deployed, or no KV store)"
    lines: list[str] = []
    for row in rows:
        lines += _format_row(row, now)
    return "\n".join(lines)


def _format_row(row: dict[str, Any], now: float) -> list[str]:
    signals = row.get("signals") or {}
    lines = [
        f"{row['model']} [{row['region']}]  replicas {row['current']} -> {row['target']} "
        f"(min {row['min']}, max {row['max']})  {row['rule']}: {row['reason']}  "
        f"({_age(row['at_s'], now)}, store: {row.get('store', '-')})",
        "  signals: "
        + ", ".join(
            f"{name} {_number(signals.get(key))}"
            for name, key in (
                ("in flight", "total_requests"),
                ("queued", "queued_requests"),
                ("p50 ms", "p50_latency_ms"),
                ("p95 ms", "p95_latency_ms"),
                ("errors", "error_rate"),
            )
        ),
    ]
    forecast = row.get("forecast")
    if forecast:
        lines.append(
            f"  forecast: next {_number(forecast['next_per_min'])}/min, peak "
            f"{_number(forecast['peak_per_min'])}/min over {forecast['horizon_min']} min, "
            f"back-test error {_number(forecast['error'])}, history "
            f"{forecast['history_s'] / 3600:.1f} h"
        )
    for name, floor in (row.get("floors") or {}).items():
        state = "binding" if floor["applied"] else "recorded only"
        lines.append(f"  {name} floor: {floor['replicas']} ({state}): {floor['reason']}")
    timings = [
        f"{label} {_number(row.get(key))}s"
        for label, key in (("replica start", "replica_start_s"), ("cold start", "cold_start_s"))
        if row.get(key) is not None
    ]
    if timings:
        lines.append("  measured: " + ", ".join(timings))
    for entry in reversed(row.get("decisions") or []):
        flag = "" if entry.get("applied", True) else " (not applied)"
        lines.append(
            f"  {_age(entry['at_s'], now):>9}  {entry['current_replicas']} -> "
            f"{entry['target_replicas']}  {entry['rule']}{flag}: {entry['reason']}"
        )
    return lines


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def _age(at_s: float, now: float) -> str:
    seconds = max(0.0, now - at_s)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.1f}h ago"


def cmd_autoscale_status(args: argparse.Namespace) -> int:
    import ray

    from app.kv import ClusterNotFoundError, KVClient

    if not ray.is_initialized():
        ray.init(address=args.address or "auto", log_to_driver=False)
    try:
        client = KVClient.connect(args.kv_name, args.kv_namespace)
    except ClusterNotFoundError as exc:
        print(f"error: {exc}: the policies keep their status in the Serve controller's memory")
        return 1
    rows = read_summaries(client, args.decisions)
    print(json.dumps(rows, indent=2) if args.json else format_summaries(rows, time.time()))
    return 0


def add_autoscale_commands(sub: Any) -> argparse.ArgumentParser:
    """Add `autoscale status` to an argparse subparsers object."""
    autoscale = sub.add_parser("autoscale", help="replica autoscaling: targets, signals, decisions")
    commands = autoscale.add_subparsers(dest="autoscale_command", required=True)
    status = commands.add_parser(
        "status", help="per model and region: replicas, signals, forecast, floors, decisions"
    )
    status.add_argument("--address", help="Ray cluster address (default: auto)")
    status.add_argument("--json", action="store_true", help="Print JSON.")
    status.add_argument("--decisions", type=int, default=5, help="Last decisions shown per model.")
    status.add_argument("--kv-name", default="kv", help="KV cluster (coordinator) name.")
    status.add_argument("--kv-namespace", default="app-kv", help="Namespace of the KV cluster.")
    status.set_defaults(func=cmd_autoscale_status)
    return autoscale
