"""The OpenAI-compatible HTTP surface: one FastAPI app factory shared by the gateway and by every
model replica, so both speak exactly the same wire format and errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from app.api.errors import (
    APIError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    RequestTooLargeError,
    error_json,
    from_validation_error,
)
from app.api.observed import REQUEST_MODEL, STREAMED, RequestObserver, RouteLabels
from app.api.openapi import APIDescription, Route
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.api.sse import streaming_response
from app.cache.policy import CACHE_HEADER, CACHE_STATUS_FIELD, bypass_requested
from app.observability.logs import REQUEST_ID_HEADER, bind_request_id
from app.observability.tracing import SpanKind, extract, span
from app.security.guard import CHARS_PER_TOKEN, Guard, estimate_tokens
from app.security.keys import Scope
from app.security.limits import Permit

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = int(os.environ.get("APP_MAX_REQUEST_BYTES", str(4 * 1024 * 1024)))
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


class Backend(Protocol):
    """What serves the API: the gateway (all models) or one model's replica. Streaming methods
    return SSE writes (see app.api.sse.SSEStream); errors before the first write raise."""

    async def list_models(self) -> list[dict[str, Any]]: ...
    async def health(self) -> dict[str, Any]: ...
    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]: ...
    def chat_sse(self, req: ChatCompletionRequest) -> AsyncIterator[bytes]: ...
    async def completions(self, req: CompletionRequest) -> dict[str, Any]: ...
    def completions_sse(self, req: CompletionRequest) -> AsyncIterator[bytes]: ...
    async def embeddings(self, req: EmbeddingRequest) -> dict[str, Any]: ...
    async def images(self, req: ImageGenerationRequest) -> dict[str, Any]: ...


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")


def cached_response(payload: dict[str, Any]) -> Response:
    """A unary response; the cache status a model replica put in it becomes the X-Cache header
    (the gateway relays the replica's dict, so both base URLs answer with the header)."""
    status = payload.pop(CACHE_STATUS_FIELD, None)
    return json_response(payload, headers={CACHE_HEADER: status} if status else None)


def error_response(error: APIError) -> Response:
    return Response(error_json(error), error.status, error.headers(), media_type="application/json")


async def read_body(request: Request) -> bytes:
    """The request body, refusing more than MAX_REQUEST_BYTES before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise RequestTooLargeError(
            f"request body of {declared} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise RequestTooLargeError(
                f"request body exceeds the limit of {MAX_REQUEST_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, model: type[R]) -> R:
    """Decode JSON and validate it into `model`, as a 400 that names the parameter on failure."""
    if not body:
        raise InvalidRequestError(
            "request body is empty; expected a JSON object", code="invalid_json"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from exc
    return validate_request(data, model)


def validate_request(data: Any, model: type[R]) -> R:
    """Validate a decoded request (a JSON object, or an instance already) into `model`."""
    if isinstance(data, model):
        return data
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


# Whether the request being dispatched needs no key (auth off, or admitted by a peer region).
TRUSTED: ContextVar[bool] = ContextVar("request_trusted", default=True)
# The HTTP request being dispatched, for backends that need its headers or client address (the
# gateway's routing hints). Each request runs in its own task, so its own context.
CURRENT_REQUEST: ContextVar[Request | None] = ContextVar("current_request", default=None)
# Its body as the client sent it, for a gateway that forwards it whole to a peer region.
CURRENT_BODY: ContextVar[bytes | None] = ContextVar("current_body", default=None)


class OpenAIRoutes:
    """Dispatches OpenAI requests to a Backend: `await routes(request)` returns the Response.

    Deliberately not FastAPI: behind Serve 2.60's direct ingress the same service answered
    2,284 chat requests/s as a `serve.ingress(FastAPI)` replica and 3,369 as a plain
    `__call__(request)` deployment with this dispatch (one run, BENCHMARKS.md). Routing eight
    fixed paths needs no framework; validation stays pydantic.
    """

    MODEL_PREFIX = "/v1/models/"  # GET /v1/models/<id>: the one route matched by prefix

    def __init__(
        self,
        backend: Backend,
        guard: Guard | None = None,
        labels: RouteLabels | None = None,
        on_overload: Callable[[], object] | None = None,
    ) -> None:
        self.backend = backend
        # Metrics of every inference request (app.api.observed); None: not recorded.
        self.observer = (
            RequestObserver(labels, on_overload=on_overload) if labels is not None else None
        )
        # API keys (app.security): None when the fleet's auth is off. GET routes need the
        # inference scope unless listed in _scopes (None: open, like /healthz).
        self.guard = guard
        self._scopes: dict[str, Scope | None] = {
            "/healthz": None,
            "/openapi.json": None,
            "/docs": None,
        }
        self._described: list[Route] = []  # answered in front of this dispatcher (describe)
        # Built from this table on first request (app.api.openapi), so add_get routes show.
        self.description = APIDescription(self)
        b = backend
        self._post: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/v1/chat/completions": lambda r: self._call(
                r, ChatCompletionRequest, b.chat, b.chat_sse
            ),
            "/v1/completions": lambda r: self._call(
                r, CompletionRequest, b.completions, b.completions_sse
            ),
            "/v1/embeddings": lambda r: self._call(r, EmbeddingRequest, b.embeddings),
            "/v1/images/generations": lambda r: self._call(r, ImageGenerationRequest, b.images),
        }
        self._get: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "/v1/models": self._list_models,
            "/healthz": self._health,
            "/openapi.json": self.description.openapi_json,
            "/docs": self.description.docs_page,
        }

    def add_get(
        self,
        path: str,
        handler: Callable[[Request], Awaitable[Response]],
        scope: Scope | None = Scope.ADMIN,
    ) -> None:
        """An extra GET route (the gateway's admin endpoints; `scope` None: no key needed)."""
        self._get[path] = handler
        self._scopes[path] = scope
        self.description.invalidate()

    def describe(self, routes: Iterable[Route]) -> None:
        """Routes another dispatcher answers in front of this one under the same base URL (the
        gateway's Files and Batch routes), for the API description to list as well."""
        self._described.extend(routes)
        self.description.invalidate()

    def route_table(self) -> list[Route]:
        """Every route answered here, with the scope it needs, and those `describe` was given
        (for the API description)."""
        return [
            *(Route("POST", path, Scope.INFERENCE) for path in self._post),
            *(Route("GET", path, self._scopes.get(path, Scope.INFERENCE)) for path in self._get),
            Route("GET", self.MODEL_PREFIX + "{model}", Scope.INFERENCE),
            *self._described,
        ]

    async def __call__(self, request: Request, trusted: bool = False) -> Response:
        """`trusted`: the request was already admitted elsewhere (a peer region's gateway,
        whose signature the backend checked), so no key is asked for."""
        CURRENT_REQUEST.set(request)
        TRUSTED.set(trusted or self.guard is None)
        incoming = request.headers.get(REQUEST_ID_HEADER)
        request_id = bind_request_id(incoming)
        observer = self.observer
        started = observer.begin() if observer is not None else 0.0
        path = route_path(request)
        known = path in self._post or path in self._get
        with span(
            f"{request.method} {path if known else 'other'}",
            parent=extract(request.headers),
            kind=SpanKind.SERVER,
            **{"http.request.method": request.method, "url.path": path, "request.id": request_id},
        ) as entry:
            try:
                response = await self._dispatch(request)
            except APIError as exc:
                if observer is not None:
                    observer.rejected(exc)
                response = error_response(exc)
            except Exception as exc:  # a bug on our side: say so, never hang or leak a trace
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                response = error_response(InternalError(f"internal error: {type(exc).__name__}"))
            entry.set_attribute("http.response.status_code", response.status_code)
        if incoming is None:  # behind Serve its middleware has already set the header
            response.headers[REQUEST_ID_HEADER] = request_id
        return observer.finished(response, started) if observer is not None else response

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """The same routes as a plain ASGI app (for tests and non-Serve hosting)."""
        response = await self(Request(scope, receive))
        await response(scope, receive, send)

    async def _dispatch(self, request: Request) -> Response:
        path = route_path(request)
        table = self._post if request.method == "POST" else self._get
        handler = table.get(path)
        if handler is not None and request.method == "GET":
            await self._admit_get(request, self._scopes.get(path, Scope.INFERENCE))
            return await handler(request)
        if handler is not None and request.method == "POST":
            return await handler(request)
        if path.startswith(self.MODEL_PREFIX) and request.method == "GET":
            await self._admit_get(request, Scope.INFERENCE)
            return await self._get_model(path.removeprefix(self.MODEL_PREFIX))
        if path in self._post or path in self._get:
            allowed = "POST" if path in self._post else "GET"
            raise MethodNotAllowedError(f"{request.method} is not allowed on {path}; use {allowed}")
        raise NotFoundError(f"no route for {request.method} {path}")

    async def _call(
        self,
        request: Request,
        schema: type[R],
        unary: Callable[[R], Awaitable[dict[str, Any]]],
        stream: Callable[[R], AsyncIterator[bytes]] | None = None,
    ) -> Response:
        # Authenticate before reading the body: an unknown caller costs no parsing. The key's
        # scope and limits are checked once the body gives the request's size.
        REQUEST_MODEL.set("")  # an inference request, its model not known yet
        guard = None if TRUSTED.get() else self.guard
        key = await guard.authenticate(request.headers.get("authorization")) if guard else None
        body = await read_body(request)
        CURRENT_BODY.set(body)
        req = parse_request(body, schema)
        REQUEST_MODEL.set(getattr(req, "model", ""))
        permit = None
        if guard is not None and key is not None:
            permit = await guard.admit(key, Scope.INFERENCE, request_tokens(req, len(body)))
        try:
            if getattr(req, "stream", False):
                if stream is None:
                    raise InvalidRequestError("this endpoint does not stream", param="stream")
                # Until its first chunk a stream is as blind to a disconnect as a unary
                # request (a sequence waiting for a place in the running batch, say).
                response = await until_disconnected(request, streaming_response(stream(req)))
                STREAMED.set(True)
                return with_permit(response, permit, streamed=True)
            if bypass_requested(request.headers):
                req.cache_bypass = True  # type: ignore[attr-defined]
            payload = await until_disconnected(request, unary(req))
        except BaseException:
            if permit is not None:
                await permit.finish(0)
            raise
        if permit is not None:
            usage = payload.get("usage")
            used = usage.get("total_tokens") if isinstance(usage, dict) else None
            await permit.finish(used if isinstance(used, int) else None)
        return with_permit(cached_response(payload), permit)

    async def _admit_get(self, request: Request, scope: Scope | None) -> None:
        if scope is None or TRUSTED.get() or self.guard is None:
            return
        permit = await self.guard.check(request.headers.get("authorization"), scope)
        await permit.finish(0)

    async def _list_models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": await self.backend.list_models()})

    async def _get_model(self, model_id: str) -> Response:
        for model in await self.backend.list_models():
            if model["id"] == model_id:
                return json_response(model)
        raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model")

    async def _health(self, request: Request) -> Response:
        return json_response(await self.backend.health())


def route_path(request: Request) -> str:
    """The path below the application's route prefix (Serve passes it as root_path)."""
    path: str = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path.rstrip("/") or "/"


class ClientGoneError(APIError):
    """The client closed the connection before its answer was ready; the work was cancelled.
    Nobody reads the answer; nginx's 499 is the conventional status for the logs."""

    status = 499
    type = "client_closed_request"


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled if the client disconnects first (so a model stops generating for
    nobody). The body has been read, so the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGoneError("the client closed the connection; the request was cancelled")
    finally:
        watcher.cancel()
        if not task.done():  # this coroutine itself was cancelled: take the work with it
            task.cancel()


async def _disconnect(request: Request) -> None:
    if (await request.receive())["type"] != "http.disconnect":
        # Not a disconnect (a server that repeats the body): nothing more to learn from it.
        await asyncio.get_running_loop().create_future()


def request_tokens(req: BaseModel, body_bytes: int) -> int:
    """The token estimate a per-key tokens-per-minute limit is charged up front (unary
    responses are charged their real usage when they end)."""
    if isinstance(req, ImageGenerationRequest):
        return 0
    if isinstance(req, EmbeddingRequest):
        return body_bytes // CHARS_PER_TOKEN
    prompts = len(req.prompts()) if isinstance(req, CompletionRequest) else 1
    sequences = prompts * int(getattr(req, "n", 1) or 1)
    return estimate_tokens(body_bytes, getattr(req, "max_tokens", None), sequences)


def with_permit(response: Response, permit: Permit | None, *, streamed: bool = False) -> Response:
    """The response with the key's rate-limit headers; a stream's permit ends when its last
    write is sent or the client goes."""
    if permit is None:
        return response
    response.headers.update(permit.headers)
    iterator = getattr(response, "body_iterator", None)
    if streamed:
        if iterator is None:  # complete at its first write: nothing left to hold
            _finish_later(permit)
        else:
            response.body_iterator = _finishing(iterator, permit)  # type: ignore[attr-defined]
    return response


async def _finishing(writes: AsyncIterator[Any], permit: Permit) -> AsyncIterator[Any]:
    try:
        async for piece in writes:
            yield piece
    finally:
        await permit.finish(None)


def _finish_later(permit: Permit) -> None:
    task = asyncio.get_running_loop().create_task(permit.finish(None))
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Task[None]] = set()  # strong references until the tasks finish
