"""The `events` CLI commands over a bus in a fake KV store: argument wiring, tail (the last
numbers, after a position, by type, JSON lines), follow, and publish (no cluster needed)."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import pytest

from app.events import cli
from app.events.bus import EventBus
from tests.unit.kv_fakes import FakeKV


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_events_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["events", *argv])


@pytest.fixture
def bus() -> EventBus:
    kv = FakeKV()
    bus = EventBus(kv, clock=kv.clock)
    bus.publish_batch([(t, {"i": i}, "test") for i, t in enumerate(["a", "b", "a", "c", "a"])])
    return bus


def tail(bus: EventBus, *argv: str) -> list[str]:
    out = io.StringIO()
    assert cli.tail(bus, parse("tail", *argv), out) == 0
    return out.getvalue().splitlines()


def test_commands_parse_and_carry_their_handlers() -> None:
    args = parse("tail", "--type", "job.failed", "--type", "a,b", "-f", "--kv-name", "kv2")
    assert args.type == ["job.failed", "a,b"] and args.follow and args.kv_name == "kv2"
    assert args.kv_namespace == "app-kv" and args.stream == "events" and callable(args.func)
    args = parse("publish", "system.overload", "--data", '{"x": 1}')
    assert args.event_type == "system.overload" and args.source == "cli"
    with pytest.raises(SystemExit):
        parse("tail", "--after", "3", "-n", "2")


def test_tail_prints_the_last_numbers_after_a_position_and_by_type(bus: EventBus) -> None:
    assert [line.split()[0] for line in tail(bus, "-n", "2")] == ["4", "5"]
    assert [line.split()[0] for line in tail(bus, "--after", "0")] == ["1", "2", "3", "4", "5"]
    lines = tail(bus, "--after", "0", "--type", "a,c", "--json")
    records = [json.loads(line) for line in lines]
    assert [(r["seq"], r["type"]) for r in records] == [(1, "a"), (3, "a"), (4, "c"), (5, "a")]
    assert records[0]["data"] == {"i": 0} and records[0]["source"] == "test"


def test_follow_goes_on_from_the_backlog(bus: EventBus, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    async def fake_follow(_bus: EventBus, after: int, *_: Any) -> None:
        seen.append(after)

    monkeypatch.setattr(cli, "_follow", fake_follow)
    tail(bus, "-n", "2", "-f", "--type", "a")
    assert seen == [5]


def test_publish_appends_and_refuses_bad_data(bus: EventBus) -> None:
    out = io.StringIO()
    args = parse("publish", "system.overload", "--data", '{"load": 2}', "--json")
    assert cli.publish(bus, args, out) == 0
    event = json.loads(out.getvalue())
    assert event["seq"] == 6 and event["type"] == "system.overload"
    assert bus.read(5)[0].data == {"load": 2}
    assert cli.publish(bus, parse("publish", "x", "--data", "[1]"), out) == 2
    assert cli.publish(bus, parse("publish", "x", "--data", "{"), out) == 2
    assert bus.last_seq() == 6
