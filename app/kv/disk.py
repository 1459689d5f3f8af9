"""Private, durable files of a KV member: 0700 directories, 0600 files, fsync of both.

Modes are set with chmod after creating, so they do not depend on the process umask: a store's
values (sessions, job records) must not be readable by other users of the node.

A new file, a rename or an unlink changes its directory, and on Linux file systems a crash can
lose that change even after the file's own data was fsynced, unless the directory is fsynced
too. So every helper here that creates or renames fsyncs the directory afterwards.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (new files, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """`path` as a 0700 directory: missing ones (parents too) are created 0700 and their parent
    directories fsynced; an existing `path` is tightened to 0700 (it may predate this code)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:  # another member of the group made it meanwhile
            continue
        os.chmod(directory, DIR_MODE)
        fsync_dir(directory.parent)
    if not missing:
        os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path, flags: int) -> int:
    """A descriptor of `path` opened with `flags` (O_CREAT implied), its mode forced to 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SyncedFile(io.FileIO):
    """An unbuffered file written whole and fsynced on request. Its two methods are where a
    disk fails (ENOSPC, EIO), so tests subclass it to fail on purpose."""

    def write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self.write(view)
            if not written:
                raise OSError(errno.EIO, f"short write to {self.name!r}")
            view = view[written:]

    def sync(self) -> None:
        os.fsync(self.fileno())


def atomic_write(
    path: Path, write: Callable[[SyncedFile], None], file_class: type[SyncedFile] = SyncedFile
) -> None:
    """Replace `path` with what `write` writes, all or nothing: a 0600 temporary file is
    written, fsynced, renamed over `path`, then the directory is fsynced."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with file_class(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            write(f)
            f.sync()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_private_text(path: Path, text: str) -> None:
    """Replace `path` atomically and durably with `text` (UTF-8), as a 0600 file."""
    atomic_write(path, lambda f: f.write_all(text.encode()))
