"""The Files API core: uploads streamed into a ContentStore, metadata records (OpenAI's file
object plus owner, pins and a precise creation time) in the KV store, per-owner listing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from app.api.errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from app.batches.content import ContentStore
from app.batches.index import Order, TimeIndex
from app.batches.records import ConflictError, RecordKV, update
from app.ids import new_id

MB = 1 << 20
CHUNK_BYTES = MB
MAX_FILENAME_CHARS = 255
# OpenAI's bounds for `expires_after.seconds`.
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86_400
PUBLIC = (
    "id",
    "object",
    "bytes",
    "created_at",
    "filename",
    "purpose",
    "status",
    "expires_at",
    "status_details",
)


class FileLimits(BaseModel):
    """What an upload may be; the defaults are OpenAI's Batch API input limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(200 * MB, ge=1, description="Largest upload, bytes.")
    max_lines: int = Field(50_000, ge=1, description="Most lines in a `batch` file.")
    upload_purposes: tuple[str, ...] = Field(
        ("batch",),
        description="Purposes a client may upload; `batch_output` files are written by the "
        "service (as OpenAI's are), never uploaded.",
    )


def file_key(file_id: str) -> str:
    return f"file:{file_id}"


def public(record: dict[str, Any]) -> dict[str, Any]:
    return {name: record.get(name) for name in PUBLIC}


def not_found(file_id: str) -> NotFoundError:
    return NotFoundError(f"No such File object: {file_id}", param="file_id")


def expiry_seconds(anchor: str | None, seconds: str | int | None) -> int | None:
    """`expires_after` as seconds after creation (None: kept until deleted); 400 if invalid."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise InvalidRequestError(
            "expires_after.anchor must be 'created_at'", param="expires_after.anchor"
        )
    try:
        value = int(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = -1
    if not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S:
        raise InvalidRequestError(
            f"expires_after.seconds must be an integer in {MIN_EXPIRY_S}..{MAX_EXPIRY_S}",
            param="expires_after.seconds",
        )
    return value


class Upload:
    """One file being written: bytes stream to the content store as they arrive (never held
    whole in memory) and the metadata record is written last, so it is the commit point."""

    def __init__(
        self, store: FileStore, owner: str, filename: str, file_id: str, max_bytes: int | None
    ) -> None:
        self.store, self.owner, self.filename, self.id = store, owner, filename, file_id
        self.max_bytes = max_bytes
        self.bytes = 0
        self.newlines = 0
        self._last = b"\n"
        self._handle: IO[bytes] | None = store.content.open_write(file_id)

    def write(self, data: bytes) -> None:
        if self._handle is None:
            raise RuntimeError("write to a finished upload")
        if self.max_bytes is not None and self.bytes + len(data) > self.max_bytes:
            self.abort()
            raise RequestTooLargeError(
                f"file exceeds the limit of {self.max_bytes} bytes", param="file"
            )
        if data:
            self._handle.write(data)
            self.bytes += len(data)
            self.newlines += data.count(b"\n")
            self._last = data[-1:]

    @property
    def lines(self) -> int:
        return self.newlines + (0 if self._last == b"\n" else 1)

    def commit(self, purpose: str, *, expires_after_s: int | None = None) -> dict[str, Any]:
        """Close the content and write the record; returns the public file object."""
        if self._handle is None:
            raise RuntimeError("commit of a finished upload")
        self._handle.close()
        self._handle = None
        return self.store._record_upload(self, purpose, expires_after_s)

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.store.content.delete(self.id)


class FileStore:
    """Files per owner (an API key id, or records.ANONYMOUS); another owner's file is a 404."""

    def __init__(
        self,
        kv: RecordKV,
        content: ContentStore,
        *,
        limits: FileLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.content = content
        self.limits = limits or FileLimits()
        self.clock = clock
        self.index = TimeIndex(kv, "file")

    # Writing -------------------------------------------------------------------------------
    def begin(self, owner: str, filename: str | None, *, file_id: str | None = None) -> Upload:
        """An upload from a client (size-limited; purpose checked at commit). `file_id`: a
        name chosen by the service (output files), written without limits."""
        name = (filename or "file").replace("\\", "/").rsplit("/", 1)[-1] or "file"
        name = name[:MAX_FILENAME_CHARS]
        limit = self.limits.max_bytes if file_id is None else None
        return Upload(self, owner, name, file_id or new_id("file"), limit)

    def create(
        self, owner: str, filename: str, purpose: str, chunks: Iterable[bytes], *, file_id: str
    ) -> dict[str, Any]:
        """A file written by the service itself (a batch's output or error file)."""
        upload = self.begin(owner, filename, file_id=file_id)
        try:
            for chunk in chunks:
                upload.write(chunk)
        except BaseException:
            upload.abort()
            raise
        return upload.commit(purpose)

    def _record_upload(
        self, upload: Upload, purpose: str, expires_after_s: int | None
    ) -> dict[str, Any]:
        internal = upload.max_bytes is None
        try:
            if not internal:
                self._check_upload(upload, purpose)
            now = self.clock()
            record = {
                "id": upload.id,
                "object": "file",
                "bytes": upload.bytes,
                "created_at": int(now),
                "filename": upload.filename,
                "purpose": purpose,
                "status": "processed",
                "expires_at": None if expires_after_s is None else int(now) + expires_after_s,
                "status_details": None,
                "owner": upload.owner,
                "created": now,
                "pins": [],
                "deleted": False,
            }
            self.kv.put(file_key(upload.id), record)
        except BaseException:
            self.content.delete(upload.id)
            raise
        self.index.add(upload.owner, now, upload.id, purpose)
        return public(record)

    def _check_upload(self, upload: Upload, purpose: str) -> None:
        if purpose not in self.limits.upload_purposes:
            allowed = ", ".join(repr(p) for p in self.limits.upload_purposes)
            raise InvalidRequestError(
                f"purpose {purpose!r} is not supported; use one of {allowed}", param="purpose"
            )
        if upload.bytes == 0:
            raise InvalidRequestError("the file is empty", param="file")
        if purpose == "batch" and upload.lines > self.limits.max_lines:
            raise InvalidRequestError(
                f"a batch file may have at most {self.limits.max_lines} lines, "
                f"this one has {upload.lines}",
                param="file",
            )

    # Reading -------------------------------------------------------------------------------
    def record(self, file_id: str) -> dict[str, Any] | None:
        """The whole record, whoever owns it (for the batch workflow); None if deleted."""
        record: dict[str, Any] | None = self.kv.get(file_key(file_id))
        return None if record is None or record.get("deleted") else record

    def owned(self, owner: str, file_id: str) -> dict[str, Any]:
        """The record if `owner` may see it, else a 404 (expired files included)."""
        record = self.record(file_id)
        if record is None or record.get("owner") != owner:
            raise not_found(file_id)
        expires = record.get("expires_at")
        if expires is not None and self.clock() >= expires:
            if not record.get("pins"):
                self.remove(file_id)
            raise not_found(file_id)
        return record

    def get(self, owner: str, file_id: str) -> dict[str, Any]:
        return public(self.owned(owner, file_id))

    def list(
        self,
        owner: str,
        *,
        after: str | None = None,
        limit: int = 10_000,
        order: Order = "desc",
        purpose: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the owner's files by creation time, and whether more follow."""
        position = None
        if after is not None:
            record = self.record(after)
            if record is None or record.get("owner") != owner:
                raise InvalidRequestError(f"after: no such file {after!r}", param="after")
            position = (float(record["created"]), after)
        ids, more = self.index.page(owner, limit=limit, order=order, after=position, tag=purpose)
        now = self.clock()
        records = self.kv.mget([file_key(i) for i in ids])
        data = [
            public(r)
            for r in records
            if r is not None
            and not r.get("deleted")
            and (r.get("expires_at") is None or now < r["expires_at"])
        ]
        return data, more

    def content_chunks(self, owner: str, file_id: str) -> Iterator[bytes]:
        """The file's bytes in chunks; the 404 check happens now, not at the first chunk."""
        self.owned(owner, file_id)
        handle = self.content.open_read(file_id)
        return _chunks(handle)

    def lines(self, file_id: str) -> Iterator[bytes]:
        """The file's lines (with their newlines), for the batch workflow."""
        with self.content.open_read(file_id) as handle:
            yield from handle

    # Deleting and pinning ------------------------------------------------------------------
    def delete(self, owner: str, file_id: str) -> dict[str, Any]:
        """Delete a file; 409 while a batch that is not finished uses it."""
        self.owned(owner, file_id)

        def tombstone(record: dict[str, Any] | None) -> dict[str, Any]:
            if record is None or record.get("deleted"):
                raise not_found(file_id)
            if record.get("pins"):
                raise ConflictError(
                    f"file {file_id} is the input of batch {record['pins'][0]}, which has not "
                    "finished; cancel it or wait for it to finish",
                    param="file_id",
                    code="file_in_use",
                )
            record["deleted"] = True
            return record

        update(self.kv, file_key(file_id), tombstone)
        self.remove(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def remove(self, file_id: str) -> None:
        """Remove a file whatever its owner and pins (expiry, a batch's own outputs);
        idempotent, and safe to repeat after a crash half-way."""
        record = self.kv.get(file_key(file_id))
        if record is not None:
            self.index.remove(record["owner"], float(record["created"]), file_id)
        self.content.delete(file_id)
        self.kv.delete(file_key(file_id))

    def pin(self, owner: str, file_id: str, batch_id: str) -> dict[str, Any]:
        """Mark the file as a batch's input (no delete until unpinned); returns the record."""

        def add(record: dict[str, Any] | None) -> dict[str, Any]:
            if record is None or record.get("deleted") or record.get("owner") != owner:
                raise not_found(file_id)
            if batch_id not in record["pins"]:
                record["pins"].append(batch_id)
            return record

        pinned: dict[str, Any] = update(self.kv, file_key(file_id), add)
        return pinned

    def unpin(self, file_id: str, batch_id: str) -> None:
        def drop(record: dict[str, Any] | None) -> dict[str, Any] | None:
            if record is not None and batch_id in record.get("pins", ()):
                record["pins"].remove(batch_id)
            return record

        update(self.kv, file_key(file_id), drop)


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
