"""`POST /v1/files` bodies: multipart/form-data parsed as it streams in (python-multipart's
push parser), the `file` part written straight into a FileStore upload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.errors import InvalidRequestError, RequestTooLargeError
from app.batches.files import FileStore, Upload, expiry_seconds

# Form fields other than the file are short; anything longer is refused, not buffered.
MAX_FIELD_BYTES = 1024
FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
# Headers and boundaries of a few parts: what a body may carry beyond the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024


class FileForm:
    """Callbacks for one multipart body: fields kept, the file streamed to `store`."""

    def __init__(self, store: FileStore, owner: str) -> None:
        self.store, self.owner = store, owner
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None  # the current part's field name ("" if ignored)
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers.clear()
        self._part = None
        self._value.clear()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if self.upload is not None:
                raise InvalidRequestError("more than one 'file' part", param="file")
            filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.upload = self.store.begin(self.owner, filename or None)
        self._part = name if name == "file" or name in FIELDS else ""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file" and self.upload is not None:
            self.upload.write(data[start:end])
        elif self._part:
            self._value.extend(data[start:end])
            if len(self._value) > MAX_FIELD_BYTES:
                raise InvalidRequestError(f"field {self._part!r} is too long", param=self._part)

    def _part_end(self) -> None:
        if self._part and self._part != "file":
            self.fields[self._part] = self._value.decode("utf-8", "replace").strip()

    def _end(self) -> None:
        self.ended = True

    def commit(self) -> dict[str, Any]:
        """The file object once the whole body has been parsed; 400 for a missing field."""
        if not self.ended:
            raise InvalidRequestError("the multipart body ended early", code="invalid_multipart")
        if self.upload is None:
            raise InvalidRequestError("missing required parameter: 'file'", param="file")
        purpose = self.fields.get("purpose")
        if not purpose:
            raise InvalidRequestError("missing required parameter: 'purpose'", param="purpose")
        expires = expiry_seconds(
            self.fields.get("expires_after[anchor]"), self.fields.get("expires_after[seconds]")
        )
        return self.upload.commit(purpose, expires_after_s=expires)

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()


def boundary_of(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequestError(
            "expected a multipart/form-data body with 'file' and 'purpose'",
            code="invalid_multipart",
        )
    return boundary


async def receive_file(
    store: FileStore,
    owner: str,
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterator[bytes],
) -> dict[str, Any]:
    """Parse an upload body into `store`: 400 for a malformed body or a missing field, 413
    (before reading, when Content-Length says so) over the size limit. Disk and network
    writes run off the event loop."""
    boundary = boundary_of(content_type)
    limit = store.limits.max_bytes + FORM_OVERHEAD_BYTES
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise RequestTooLargeError(
            f"request body of {content_length} bytes exceeds the limit of {limit} bytes"
        )
    form = FileForm(store, owner)
    parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in body:
            if chunk:
                await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
        return await asyncio.to_thread(form.commit)
    except MultipartParseError as exc:
        form.abort()
        raise InvalidRequestError(
            f"malformed multipart body: {exc}", code="invalid_multipart"
        ) from exc
    except BaseException:
        form.abort()
        raise
