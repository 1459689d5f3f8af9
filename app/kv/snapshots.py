"""Snapshot files of a member's log: a header with the payload's length and SHA-256, then the
pickled StoreSnapshot.

The checksum is verified before anything is unpickled, so a snapshot damaged on disk (a bad
sector, a truncated copy, a file system that lost data) is refused, and recovery falls back to
the snapshot before it plus the log (see app.kv.wal). It guards against corruption, not against
someone who can write the member's 0700 directory. Files written before snapshots carried a
header (a bare pickle) are still read, with a warning, so an upgrade does not lose a store; the
next snapshot is written with one.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import struct
from pathlib import Path
from typing import BinaryIO

from app.kv.disk import SyncedFile, atomic_write
from app.kv.store import StoreSnapshot

log = logging.getLogger(__name__)

MAGIC = b"KVSNAP\x00\x01"
_HEADER = struct.Struct("!8sQ32s")  # magic, payload length, SHA-256 of the payload
_LEGACY = b"\x80\x05"  # a bare protocol-5 pickle: the format before the header
_CHUNK = 1 << 20


class CorruptSnapshotError(ValueError):
    """A snapshot file failed its checksum or could not be read back."""


class _HashingWriter:
    """Hands pickle's writes to `f` while hashing and counting them."""

    def __init__(self, f: SyncedFile) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        self._f.write_all(data)
        size = memoryview(data).nbytes
        self.length += size
        return size


def write_snapshot_file(
    path: Path, snap: StoreSnapshot, file_class: type[SyncedFile] = SyncedFile
) -> None:
    """Write `snap` to `path` atomically and durably (a 0600 file, its directory fsynced)."""

    def write(f: SyncedFile) -> None:
        f.write_all(bytes(_HEADER.size))  # filled in once the payload's length and hash are known
        body = _HashingWriter(f)
        pickle.dump(snap, body, protocol=5)
        f.seek(0)
        f.write_all(_HEADER.pack(MAGIC, body.length, body.digest.digest()))

    atomic_write(path, write, file_class)


def _verify(f: BinaryIO, path: Path) -> bool:
    """Check the header and checksum (positioned after the header); False for a legacy file."""
    head = f.read(_HEADER.size)
    if head[: len(_LEGACY)] == _LEGACY:
        return False
    if len(head) < _HEADER.size or head[: len(MAGIC)] != MAGIC:
        raise CorruptSnapshotError(f"{path.name}: not a snapshot (bad header)")
    _, length, expected = _HEADER.unpack(head)
    digest, seen = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        seen += len(chunk)
    if seen != length or digest.digest() != expected:
        raise CorruptSnapshotError(
            f"{path.name}: checksum mismatch ({seen} payload bytes, header says {length})"
        )
    return True


def verify_snapshot_file(path: Path) -> None:
    """Raise CorruptSnapshotError unless `path` passes its checksum (legacy files pass)."""
    try:
        with path.open("rb") as f:
            _verify(f, path)
    except OSError as exc:
        raise CorruptSnapshotError(f"{path.name}: unreadable ({exc})") from exc


def read_snapshot_file(path: Path) -> StoreSnapshot:
    """The snapshot in `path`, verified before it is unpickled; CorruptSnapshotError if not."""
    try:
        with path.open("rb") as f:
            checked = _verify(f, path)
            if not checked:
                log.warning("kv snapshot %s has no checksum (an older format); reading it", path)
            f.seek(_HEADER.size if checked else 0)
            snap = pickle.load(f)
    except CorruptSnapshotError:
        raise
    except Exception as exc:  # unreadable, or a legacy file that does not unpickle
        raise CorruptSnapshotError(f"{path.name}: cannot be read ({exc!r})") from exc
    if not isinstance(snap, StoreSnapshot):
        raise CorruptSnapshotError(f"{path.name}: holds a {type(snap).__name__}, not a snapshot")
    return snap
