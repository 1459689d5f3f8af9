"""The Files and Batch endpoints: a small dispatcher in OpenAIRoutes' style (methods and paths,
OpenAI error bodies), over a FileStore and a BatchStore. The caller authenticates; every
object belongs to the key that created it and is a 404 to any other."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from app.api.errors import (
    APIError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
)
from app.api.http import error_response, json_response, parse_request, read_body, route_path
from app.api.openapi import Route
from app.batches.batches import BatchCreateRequest, BatchStatus, BatchStore
from app.batches.files import FileStore
from app.batches.multipart import receive_file
from app.batches.records import owner_of
from app.security.keys import Scope

logger = logging.getLogger(__name__)

PREFIXES = ("/v1/files", "/v1/batches")
# The scope the caller admits these requests with: an inference key, which owns its objects.
SCOPE = Scope.INFERENCE
StartBatch = Callable[[str], Awaitable[None] | None]
Handler = Callable[[Request, str, dict[str, str]], Awaitable[Response]]


def handles(path: str) -> bool:
    """Whether a path (below the route prefix) is one of these routes' family."""
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


def openapi_path(pattern: re.Pattern[str]) -> str:
    """A route's pattern as an OpenAPI path template: each named group becomes `{name}`."""
    return re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)


def page_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be an integer in {low}..{high}", param=name)
    return value


class BatchRoutes:
    """`await routes(request, key_id)` answers a /v1/files or /v1/batches request.

    `start_batch(batch_id)` starts a created batch's workflow (sync or async); `identify`
    gives the key id of a request for `asgi` (tests, hosting without the gateway)."""

    def __init__(
        self,
        files: FileStore,
        batches: BatchStore,
        start_batch: StartBatch,
        *,
        identify: Callable[[Request], Awaitable[str | None]] | None = None,
    ) -> None:
        self.files = files
        self.batches = batches
        self.start_batch = start_batch
        self.identify = identify
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("POST", re.compile(r"/v1/files"), self._upload),
            ("GET", re.compile(r"/v1/files"), self._list_files),
            ("GET", re.compile(r"/v1/files/(?P<file_id>[^/]+)"), self._get_file),
            ("DELETE", re.compile(r"/v1/files/(?P<file_id>[^/]+)"), self._delete_file),
            ("GET", re.compile(r"/v1/files/(?P<file_id>[^/]+)/content"), self._content),
            ("POST", re.compile(r"/v1/batches"), self._create_batch),
            ("GET", re.compile(r"/v1/batches"), self._list_batches),
            ("GET", re.compile(r"/v1/batches/(?P<batch_id>[^/]+)"), self._get_batch),
            ("POST", re.compile(r"/v1/batches/(?P<batch_id>[^/]+)/cancel"), self._cancel),
        ]

    def route_table(self) -> list[Route]:
        """The routes answered here, from the list they are dispatched with (for the API
        description: OpenAIRoutes.describe)."""
        return [Route(method, openapi_path(pattern), SCOPE) for method, pattern, _ in self.routes]

    async def __call__(self, request: Request, key_id: str | None = None) -> Response:
        try:
            return await self._dispatch(request, owner_of(key_id))
        except APIError as exc:
            return error_response(exc)
        except Exception as exc:  # a bug on our side: say so, never leak a trace
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(InternalError(f"internal error: {type(exc).__name__}"))

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        key_id = await self.identify(request) if self.identify is not None else None
        response = await self(request, key_id)
        await response(scope, receive, send)

    async def _dispatch(self, request: Request, owner: str) -> Response:
        path = route_path(request)
        allowed = []
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method == request.method:
                return await handler(request, owner, match.groupdict())
            allowed.append(method)
        if allowed:
            raise MethodNotAllowedError(
                f"{request.method} is not allowed on {path}; use {' or '.join(allowed)}"
            )
        raise NotFoundError(f"no route for {request.method} {path}")

    # Files ---------------------------------------------------------------------------------
    async def _upload(self, request: Request, owner: str, _: dict[str, str]) -> Response:
        file = await receive_file(
            self.files,
            owner,
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.stream(),
        )
        return json_response(file)

    async def _list_files(self, request: Request, owner: str, _: dict[str, str]) -> Response:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order must be 'asc' or 'desc'", param="order")
        data, more = await asyncio.to_thread(
            self.files.list,
            owner,
            after=request.query_params.get("after") or None,
            limit=query_int(request, "limit", 10_000, 1, 10_000),
            order="asc" if order == "asc" else "desc",
            purpose=request.query_params.get("purpose") or None,
        )
        return json_response(page_body(data, more))

    async def _get_file(self, request: Request, owner: str, p: dict[str, str]) -> Response:
        return json_response(await asyncio.to_thread(self.files.get, owner, p["file_id"]))

    async def _delete_file(self, request: Request, owner: str, p: dict[str, str]) -> Response:
        return json_response(await asyncio.to_thread(self.files.delete, owner, p["file_id"]))

    async def _content(self, request: Request, owner: str, p: dict[str, str]) -> Response:
        file = await asyncio.to_thread(self.files.get, owner, p["file_id"])
        chunks = await asyncio.to_thread(self.files.content_chunks, owner, p["file_id"])
        # A sync iterator: Starlette reads it in its thread pool, chunk by chunk.
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"Content-Length": str(file["bytes"])},
        )

    # Batches -------------------------------------------------------------------------------
    async def _create_batch(self, request: Request, owner: str, _: dict[str, str]) -> Response:
        req = parse_request(await read_body(request), BatchCreateRequest)
        batch = await asyncio.to_thread(self.batches.create, owner, req)
        try:
            started = self.start_batch(batch["id"])
            if inspect.isawaitable(started):
                await started
        except Exception:
            message = "the batch could not be started; create it again"
            errors = {"object": "list", "data": [{"code": "start_failed", "message": message}]}
            await asyncio.to_thread(
                self.batches.advance, batch["id"], BatchStatus.FAILED, errors=errors
            )
            await asyncio.to_thread(self.files.unpin, batch["input_file_id"], batch["id"])
            raise
        return json_response(batch)

    async def _list_batches(self, request: Request, owner: str, _: dict[str, str]) -> Response:
        data, more = await asyncio.to_thread(
            self.batches.list,
            owner,
            after=request.query_params.get("after") or None,
            limit=query_int(request, "limit", 20, 1, 100),
        )
        return json_response(page_body(data, more))

    async def _get_batch(self, request: Request, owner: str, p: dict[str, str]) -> Response:
        return json_response(await asyncio.to_thread(self.batches.get, owner, p["batch_id"]))

    async def _cancel(self, request: Request, owner: str, p: dict[str, str]) -> Response:
        return json_response(await asyncio.to_thread(self.batches.cancel, owner, p["batch_id"]))
