"""`app keys create|list|revoke|usage`: API keys in the region's KV store (app.security.keys).
A new key is printed once; the store keeps only its hash."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from app.security.guard import usage_counter
from app.security.keys import (
    RECORD_PREFIX,
    KeyLimits,
    KeyRecord,
    Scope,
    new_key,
    record_key,
)


class KeyNotFoundError(LookupError):
    """No key with that id in the store."""


def create(client: Any, name: str, scopes: tuple[Scope, ...], limits: KeyLimits) -> str:
    key, record = new_key(name, scopes, limits, time.time())
    ok, _ = client.cas(record_key(record.key_id), None, record.model_dump(mode="json"))
    if not ok:  # 48 random bits collided with an existing id: astronomically rare, never silent
        raise RuntimeError("key id collision; run the command again")
    return key


def records(client: Any) -> list[KeyRecord]:
    found = [KeyRecord.model_validate(v) for _, v in client.scan_iter(RECORD_PREFIX)]
    return sorted(found, key=lambda r: r.created_s)


def revoke(client: Any, key_id: str) -> KeyRecord:
    value = client.get_versioned(record_key(key_id))
    if value is None:
        raise KeyNotFoundError(f"no API key with id {key_id!r} (see `app keys list`)")
    record = KeyRecord.model_validate(value[0])
    if record.revoked_s is None:
        record = record.model_copy(update={"revoked_s": time.time()})
        client.put(record_key(key_id), record.model_dump(mode="json"))
    return record


def usage(client: Any, key_id: str, days: int, now: float) -> list[dict[str, Any]]:
    if client.get(record_key(key_id)) is None:
        raise KeyNotFoundError(f"no API key with id {key_id!r} (see `app keys list`)")
    today = datetime.fromtimestamp(now, UTC).date()
    rows = []
    for back in range(days - 1, -1, -1):
        day = (today - timedelta(days=back)).isoformat()
        counts = client.mget([usage_counter(key_id, day, k) for k in ("requests", "tokens")])
        rows.append({"day": day, "requests": int(counts[0] or 0), "tokens": int(counts[1] or 0)})
    return rows


def _client(args: argparse.Namespace) -> Any:
    import ray

    from app.kv import KVClient

    if not ray.is_initialized():
        ray.init(address=args.address or "auto", log_to_driver=False)
    return KVClient.connect(args.kv_name, args.kv_namespace)


def cmd_keys(args: argparse.Namespace) -> int:
    from app.kv import ClusterNotFoundError

    try:
        client = _client(args)
    except ClusterNotFoundError as exc:
        print(f"error: {exc}: API keys live in the region's KV store (`app up` starts it)")
        return 1
    try:
        return _run(args, client)
    except KeyNotFoundError as exc:
        print(f"error: {exc}")
        return 1


def _run(args: argparse.Namespace, client: Any) -> int:
    if args.keys_command == "create":
        scopes = tuple(Scope(s) for s in (args.scope or [Scope.INFERENCE.value]))
        limits = KeyLimits(
            requests_per_minute=args.rpm, tokens_per_minute=args.tpm, max_concurrent=args.concurrent
        )
        key = create(client, args.name, scopes, limits)
        print(key)
        print("store it now: it is not shown again (the KV store keeps only its hash)")
    elif args.keys_command == "list":
        found = records(client)
        if args.json:
            print(json.dumps([r.public() for r in found], indent=2))
        for r in [] if args.json else found:
            state = "revoked" if r.revoked_s else "active"
            shown = ",".join(s.value for s in r.scopes)
            bounds = r.limits.model_dump(exclude_none=True) or "-"
            print(f"{r.key_id}  {r.name:20} {state:8} scopes {shown}  limits {bounds}")
    elif args.keys_command == "revoke":
        record = revoke(client, args.key_id)
        print(f"revoked {record.key_id} ({record.name}); replicas refuse it within their cache")
    else:
        rows = usage(client, args.key_id, args.days, time.time())
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            print(f"{row['day']}  {row['requests']:>10} requests  {row['tokens']:>12} tokens")
    return 0


def add_keys_commands(sub: Any) -> argparse.ArgumentParser:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke, usage")
    keys.add_argument("--address", help="Ray cluster address (default: auto)")
    keys.add_argument("--kv-name", default="kv", help="KV cluster holding the keys.")
    keys.add_argument("--kv-namespace", default="app-kv")
    commands = keys.add_subparsers(dest="keys_command", required=True)
    create_cmd = commands.add_parser("create", help="a new key, printed once")
    create_cmd.add_argument("name", help="who or what the key is for")
    create_cmd.add_argument(
        "--scope",
        action="append",
        choices=[s.value for s in Scope],
        help="inference (default) or admin (implies inference); repeatable",
    )
    create_cmd.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    create_cmd.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    create_cmd.add_argument("--concurrent", type=int, help="requests in flight at once")
    list_cmd = commands.add_parser("list", help="every key (never the key itself)")
    list_cmd.add_argument("--json", action="store_true")
    revoke_cmd = commands.add_parser("revoke", help="refuse a key from now on")
    revoke_cmd.add_argument("key_id")
    usage_cmd = commands.add_parser("usage", help="a key's requests and tokens per UTC day")
    usage_cmd.add_argument("key_id")
    usage_cmd.add_argument("--days", type=int, default=7)
    usage_cmd.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_keys)
    return keys
