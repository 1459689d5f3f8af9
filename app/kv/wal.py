"""Durability files of one shard member: an append-only write-ahead log plus periodic snapshots.

Every member of a group logs (the primary what it writes, replicas what they apply), each in its
own directory `<group dir>/<member>/`, so losing the primary's disk loses nothing a majority
acknowledged. Layout of one log: `snap-<term>-<seq>.pkl` (a checksummed StoreSnapshot, see
app.kv.snapshots) and `wal-<term>-<start seq>.log` (records of `Op`). Each record is length +
CRC32 + pickle, so a torn tail from a crash is detected, dropped and logged with its size.
Directories are 0700 and files 0600 (app.kv.disk).

Fsync policy (`fsync`, KVConfig.wal_fsync). A member writes each record to the log *before*
applying it, so a write the disk refuses is never applied. With fsync on (the default,
"commit"), records are fsynced before the write that logged them is acknowledged: a primary
fsyncs before it answers (or waits for replicas), a replica before it reports a batch applied.
All records of one call (an mset, a replication batch, a migration batch) share one fsync, a
group commit. So an acknowledged write survives a power cut or kernel crash of the members
that acknowledged it, which is what the write concern promises. With fsync off ("none", an
explicit opt-in) records are only handed to the OS: that survives the member's process dying,
not the node; it is faster by one disk flush per write call.

Any failed write or fsync is fatal to the log (`failed`, DurabilityError from then on): after a
failed fsync the kernel may have dropped the dirty pages, and a retried fsync can report success
for data that is gone, so the member stops instead of acknowledging anything more.

Snapshots and segments. A snapshot is written atomically (temporary file, fsync, rename, fsync
of the directory) and a fresh segment is opened after it (its creation fsynced too). The
previous snapshot of the term and the segments after it are kept, so a newest snapshot that
fails its checksum falls back to the previous one plus the log. A member starting a term (a
promoted primary, or a replica taking the new primary's snapshot) writes a snapshot and removes
its older terms' files. Recovery reads the log that reaches furthest in the newest term (see
`best_log`): members of the newest term all started from its primary's snapshot, which holds
every committed write, so a deposed primary's unreplicated tail (an older term) is never chosen.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from app.kv.disk import SyncedFile, fsync_dir, open_private, private_dir
from app.kv.errors import DurabilityError
from app.kv.snapshots import (
    CorruptSnapshotError,
    read_snapshot_file,
    verify_snapshot_file,
    write_snapshot_file,
)
from app.kv.store import Op, StoreSnapshot

log = logging.getLogger(__name__)

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


def _snapshots(directory: Path) -> list[Path]:
    return sorted(directory.glob("snap-*.pkl"), key=_parse)


def _segments(directory: Path, term: int) -> list[Path]:
    return sorted((p for p in directory.glob("wal-*.log") if _parse(p)[0] == term), key=_parse)


class WriteAheadLog:
    """Appends ops for one term and rotates to a new segment after each snapshot."""

    file_class: type[SyncedFile] = SyncedFile  # where writes and fsyncs happen (tests fail it)

    def __init__(self, directory: str | Path, fsync: bool = True, snapshot_every: int = 10_000):
        self.directory = private_dir(Path(directory))
        self._fsync = fsync
        self._snapshot_every = snapshot_every
        self._file: SyncedFile | None = None
        self._term = 0
        self._unsynced = False
        self.records_since_snapshot = 0
        self.failed: DurabilityError | None = None

    def recover(self) -> tuple[StoreSnapshot | None, list[Op], int]:
        """The newest intact snapshot, the ops logged after it in its term, and that term."""
        return read_log(self.directory)

    # Failure -----------------------------------------------------------------------------
    def _check(self) -> None:
        if self.failed is not None:
            raise DurabilityError(str(self.failed))

    def _fail(self, exc: OSError) -> NoReturn:
        self.failed = DurabilityError(f"the write-ahead log in {self.directory} failed: {exc}")
        log.critical("kv %s; this member takes no more writes", self.failed)
        raise self.failed from exc

    # Snapshots ---------------------------------------------------------------------------
    def begin_term(self, term: int, snap: StoreSnapshot) -> None:
        """Start logging as primary of `term` from `snap`; older files become obsolete."""
        self._term = term
        self.write_snapshot(snap)
        try:
            for path in [*self.directory.glob("snap-*.pkl"), *self.directory.glob("wal-*.log")]:
                if _parse(path)[0] < term:
                    path.unlink(missing_ok=True)
            fsync_dir(self.directory)
        except OSError as exc:
            self._fail(exc)

    def write_snapshot(self, snap: StoreSnapshot) -> None:
        """Write `snap` durably, open a fresh segment after it and drop what it supersedes
        (keeping the snapshot before it, and the segments from there on, as a fallback)."""
        self._check()
        final = self.directory / _name("snap", self._term, snap.seq, "pkl")
        try:
            self._close_segment()
            write_snapshot_file(final, snap, self.file_class)
            self._open_segment(snap.seq + 1)
            self._prune(final)
        except OSError as exc:
            self._fail(exc)
        self.records_since_snapshot = 0

    def _prune(self, final: Path) -> None:
        """Remove snapshots before the previous one of this term, and the segments before it."""
        term, seq = _parse(final)
        older = [p for p in _snapshots(self.directory) if p != final and _parse(p) < (term, seq)]
        previous = older[-1] if older and _parse(older[-1])[0] == term else None
        keep_from = (term, (_parse(previous)[1] if previous else seq) + 1)
        doomed = [p for p in older if p != previous]
        doomed += [p for p in self.directory.glob("wal-*.log") if _parse(p) < keep_from]
        for path in doomed:
            path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(self.directory)

    # Segments ----------------------------------------------------------------------------
    def _open_segment(self, start_seq: int) -> None:
        path = self.directory / _name("wal", self._term, start_seq, "log")
        created = not path.exists()
        if not created:
            truncate_torn_tail(path)
        self._file = self.file_class(open_private(path, os.O_WRONLY | os.O_APPEND), "a")
        if created:
            fsync_dir(self.directory)

    def _close_segment(self) -> None:
        """Sync (by policy) and close the current segment before a snapshot: should that
        snapshot turn out corrupt, recovery replays this segment from the one before it."""
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            if self._fsync and self._unsynced:
                file.sync()
            self._unsynced = False
        finally:
            file.close()

    def append(self, op: Op) -> None:
        """Write one record (to the OS, not yet fsynced: see `commit`); DurabilityError if the
        disk refuses it, and for every call after that."""
        self._check()
        if self._file is None:
            raise RuntimeError("WriteAheadLog.append before begin_term")
        data = pickle.dumps(op, protocol=5)
        try:
            self._file.write_all(_HEADER.pack(len(data), zlib.crc32(data)) + data)
        except OSError as exc:
            self._fail(exc)
        self._unsynced = True
        self.records_since_snapshot += 1

    def commit(self) -> None:
        """Make every record appended so far durable (when the fsync policy says so) before
        the caller acknowledges the writes they log: one fsync for all of them."""
        self._check()
        if not (self._fsync and self._unsynced and self._file is not None):
            return
        try:
            self._file.sync()
        except OSError as exc:
            self._fail(exc)
        self._unsynced = False

    @property
    def snapshot_due(self) -> bool:
        return self.records_since_snapshot >= self._snapshot_every

    def close(self) -> None:
        if self.failed is not None:
            if self._file is not None:
                self._file.close()
                self._file = None
            return
        try:
            self._close_segment()
        except OSError as exc:
            self._fail(exc)


# Reading logs --------------------------------------------------------------------------------
def scan_segment(path: Path) -> tuple[list[Op], int, int]:
    """(every intact record of a segment, the bytes they take, the file's size): reading stops
    at the first torn or corrupt record."""
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
    return ops, pos, len(data)


def _warn_torn(path: Path, records: int, intact: int, size: int) -> None:
    log.warning(
        "kv wal %s: dropping a torn or corrupt tail of %d bytes after %d intact bytes (%d records)",
        path,
        size - intact,
        intact,
        records,
    )


def read_records(path: Path, warn: bool = False) -> list[Op]:
    """Every intact record of a segment; with `warn`, a dropped tail is logged with its size."""
    ops, intact, size = scan_segment(path)
    if warn and intact < size:
        _warn_torn(path, len(ops), intact, size)
    return ops


def truncate_torn_tail(path: Path) -> None:
    """Cut a segment back to its intact records before appending to it again (logged)."""
    ops, intact, size = scan_segment(path)
    if intact < size:
        _warn_torn(path, len(ops), intact, size)
        with SyncedFile(open_private(path, os.O_WRONLY), "w") as f:
            f.truncate(intact)
            f.sync()


def _newest_intact(directory: Path, skip: set[Path]) -> tuple[Path, int, int] | None:
    """The newest snapshot that passes its checksum, with its (term, seq); corrupt ones are
    logged and passed over for the one before it (kept for this)."""
    for path in reversed(_snapshots(directory)):
        if path in skip:
            continue
        try:
            verify_snapshot_file(path)
        except CorruptSnapshotError as exc:
            log.error("kv snapshot %s is corrupt; using the one before it: %s", path, exc)
            continue
        return (path, *_parse(path))
    return None


def _ops_after(directory: Path, term: int, seq: int, warn: bool) -> list[Op]:
    """The ops of `term` that follow `seq` without a gap."""
    ops: list[Op] = []
    for segment in _segments(directory, term):
        for op in read_records(segment, warn):
            if op.seq == seq + len(ops) + 1:
                ops.append(op)
    return ops


def read_log(directory: Path) -> tuple[StoreSnapshot | None, list[Op], int]:
    """The newest intact snapshot in `directory`, the ops logged after it, and its term."""
    skip: set[Path] = set()
    while (newest := _newest_intact(directory, skip)) is not None:
        path, term, seq = newest
        try:
            snap = read_snapshot_file(path)
        except CorruptSnapshotError as exc:  # passed its checksum, yet does not load
            log.error("kv snapshot %s cannot be loaded; using the one before it: %s", path, exc)
            skip.add(path)
            continue
        return snap, _ops_after(directory, term, seq, warn=True), term
    return None, [], 0


def log_position(directory: Path) -> tuple[int, int]:
    """(term, seq) the log in `directory` recovers to; (0, 0) if it holds none."""
    newest = _newest_intact(directory, set())
    if newest is None:
        return 0, 0
    _, term, seq = newest
    return term, seq + len(_ops_after(directory, term, seq, warn=False))


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
