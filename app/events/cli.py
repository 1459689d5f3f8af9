"""`app events ...` commands: print the region's event log (and follow it), publish a test
event."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from app.events.bus import Event, EventBus, EventType
from app.events.follow import follow

DEFAULT_LINES = 20


def _bus(args: argparse.Namespace) -> EventBus:
    import ray

    from app.kv import KVClient

    if not ray.is_initialized():
        ray.init(address=args.address or "auto", log_to_driver=False)
    return EventBus(KVClient.connect(args.kv_name, args.kv_namespace), args.stream)


def format_event(event: Event, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(event.to_dict(), sort_keys=True)
    when = datetime.fromtimestamp(event.time, UTC).isoformat(timespec="milliseconds")
    data = json.dumps(event.data, sort_keys=True, separators=(",", ":"))
    return f"{event.seq:>8}  {when}  {event.type:<18} {event.source:<20} {data}"


def backlog(bus: EventBus, after: int, types: set[str] | None) -> Iterator[Event]:
    """The events after `after` that are readable now, then stops; its last position is
    where following goes on."""
    last = bus.last_seq()
    pos = after
    while pos < last:
        events, reached = bus.read_page(pos, limit=1000, types=types)
        yield from events
        if reached == pos:  # a number still being written: following picks it up
            return
        pos = reached


def tail(bus: EventBus, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    types = _types(args.type)
    after = args.after if args.after is not None else max(0, bus.last_seq() - args.lines)
    pos = after
    for event in backlog(bus, after, types):
        print(format_event(event, args.json), file=out, flush=True)
        pos = event.seq
    if args.follow:
        asyncio.run(_follow(bus, pos, types, args, out))
    return 0


async def _follow(
    bus: EventBus, after: int, types: set[str] | None, args: argparse.Namespace, out: TextIO
) -> None:
    async for event in follow(bus, after, types, args.poll):
        print(format_event(event, args.json), file=out, flush=True)


def publish(bus: EventBus, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"error: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print("error: --data must be a JSON object", file=sys.stderr)
        return 2
    event = bus.publish(args.event_type, data, source=args.source)
    print(format_event(event, args.json), file=out)
    return 0


def _types(raw: list[str] | None) -> set[str] | None:
    types = {t.strip() for item in raw or () for t in item.split(",") if t.strip()}
    return types or None


def _tail_cmd(args: argparse.Namespace) -> int:
    return tail(_bus(args), args)


def _publish_cmd(args: argparse.Namespace) -> int:
    return publish(_bus(args), args)


def add_events_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `events tail|publish` to an argparse subparsers object."""
    events = subparsers.add_parser("events", help="The region's event log: tail, publish.")
    commands = events.add_subparsers(dest="events_command", required=True)
    tail_cmd = commands.add_parser("tail", help="Print recent events; --follow for new ones.")
    tail_cmd.add_argument(
        "--type",
        action="append",
        help=f"Only this type (repeatable or comma-separated), e.g. {EventType.JOB_COMPLETED}.",
    )
    start = tail_cmd.add_mutually_exclusive_group()
    start.add_argument("--after", type=int, help="Start after this sequence number (0: all).")
    start.add_argument(
        "-n",
        "--lines",
        type=int,
        default=DEFAULT_LINES,
        help=f"Start this many sequence numbers back (default {DEFAULT_LINES}; a type "
        "filter shows those of them that match).",
    )
    tail_cmd.add_argument("-f", "--follow", action="store_true", help="Keep printing new ones.")
    tail_cmd.add_argument("--poll", type=float, default=1.0, help="Seconds between polls.")
    tail_cmd.set_defaults(func=_tail_cmd)
    pub = commands.add_parser("publish", help="Append one event (admin, debugging).")
    pub.add_argument("event_type", metavar="TYPE", help="e.g. system.overload")
    pub.add_argument("--data", default="{}", help="The event's data, a JSON object.")
    pub.add_argument("--source", default="cli", help="Who published it (default: cli).")
    pub.set_defaults(func=_publish_cmd)
    for parser in (tail_cmd, pub):
        parser.add_argument("--address", default="auto", help="Ray cluster address.")
        parser.add_argument("--kv-name", default="kv", help="KV cluster holding the log.")
        parser.add_argument("--kv-namespace", default="app-kv", help="Its namespace.")
        parser.add_argument("--stream", default="events", help="Event stream name.")
        parser.add_argument("--json", action="store_true", help="One JSON object per line.")
    return events
