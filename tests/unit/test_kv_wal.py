"""Write-ahead log and snapshots: recovery, torn tails, rotation, term changes."""

from __future__ import annotations

from pathlib import Path

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
    assert len(list(tmp_path.glob("snap-*.pkl"))) == 1
    assert len(list(tmp_path.glob("wal-*.log"))) == 1
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
