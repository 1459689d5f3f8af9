"""Where file contents live: a local directory (owner-only permissions) by default, or any
fsspec URL (s3://, gs://, memory://, ...) when one is configured."""

from __future__ import annotations

import contextlib
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

# Names are file ids, which never contain a separator: nothing can climb out of the root.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a content name: {name!r}")
    return name


class ContentStore(ABC):
    """Opaque blobs by name; the metadata in the KV store is the only index."""

    @abstractmethod
    def open_write(self, name: str) -> IO[bytes]:
        """A new blob; fails if `name` exists."""

    @abstractmethod
    def open_read(self, name: str) -> IO[bytes]: ...

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove `name`; a missing blob is not an error (deletes are retried)."""


class LocalContent(ContentStore):
    """A directory only this user can read (0700), files 0600. Only a shared mount makes it
    visible to replicas on other nodes: multi-node clusters configure a URL instead."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # mkdir's mode is masked by the umask

    def _path(self, name: str) -> Path:
        return self.root / _checked(name)

    def open_write(self, name: str) -> IO[bytes]:
        fd = os.open(self._path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb")

    def open_read(self, name: str) -> IO[bytes]:
        return self._path(name).open("rb")

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()


class FsspecContent(ContentStore):
    """Blobs under an fsspec URL. fsspec comes with torch; s3:// needs s3fs, gs:// gcsfs."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec  # imported here: only configured deployments need it

        self.fs, self.root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = self.root.rstrip("/")
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, name: str) -> str:
        return f"{self.root}/{_checked(name)}"

    def open_write(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if self.fs.exists(path):
            raise FileExistsError(path)
        handle: IO[bytes] = self.fs.open(path, "wb")
        return handle

    def open_read(self, name: str) -> IO[bytes]:
        handle: IO[bytes] = self.fs.open(self._path(name), "rb")
        return handle

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name))


def default_location() -> str:
    """$APP_FILES_URL if set, else a private directory under the user's home."""
    return os.environ.get("APP_FILES_URL") or str(Path.home() / ".local/share/app/files")


def content_store(location: str | os.PathLike[str] | None = None) -> ContentStore:
    """A plain path or file:// URL is a LocalContent; any other URL goes through fsspec;
    None is default_location()."""
    text = os.fspath(location) if location is not None else default_location()
    if "://" not in text:
        return LocalContent(text)
    if text.startswith("file://"):
        return LocalContent(text.removeprefix("file://"))
    return FsspecContent(text)
