"""The API description: an OpenAPI 3.1 document of every route an OpenAIRoutes answers (and the
routes it is told another dispatcher answers), as the registry (app.api.operations) describes
them with the models requests are validated with and the response models
(app.api.openapi_models), and the same document as a plain HTML page for /docs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any, NamedTuple, Protocol

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from app.api import openapi_models as out
from app.api.openapi_docs import docs_html
from app.api.operations import (
    CACHE_PARAMS,
    INTEGER,
    OPERATIONS,
    PATH_PARAMS,
    ROUTING_PARAMS,
    STRING,
    Operation,
    param,
)
from app.cache.policy import CACHE_HEADER, CacheStatus
from app.regions.auth import FORWARDED_FROM, SIGNATURE
from app.security.keys import Scope

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/{model}"


class Route(NamedTuple):
    """One route of a route table: method, path (a template for the model prefix route) and the
    key scope it needs (None: no key)."""

    method: str
    path: str
    scope: Scope | None


class RouteTable(Protocol):
    """What the document is built from (OpenAIRoutes)."""

    @property
    def guard(self) -> object | None: ...
    def route_table(self) -> list[Route]: ...


class RouteDescriptionError(LookupError):
    """A route the service answers that OPERATIONS does not describe, or describes wrongly."""


KEY_ERRORS = (401, 403, 429, 503)  # added to every keyed operation when auth is on


class ErrorStatus(NamedTuple):
    name: str  # of its entry in components/responses
    description: str
    headers: tuple[str, ...] = ()


RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{field}-{kind}"
    for kind in ("requests", "tokens")
    for field in ("limit", "remaining", "reset")
)
ERROR_STATUSES: dict[int, ErrorStatus] = {
    400: ErrorStatus("BadRequest", "Invalid request; `param` names the field at fault "
                     "(invalid_json, context_length_exceeded, model_not_supported, ...)."),
    401: ErrorStatus("Unauthorized", "No valid API key (invalid_api_key), or a peer region's "
                     "request with a bad signature (invalid_federation_signature).",
                     ("WWW-Authenticate",)),
    403: ErrorStatus("Forbidden", "The key lacks the operation's scope (insufficient_scope)."),
    404: ErrorStatus("NotFound", "No such model (model_not_found), or no such file or batch "
                     "of the key's (not_found)."),
    409: ErrorStatus("Conflict", "The object's state forbids it: deleting a file a batch still "
                     "reads (file_in_use), cancelling a batch that is finishing (conflict)."),
    413: ErrorStatus("RequestTooLarge", "The body is over APP_MAX_REQUEST_BYTES (4 MiB default), "
                     "or an upload over the file size limit (request_too_large)."),
    429: ErrorStatus("TooManyRequests", "A key's limit reached (rate_limit_exceeded, with the "
                     "x-ratelimit-* headers), or the model at capacity (overloaded).",
                     ("Retry-After", *RATE_LIMIT_HEADERS)),
    500: ErrorStatus("InternalError", "A fault on the server's side (internal_error)."),
    503: ErrorStatus("ServiceUnavailable", "No replica or region can take the request, the "
                     "model's application is not running, or the API-key or KV store is "
                     "unreachable.",
                     ("Retry-After",)),
    504: ErrorStatus("GatewayTimeout", "The model ran past its card's timeouts.request_s; the "
                     "work was cancelled (request_timeout)."),
}  # fmt: skip

SSE_DESCRIPTION = (
    "With `stream: true`: one `data: <chunk JSON>` event per chunk (x-event-schema); an error "
    "after the first event is a `data:` event with an ErrorResponse; the last event is "
    "`data: [DONE]`."
)


def _headers() -> dict[str, Any]:
    cache_status = {"type": "string", "enum": [s.value for s in CacheStatus]}
    headers = {
        "Retry-After": ("Seconds to wait before retrying.", INTEGER),
        "WWW-Authenticate": ("`Bearer`.", STRING),
        CACHE_HEADER: ("Whether the model's response cache answered.", cache_status),
    }
    for kind in ("requests", "tokens"):
        headers[f"x-ratelimit-limit-{kind}"] = (f"The key's {kind} per minute.", INTEGER)
        headers[f"x-ratelimit-remaining-{kind}"] = (f"{kind.title()} left this minute.", INTEGER)
        headers[f"x-ratelimit-reset-{kind}"] = ("Time until the window resets, e.g. `12s`.", STRING)
    return {name: {"description": d, "schema": s} for name, (d, s) in headers.items()}


def _schemas(
    operations: Mapping[tuple[str, str], Operation],
) -> tuple[dict[str, Any], dict[type[BaseModel], dict[str, Any]]]:
    """Every request model of `operations` and every response model's JSON schema, and the
    $ref of each."""
    requests = dict.fromkeys(op.request for op in operations.values() if op.request is not None)
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((m, "validation") for m in requests),
        *((m, "serialization") for m in out.RESPONSE_MODELS),
    ]
    refs, top = models_json_schema(modes, ref_template=SCHEMA_REF)
    return top.get("$defs", {}), {model: dict(refs[(model, mode)]) for model, mode in modes}


def build_document(
    routes: Iterable[Route],
    *,
    auth: bool,
    server_url: str = "/",
    operations: Mapping[tuple[str, str], Operation] = OPERATIONS,
) -> dict[str, Any]:
    """The OpenAPI document of `routes`; RouteDescriptionError for a route `operations` lacks or
    gives another scope. `auth`: API keys are checked (else no operation needs one)."""
    schemas, refs = _schemas(operations)
    paths: dict[str, dict[str, Any]] = {}
    used: list[Operation] = []
    for route in routes:
        op = _described(route, operations)
        used.append(op)
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, op, refs, auth)
    components: dict[str, Any] = {
        "schemas": schemas,
        "responses": {e.name: _error_response(e) for e in ERROR_STATUSES.values()},
        "headers": _headers(),
    }
    schemes = _security_schemes(
        auth and any(op.scope for op in used), any(op.peer_signed for op in used)
    )
    if schemes:
        components["securitySchemes"] = schemes
    keys = "API keys are required" if auth else "API keys are off on this deployment"
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "OpenAI-compatible inference API",
            "version": _version(),
            "description": f"The gateway serves every model under `/v1`; each model also "
            f"serves the same API under `/models/<id>/v1`. {keys}. Errors carry an "
            "ErrorResponse body.",
        },
        "servers": [{"url": server_url, "description": "The base URL of this document."}],
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in used)],
        "paths": paths,
        "components": components,
    }


def _described(route: Route, operations: Mapping[tuple[str, str], Operation]) -> Operation:
    op = operations.get((route.method, route.path))
    if op is None:
        raise RouteDescriptionError(
            f"{route.method} {route.path} is served but not described: add it to "
            "app.api.operations.OPERATIONS"
        )
    if op.scope != route.scope:
        raise RouteDescriptionError(
            f"{route.method} {route.path} needs scope {route.scope} but OPERATIONS says {op.scope}"
        )
    return op


def _operation(
    route: Route, op: Operation, refs: Mapping[type[BaseModel], dict[str, Any]], auth: bool
) -> dict[str, Any]:
    keyed = auth and op.scope is not None
    body: dict[str, Any] = {"operationId": op.id, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        body["description"] = op.description
    params = [param(name, "path", PATH_PARAMS[name]) for name in re.findall(r"{(\w+)}", route.path)]
    params += (CACHE_PARAMS if op.cached else []) + (ROUTING_PARAMS if op.routed else [])
    params += op.params
    if params:
        body["parameters"] = params
    if op.request is not None:
        content = {op.request_media_type: {"schema": refs[op.request]}}
        body["requestBody"] = {"required": True, "content": content}
    body["security"] = (
        [{"apiKey": []}] if keyed else [{"federationSignature": []}] if op.peer_signed else []
    )
    if keyed and op.scope is not None:
        body["x-scope"] = op.scope.value
    statuses = sorted(set(op.errors) | (set(KEY_ERRORS) if keyed else set()))
    body["responses"] = {"200": _success(op, refs, rate_limited=keyed and op.metered)}
    for status in statuses:
        body["responses"][str(status)] = _refs("responses", [ERROR_STATUSES[status].name])[0]
    return body


def _success(
    op: Operation, refs: Mapping[type[BaseModel], dict[str, Any]], *, rate_limited: bool
) -> dict[str, Any]:
    plain = {"type": "object"} if op.media_type == "application/json" else {"type": "string"}
    content: dict[str, Any] = {
        op.media_type: {"schema": refs[op.response] if op.response else plain}
    }
    if op.stream is not None:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": SSE_DESCRIPTION},
            "x-event-schema": refs[op.stream],
        }
    headers = [CACHE_HEADER] if op.cached else []
    if rate_limited:  # the key's limits, for the limits it has
        headers += RATE_LIMIT_HEADERS
    success: dict[str, Any] = {"description": "OK", "content": content}
    if headers:
        success["headers"] = dict(zip(headers, _refs("headers", headers), strict=True))
    return success


def _error_response(error: ErrorStatus) -> dict[str, Any]:
    body = {"schema": _refs("schemas", ["ErrorResponse"])[0]}
    response = {"description": error.description, "content": {"application/json": body}}
    if error.headers:
        response["headers"] = dict(zip(error.headers, _refs("headers", error.headers), strict=True))
    return response


def _refs(section: str, names: Iterable[str]) -> list[dict[str, str]]:
    return [{"$ref": f"#/components/{section}/{name}"} for name in names]


def _security_schemes(keys: bool, peers: bool) -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    if keys:
        schemes["apiKey"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `app keys create`; each operation's x-scope is the "
            "scope it needs (admin implies inference).",
        }
    if peers:
        schemes["federationSignature"] = {
            "type": "apiKey",
            "in": "header",
            "name": SIGNATURE,
            "description": f"Peer regions only: the request signed with the federation secret, "
            f"the sending region in {FORWARDED_FROM}.",
        }
    return schemes


def _version() -> str:
    try:
        return metadata.version("app")
    except metadata.PackageNotFoundError:
        return "0"


class APIDescription:
    """The document and its page for one route table, built on first request and kept (per base
    URL it is served under) until a route is added."""

    def __init__(self, routes: RouteTable) -> None:
        self._routes = routes
        self._built: dict[str, tuple[bytes, bytes]] = {}

    def invalidate(self) -> None:
        self._built.clear()

    def document(self, server_url: str = "/") -> dict[str, Any]:
        table = self._routes.route_table()
        return build_document(table, auth=self._routes.guard is not None, server_url=server_url)

    def _rendered(self, request: Request) -> tuple[bytes, bytes]:
        # Serve passes the application's route prefix (/models/<id> for a model) as root_path.
        server = request.scope.get("root_path") or "/"
        if server not in self._built:
            document = self.document(server)
            self._built[server] = (orjson.dumps(document), docs_html(document).encode())
        return self._built[server]

    async def openapi_json(self, request: Request) -> Response:
        return Response(self._rendered(request)[0], media_type="application/json")

    async def docs_page(self, request: Request) -> Response:
        return Response(self._rendered(request)[1], media_type="text/html")
