"""A durable shard member without Ray: writes are logged before they are applied, made durable
before they are acknowledged, and a member whose log fails stops taking writes."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.kv import protocol
from app.kv.config import KVConfig
from app.kv.disk import SyncedFile
from app.kv.errors import DurabilityError
from app.kv.shard import Shard
from app.kv.slots import key_slot
from app.kv.store import OP_PUT, SLOT_OWNED, Op, ShardStore
from app.kv.wal import WriteAheadLog

ONE, MAJORITY = protocol.WRITE_ONE, protocol.WRITE_MAJORITY


class Disk(SyncedFile):
    """The real WAL file, counting fsyncs and failing writes or fsyncs on demand."""

    syncs = 0
    fail_write = False
    fail_sync = False

    def write_all(self, data: bytes | memoryview) -> None:
        if Disk.fail_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write_all(data)

    def sync(self) -> None:
        if Disk.fail_sync:
            raise OSError(errno.EIO, "Input/output error")
        Disk.syncs += 1
        super().sync()


class DiskWAL(WriteAheadLog):
    file_class = Disk


class DiskShard(Shard):
    wal_class = DiskWAL


def _config(tmp_path: Path, **overrides: object) -> KVConfig:
    fields: dict[str, object] = {
        "durable": True,
        "data_dir": str(tmp_path),
        "replication_factor": 1,
        "snapshot_every_ops": 1000,
    }
    return KVConfig(**(fields | overrides))  # type: ignore[arg-type]


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[DiskShard]:
    shard = DiskShard(0, "g0-m1", _config(tmp_path))
    shard.become_primary(1, {}, 1)
    shard.set_slot_states([key_slot(k) for k in ("a", "b", "c")], SLOT_OWNED, None)
    Disk.syncs = 0
    yield shard
    Disk.fail_write = Disk.fail_sync = False
    shard.close()


def _put(shard: Shard, key: str, value: bytes, rid: str) -> object:
    return shard.put(key, key_slot(key), value, None, rid, ONE)


def test_a_write_is_fsynced_before_it_is_acknowledged(primary: DiskShard) -> None:
    assert _put(primary, "a", b"1", "r1") == 1  # its version
    assert Disk.syncs == 1
    primary.mset([("a", b"2"), ("b", b"2"), ("c", b"2")], None, "r2", ONE)
    assert Disk.syncs == 2  # one fsync for the whole call (group commit)
    assert _put(primary, "a", b"1", "r1") == 1  # a retried request: answered, nothing to sync
    assert Disk.syncs == 2


def test_a_write_the_disk_refuses_is_neither_applied_nor_acknowledged(
    primary: DiskShard,
) -> None:
    _put(primary, "a", b"before", "r1")
    seq = primary.store.seq
    Disk.fail_write = True
    with pytest.raises(DurabilityError, match="No space left"):
        _put(primary, "b", b"lost", "r2")
    assert primary.store.get("b") is None and primary.store.seq == seq  # logged before applied
    Disk.fail_write = False
    # The member is stopped: no more writes, and health checks fail so it is replaced.
    with pytest.raises(DurabilityError):
        _put(primary, "c", b"later", "r3")
    with pytest.raises(DurabilityError):
        primary.delete("a", key_slot("a"), "r4", ONE)
    with pytest.raises(DurabilityError):
        primary.ping()
    assert primary.store.get("c") is None


def test_a_failed_fsync_is_not_acknowledged_and_stops_the_member(primary: DiskShard) -> None:
    Disk.fail_sync = True
    with pytest.raises(DurabilityError, match="Input/output error"):
        _put(primary, "a", b"maybe", "r1")
    Disk.fail_sync = False
    with pytest.raises(DurabilityError):
        _put(primary, "a", b"maybe", "r1")  # not even the retry: it cannot be made durable here
    with pytest.raises(DurabilityError):
        primary.mset([("b", b"x")], None, "r2", MAJORITY)
    with pytest.raises(DurabilityError):
        primary.ping()


def test_a_replica_reports_a_batch_only_once_it_is_durable(tmp_path: Path) -> None:
    replica = DiskShard(0, "g0-m2", _config(tmp_path))
    try:
        assert replica.install_snapshot(1, ShardStore().snapshot(), 0.0) == 0
        Disk.syncs = 0
        ops = [Op(seq, OP_PUT, f"k{seq}", 0, b"v", seq) for seq in (1, 2, 3)]
        assert replica.apply_ops(1, ops, 3, 0.0) == 3
        assert Disk.syncs == 1
        Disk.fail_sync = True
        with pytest.raises(DurabilityError):
            replica.apply_ops(1, [Op(4, OP_PUT, "k4", 0, b"v", 4)], 4, 0.0)
        Disk.fail_sync = False
        with pytest.raises(DurabilityError):  # even a heartbeat: the primary's stream ends
            replica.apply_ops(1, [], 4, 0.0)
    finally:
        Disk.fail_sync = False
        replica.close()


def test_a_new_primary_recovers_past_a_corrupt_newest_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, snapshot_every_ops=3)
    old = Shard(0, "g0-m1", config)
    old.become_primary(1, {}, 1)
    keys = [f"key{i}" for i in range(8)]
    old.set_slot_states(sorted({key_slot(k) for k in keys}), SLOT_OWNED, None)
    for i, key in enumerate(keys):
        _put(old, key, f"v{i}".encode(), f"r{i}")
    old.close()
    member_dir = tmp_path / "kv" / "group-0" / "g0-m1"
    newest = sorted(member_dir.glob("snap-*.pkl"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    new = Shard(0, "g0-m2", config)
    try:
        with caplog.at_level(logging.ERROR, logger="app.kv.wal"):
            new.become_primary(2, {}, 1, recover=True)
        assert f"{newest.name} is corrupt" in caplog.text
        assert [new.get(k, key_slot(k)) for k in keys] == [f"v{i}".encode() for i in range(8)]
    finally:
        new.close()
