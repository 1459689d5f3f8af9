"""The `kv` CLI commands: argument wiring and the status table (no cluster needed)."""

from __future__ import annotations

import argparse

from app.kv.cli import add_kv_commands, format_status


def test_commands_parse_and_carry_their_handlers() -> None:
    parser = argparse.ArgumentParser()
    add_kv_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kv", "status", "--name", "sessions", "--json"])
    assert args.name == "sessions" and args.namespace == "app-kv" and args.json
    assert callable(args.func)
    assert parser.parse_args(["kv", "split", "--group", "3"]).group == 3
    assert parser.parse_args(["kv", "rebalance"]).kv_command == "rebalance"


def test_status_table_shows_slots_members_and_lag() -> None:
    member = {
        "member": "g0-m1",
        "role": "primary",
        "seq": 42,
        "lag_ms": 0.0,
        "keys": 7,
        "bytes": 700,
        "node_id": "abcdef0123456789",
    }
    replica = {**member, "member": "g0-m2", "role": "replica", "lag_ms": 12.5}
    status = {
        "name": "kv",
        "version": 3,
        "keys": 7,
        "bytes": 700,
        "groups": [
            {"gid": 0, "slots": 16384, "ranges": [(0, 16383)], "members": [member, replica]},
            {"gid": 1, "slots": 0, "ranges": [], "members": [{"member": "g1-m3", "error": "x"}]},
        ],
    }
    table = format_status(status)
    assert "0-16383" in table and "12.5" in table and "unreachable" in table
    assert len(table.splitlines()) == 5  # title, header, one line per member
