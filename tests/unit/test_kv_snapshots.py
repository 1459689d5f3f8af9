"""Checksummed snapshot files: written with a SHA-256 header, verified before unpickling."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from app.kv.snapshots import (
    MAGIC,
    CorruptSnapshotError,
    read_snapshot_file,
    verify_snapshot_file,
    write_snapshot_file,
)
from app.kv.store import OP_PUT, Op, ShardStore, StoreSnapshot


def _snapshot(keys: int = 50) -> StoreSnapshot:
    store = ShardStore()
    for seq in range(1, keys + 1):
        store.apply(Op(seq, OP_PUT, f"k{seq}", 0, b"v" * 100, seq))
    return store.snapshot()


def test_round_trip_with_a_header(tmp_path: Path) -> None:
    path = tmp_path / "snap.pkl"
    write_snapshot_file(path, _snapshot())
    assert path.read_bytes().startswith(MAGIC)
    verify_snapshot_file(path)
    snap = read_snapshot_file(path)
    assert snap.seq == 50 and len(snap.entries) == 50


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:-1],  # truncated
        lambda data: data + b"x",  # trailing bytes
        lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:],  # a flipped bit
        lambda data: b"\x00" * 8 + data[8:],  # header gone
        lambda data: b"",  # empty
    ],
)
def test_damage_is_refused_before_unpickling(tmp_path: Path, damage: object) -> None:
    path = tmp_path / "snap.pkl"
    write_snapshot_file(path, _snapshot())
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(CorruptSnapshotError):
        verify_snapshot_file(path)
    with pytest.raises(CorruptSnapshotError):
        read_snapshot_file(path)


def test_a_snapshot_from_before_checksums_is_read_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "snap.pkl"
    path.write_bytes(pickle.dumps(_snapshot(3), protocol=5))  # the old format: a bare pickle
    with caplog.at_level(logging.WARNING, logger="app.kv.snapshots"):
        assert read_snapshot_file(path).seq == 3
    assert "has no checksum" in caplog.text


def test_a_file_that_is_not_a_snapshot_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "snap.pkl"
    path.write_bytes(pickle.dumps({"not": "a snapshot"}, protocol=5))
    with pytest.raises(CorruptSnapshotError, match="not a snapshot"):
        read_snapshot_file(path)
