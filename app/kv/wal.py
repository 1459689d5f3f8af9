"""Durability files of one shard member: an append-only write-ahead log plus periodic snapshots.

Every member of a group logs (the primary what it writes, replicas what they apply), each in its
own directory `<group dir>/<member>/`, so losing the primary's disk loses nothing a majority
acknowledged. Layout of one log: `snap-<term>-<seq>.pkl` (a StoreSnapshot) and
`wal-<term>-<start seq>.log` (records of `Op`). Each record is length + CRC32 + pickle, so a torn
tail from a crash is detected and dropped. A member starting a term (a promoted primary, or a
replica taking the new primary's snapshot) writes a snapshot and removes its older files.
Recovery reads the log that reaches furthest in the newest term (see `best_log`): members of the
newest term all started from its primary's snapshot, which holds every committed write, so a
deposed primary's unreplicated tail (an older term) is never chosen.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.kv.store import Op, StoreSnapshot

_HEADER = struct.Struct("<II")  # length, crc32


@dataclass(frozen=True)
class LargeBlob:
    """A large value's pickled bytes, standing in for its object-store handle on disk."""

    data: bytes


def _name(prefix: str, term: int, seq: int, suffix: str) -> str:
    return f"{prefix}-{term:08d}-{seq:012d}.{suffix}"


def _parse(path: Path) -> tuple[int, int]:
    _, term, seq = path.stem.split("-")
    return int(term), int(seq)


class WriteAheadLog:
    """Appends ops for one term and rotates to a new segment after each snapshot."""

    def __init__(self, directory: str | Path, fsync: bool = False, snapshot_every: int = 10_000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._snapshot_every = snapshot_every
        self._file: BinaryIO | None = None
        self._term = 0
        self.records_since_snapshot = 0

    def recover(self) -> tuple[StoreSnapshot | None, list[Op], int]:
        """The newest snapshot, the ops logged after it in its term, and that term."""
        snaps = sorted(self.directory.glob("snap-*.pkl"), key=_parse)
        if not snaps:
            return None, [], 0
        term, seq = _parse(snaps[-1])
        with snaps[-1].open("rb") as f:
            snap: StoreSnapshot = pickle.load(f)
        ops: list[Op] = []
        segments = [p for p in self.directory.glob("wal-*.log") if _parse(p)[0] == term]
        for segment in sorted(segments, key=_parse):
            for op in read_records(segment):
                if op.seq == seq + len(ops) + 1:
                    ops.append(op)
        return snap, ops, term

    def begin_term(self, term: int, snap: StoreSnapshot) -> None:
        """Start logging as primary of `term` from `snap`; older files become obsolete."""
        self._term = term
        self.write_snapshot(snap)
        for path in [*self.directory.glob("snap-*.pkl"), *self.directory.glob("wal-*.log")]:
            if _parse(path)[0] < term:
                path.unlink(missing_ok=True)

    def write_snapshot(self, snap: StoreSnapshot) -> None:
        """Write `snap` atomically, open a fresh segment after it and drop what it supersedes."""
        final = self.directory / _name("snap", self._term, snap.seq, "pkl")
        tmp = final.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(snap, f, protocol=5)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._open_segment(snap.seq + 1)
        for path in self.directory.glob("snap-*.pkl"):
            if path != final and _parse(path)[0] <= self._term and _parse(path) < _parse(final):
                path.unlink(missing_ok=True)
        current = self.directory / _name("wal", self._term, snap.seq + 1, "log")
        for path in self.directory.glob("wal-*.log"):
            if path != current and _parse(path) < _parse(current):
                path.unlink(missing_ok=True)
        self.records_since_snapshot = 0

    def _open_segment(self, start_seq: int) -> None:
        if self._file is not None:
            self._file.close()
        path = self.directory / _name("wal", self._term, start_seq, "log")
        self._file = path.open("ab")

    def append(self, op: Op) -> None:
        if self._file is None:
            raise RuntimeError("WriteAheadLog.append before begin_term")
        data = pickle.dumps(op, protocol=5)
        self._file.write(_HEADER.pack(len(data), zlib.crc32(data)) + data)
        # Flushing hands the record to the OS, which survives a process crash; fsync also
        # survives a power cut but costs a disk round trip per write, so it is opt-in.
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self.records_since_snapshot += 1

    @property
    def snapshot_due(self) -> bool:
        return self.records_since_snapshot >= self._snapshot_every

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(path: Path) -> list[Op]:
    """Every intact record of a segment, stopping at the first torn or corrupt one."""
    ops: list[Op] = []
    data = path.read_bytes()
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        ops.append(pickle.loads(body))
        pos += _HEADER.size + length
    return ops


def log_position(directory: Path) -> tuple[int, int]:
    """(term, seq) the log in `directory` recovers to; (0, 0) if it holds none."""
    snaps = sorted(directory.glob("snap-*.pkl"), key=_parse)
    if not snaps:
        return 0, 0
    term, seq = _parse(snaps[-1])
    segments = sorted((p for p in directory.glob("wal-*.log") if _parse(p)[0] == term), key=_parse)
    for segment in segments:
        for op in read_records(segment):
            if op.seq == seq + 1:
                seq += 1
    return term, seq


def member_logs(group_dir: Path) -> list[Path]:
    """Directories that may hold a log of the group: one per member, plus the group directory
    itself (where logs were kept before every member logged)."""
    if not group_dir.is_dir():
        return []
    return [group_dir, *sorted(p for p in group_dir.iterdir() if p.is_dir())]


def best_log(group_dir: Path) -> Path | None:
    """The member log to recover the group from: the furthest (term, seq), None if none."""
    positions = {d: log_position(d) for d in member_logs(group_dir)}
    positions = {d: pos for d, pos in positions.items() if pos != (0, 0)}
    if not positions:
        return None
    return max(positions, key=lambda d: positions[d])


def prune_logs(group_dir: Path, keep: set[str], term: int) -> None:
    """Remove logs of former members (not in `keep`) that stop before `term`: superseded by the
    snapshot the current primary wrote when it started `term`."""
    for directory in member_logs(group_dir)[1:]:
        if directory.name not in keep and log_position(directory)[0] < term:
            shutil.rmtree(directory, ignore_errors=True)
