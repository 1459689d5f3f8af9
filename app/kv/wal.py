"""Durability files of one shard group: an append-only write-ahead log plus periodic snapshots.

Layout in the group's directory: `snap-<term>-<seq>.pkl` (a StoreSnapshot) and
`wal-<term>-<start seq>.log` (records of `Op`). Each record is length + CRC32 + pickle, so a torn
tail from a crash is detected and dropped. A primary starting a term writes a snapshot and removes
older files, which keeps a deposed primary's unreplicated tail out of any later recovery.
"""

from __future__ import annotations

import os
import pickle
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
