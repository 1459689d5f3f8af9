"""Write-ahead log and snapshots: recovery, torn tails, rotation, term changes, fsync policy,
failures, checksums and file modes."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.kv.config import KVConfig, WALSync
from app.kv.disk import SyncedFile
from app.kv.errors import DurabilityError
from app.kv.store import OP_PUT, Op, ShardStore
from app.kv.wal import LargeBlob, WriteAheadLog, best_log, log_position, prune_logs


def _op(seq: int, payload: object = b"v") -> Op:
    return Op(seq, OP_PUT, f"k{seq}", 0, payload, seq)


def _recover_store(directory: Path) -> ShardStore:
    snap, ops, _ = WriteAheadLog(directory).recover()
    store = ShardStore()
    if snap is not None:
        store.install(snap)
    for op in ops:
        store.apply(op)
    return store


def test_recover_snapshot_plus_log(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, snapshot_every=1000)
    store = ShardStore()
    wal.begin_term(1, store.snapshot())
    for seq in range(1, 11):
        op = _op(seq)
        store.apply(op)
        wal.append(op)
    wal.close()
    again = _recover_store(tmp_path)
    assert again.seq == 10 and len(again) == 10


def test_torn_tail_is_dropped(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.begin_term(1, ShardStore().snapshot())
    for seq in range(1, 6):
        wal.append(_op(seq))
    wal.close()
    segment = next(tmp_path.glob("wal-*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # a crash in the middle of the last record
    assert _recover_store(tmp_path).seq == 4


def test_snapshot_rotates_and_removes_superseded_files(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, snapshot_every=3)
    store = ShardStore()
    wal.begin_term(1, store.snapshot())
    for seq in range(1, 8):
        op = _op(seq)
        store.apply(op)
        wal.append(op)
        if wal.snapshot_due:
            wal.write_snapshot(store.snapshot())
    wal.close()
    # The snapshot before the newest, and the segments from it on, are kept as a fallback.
    assert sorted(p.name for p in tmp_path.glob("snap-*.pkl")) == [
        "snap-00000001-000000000003.pkl",
        "snap-00000001-000000000006.pkl",
    ]
    assert sorted(p.name for p in tmp_path.glob("wal-*.log")) == [
        "wal-00000001-000000000004.log",
        "wal-00000001-000000000007.log",
    ]
    again = _recover_store(tmp_path)
    assert again.seq == 7 and len(again) == 7


def test_new_term_supersedes_a_deposed_primarys_tail(tmp_path: Path) -> None:
    old = WriteAheadLog(tmp_path)
    store = ShardStore()
    old.begin_term(1, store.snapshot())
    for seq in range(1, 6):
        old.append(_op(seq))  # seqs 3..5 were never replicated
    old.close()
    successor = ShardStore()
    for seq in range(1, 3):
        successor.apply(_op(seq))
    new = WriteAheadLog(tmp_path)
    new.begin_term(2, successor.snapshot())
    new.append(_op(3, b"new"))
    new.close()
    again = _recover_store(tmp_path)
    assert again.seq == 3 and again.get("k3").payload == b"new"  # type: ignore[union-attr]


def test_large_values_are_stored_as_blobs(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.begin_term(1, ShardStore().snapshot())
    wal.append(_op(1, LargeBlob(b"x" * 1000)))
    wal.close()
    _, ops, term = WriteAheadLog(tmp_path).recover()
    assert term == 1 and ops[0].payload == LargeBlob(b"x" * 1000)


def _member_log(directory: Path, term: int, seqs: int) -> None:
    wal = WriteAheadLog(directory)
    store = ShardStore()
    wal.begin_term(term, store.snapshot())
    for seq in range(1, seqs + 1):
        op = _op(seq)
        store.apply(op)
        wal.append(op)
    wal.close()


def test_recovery_reads_the_furthest_log_of_the_newest_term(tmp_path: Path) -> None:
    _member_log(tmp_path / "g0-m1", term=1, seqs=9)  # a deposed primary's longer tail
    _member_log(tmp_path / "g0-m2", term=2, seqs=4)  # the new primary
    _member_log(tmp_path / "g0-m3", term=2, seqs=3)  # its replica, a little behind
    assert log_position(tmp_path / "g0-m1") == (1, 9)
    assert log_position(tmp_path / "g0-m3") == (2, 3)
    assert best_log(tmp_path) == tmp_path / "g0-m2"
    assert best_log(tmp_path / "nothing-here") is None


def test_a_replica_log_stands_in_for_a_lost_primary_log(tmp_path: Path) -> None:
    _member_log(tmp_path / "g0-m3", term=2, seqs=3)
    assert best_log(tmp_path) == tmp_path / "g0-m3"
    assert _recover_store(tmp_path / "g0-m3").seq == 3


def test_prune_keeps_members_and_newer_logs(tmp_path: Path) -> None:
    _member_log(tmp_path / "g0-m1", term=1, seqs=2)  # former member: removed
    _member_log(tmp_path / "g0-m2", term=2, seqs=2)  # current primary
    _member_log(tmp_path / "g0-m3", term=1, seqs=2)  # current replica, not yet re-snapshotted
    prune_logs(tmp_path, {"g0-m2", "g0-m3"}, term=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g0-m2", "g0-m3"]


# Fsync policy -----------------------------------------------------------------------------
class CountingFile(SyncedFile):
    """The real segment file, counting its fsyncs."""

    syncs = 0

    def sync(self) -> None:
        type(self).syncs += 1
        super().sync()


class CountingWAL(WriteAheadLog):
    file_class = CountingFile


def test_the_default_policy_fsyncs_once_per_commit_before_acknowledging(tmp_path: Path) -> None:
    wal = CountingWAL(tmp_path)  # fsync on by default: KVConfig.wal_fsync's "commit"
    wal.begin_term(1, ShardStore().snapshot())
    CountingFile.syncs = 0
    for seq in range(1, 4):  # one call's records (an mset) ...
        wal.append(_op(seq))
    assert CountingFile.syncs == 0
    wal.commit()  # ... share one fsync, before the call is acknowledged
    assert CountingFile.syncs == 1
    wal.commit()  # nothing new: nothing to sync
    assert CountingFile.syncs == 1
    wal.append(_op(4))
    wal.close()  # closing syncs what is left
    assert CountingFile.syncs == 2


def test_fsync_none_only_hands_records_to_the_os(tmp_path: Path) -> None:
    wal = CountingWAL(tmp_path, fsync=False)
    wal.begin_term(1, ShardStore().snapshot())
    CountingFile.syncs = 0
    wal.append(_op(1))
    wal.commit()
    wal.close()
    assert CountingFile.syncs == 0
    assert _recover_store(tmp_path).seq == 1  # flushed to the OS: readable back


def test_a_segment_is_synced_before_rotating_to_the_next(tmp_path: Path) -> None:
    wal = CountingWAL(tmp_path, snapshot_every=2)
    store = ShardStore()
    wal.begin_term(1, store.snapshot())
    for seq in (1, 2):
        op = _op(seq)
        store.apply(op)
        wal.append(op)
    CountingFile.syncs = 0
    wal.write_snapshot(store.snapshot())  # the snapshot's own fsync, and the old segment's
    assert CountingFile.syncs == 2
    wal.close()


def test_config_defaults_to_fsync_on_commit_and_reads_the_old_booleans() -> None:
    assert KVConfig().wal_fsync == WALSync.COMMIT
    assert KVConfig(wal_fsync=False).wal_fsync == WALSync.NONE
    assert KVConfig(wal_fsync=True).wal_fsync == WALSync.COMMIT
    assert KVConfig(wal_fsync="none").wal_fsync == WALSync.NONE
    with pytest.raises(ValidationError, match="wal_fsync"):
        KVConfig(wal_fsync="sometimes")


# Directory fsyncs -------------------------------------------------------------------------
def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(path, is a directory) of every fsync from now on."""
    synced: list[tuple[str, bool]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_directories_are_fsynced_after_renames_and_new_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_fsyncs(monkeypatch)
    wal = WriteAheadLog(tmp_path / "member")
    assert synced == [(str(tmp_path), True)]  # the new member directory's entry
    synced.clear()
    wal.begin_term(1, ShardStore().snapshot())
    member = str(tmp_path / "member")
    assert synced[:3] == [
        (f"{member}/snap-00000001-000000000000.pkl.tmp", False),  # the snapshot's data
        (member, True),  # its rename
        (member, True),  # the new segment
    ]
    synced.clear()
    store = ShardStore()
    op = _op(1)
    store.apply(op)
    wal.append(op)
    wal.write_snapshot(store.snapshot())
    assert synced == [
        (f"{member}/wal-00000001-000000000001.log", False),  # the old segment, before rotating
        (f"{member}/snap-00000001-000000000001.pkl.tmp", False),
        (member, True),  # the snapshot's rename
        (member, True),  # the new segment
    ]
    wal.close()


# Failures ---------------------------------------------------------------------------------
class FailingFile(SyncedFile):
    """The real segment file, made to fail its writes or fsyncs on demand (ENOSPC, EIO)."""

    fail_write = False
    fail_sync = False

    def write_all(self, data: bytes | memoryview) -> None:
        if type(self).fail_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write_all(data)

    def sync(self) -> None:
        if type(self).fail_sync:
            raise OSError(errno.EIO, "Input/output error")
        super().sync()


class FailingWAL(WriteAheadLog):
    file_class = FailingFile


@pytest.fixture
def failing_wal(tmp_path: Path) -> Iterator[FailingWAL]:
    wal = FailingWAL(tmp_path)
    wal.begin_term(1, ShardStore().snapshot())
    yield wal
    FailingFile.fail_write = FailingFile.fail_sync = False
    wal.close()


def test_a_failed_append_is_fatal_to_the_log(failing_wal: FailingWAL) -> None:
    failing_wal.append(_op(1))
    FailingFile.fail_write = True
    with pytest.raises(DurabilityError, match="No space left"):
        failing_wal.append(_op(2))
    FailingFile.fail_write = False  # the disk recovers: the log does not trust it again
    with pytest.raises(DurabilityError):
        failing_wal.append(_op(2))
    with pytest.raises(DurabilityError):
        failing_wal.commit()
    with pytest.raises(DurabilityError):
        failing_wal.write_snapshot(ShardStore().snapshot())
    assert failing_wal.failed is not None


def test_a_failed_fsync_is_fatal_to_the_log(failing_wal: FailingWAL) -> None:
    failing_wal.append(_op(1))
    FailingFile.fail_sync = True
    with pytest.raises(DurabilityError, match="Input/output error"):
        failing_wal.commit()
    FailingFile.fail_sync = False  # a retried fsync may "succeed" for pages already dropped
    with pytest.raises(DurabilityError):
        failing_wal.commit()
    with pytest.raises(DurabilityError):
        failing_wal.append(_op(2))


# Torn tails -------------------------------------------------------------------------------
def test_a_dropped_torn_tail_is_logged_with_its_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.begin_term(1, ShardStore().snapshot())
    for seq in range(1, 4):
        wal.append(_op(seq))
    wal.close()
    segment = next(tmp_path.glob("wal-*.log"))
    intact = segment.stat().st_size
    segment.write_bytes(segment.read_bytes() + b"\x10\x00\x00\x00torn")  # 8 bytes of a 4th
    with caplog.at_level(logging.WARNING, logger="app.kv.wal"):
        assert _recover_store(tmp_path).seq == 3
    assert f"torn or corrupt tail of 8 bytes after {intact} intact bytes (3 records)" in (
        caplog.text
    )


def test_reopening_a_segment_cuts_its_torn_tail_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.begin_term(1, ShardStore().snapshot())
    for seq in range(1, 3):
        wal.append(_op(seq))
    wal.close()
    segment = next(tmp_path.glob("wal-*.log"))
    intact = segment.stat().st_size
    segment.write_bytes(segment.read_bytes()[:-5])  # record 2 torn
    again = WriteAheadLog(tmp_path)
    with caplog.at_level(logging.WARNING, logger="app.kv.wal"):
        again.begin_term(1, ShardStore().snapshot())  # reopens wal-...-1 to append
    assert "torn or corrupt tail" in caplog.text
    assert segment.stat().st_size < intact - 5
    again.append(_op(2, b"again"))
    again.close()
    recovered = _recover_store(tmp_path)
    assert recovered.seq == 2 and recovered.get("k2").payload == b"again"  # type: ignore[union-attr]


# Checksummed snapshots --------------------------------------------------------------------
def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _logged_store(directory: Path, ops: int, snapshot_every: int) -> None:
    wal = WriteAheadLog(directory, snapshot_every=snapshot_every)
    store = ShardStore()
    wal.begin_term(1, store.snapshot())
    for seq in range(1, ops + 1):
        op = _op(seq)
        store.apply(op)
        wal.append(op)
        if wal.snapshot_due:
            wal.write_snapshot(store.snapshot())
    wal.close()


def test_a_corrupt_newest_snapshot_falls_back_to_the_previous_one_plus_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _logged_store(tmp_path, ops=7, snapshot_every=3)
    newest = tmp_path / "snap-00000001-000000000006.pkl"
    _flip_byte(newest, newest.stat().st_size // 2)
    with caplog.at_level(logging.ERROR, logger="app.kv.wal"):
        snap, ops, _ = WriteAheadLog(tmp_path).recover()
    assert snap is not None and snap.seq == 3 and [op.seq for op in ops] == [4, 5, 6, 7]
    assert "snap-00000001-000000000006.pkl is corrupt" in caplog.text
    assert "checksum mismatch" in caplog.text
    assert _recover_store(tmp_path).seq == 7 and log_position(tmp_path) == (1, 7)


def test_a_log_whose_only_snapshot_is_corrupt_is_not_chosen(tmp_path: Path) -> None:
    _member_log(tmp_path / "g0-m1", term=2, seqs=9)
    _member_log(tmp_path / "g0-m2", term=2, seqs=5)
    snap = next((tmp_path / "g0-m1").glob("snap-*.pkl"))
    snap.write_bytes(snap.read_bytes()[:-1])  # truncated
    assert log_position(tmp_path / "g0-m1") == (0, 0)
    assert best_log(tmp_path) == tmp_path / "g0-m2"
