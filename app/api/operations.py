"""The API description's registry: how each route the service answers is described (summary,
key scope, request and response models, parameters, error statuses), for app.api.openapi."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel

from app.api import openapi_models as out
from app.api.schemas import REQUEST_TYPES
from app.batches.batches import COMPLETION_WINDOWS, BatchCreateRequest
from app.batches.files import MAX_EXPIRY_S, MIN_EXPIRY_S
from app.batches.index import Order
from app.batches.lines import ENDPOINTS
from app.cache.policy import BYPASS_HEADER
from app.events.bus import EventType
from app.fleet.hints import REGION_HEADER, STRATEGY_HEADER, ZONE_HEADER
from app.fleet.spec import Strategy
from app.security.keys import Scope

STRING: dict[str, Any] = {"type": "string"}
INTEGER: dict[str, Any] = {"type": "integer"}


def param(name: str, where: str, description: str, schema: Any = STRING) -> dict[str, Any]:
    """One OpenAPI parameter (`where`: path, query or header; only path ones are required)."""
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


@dataclass(frozen=True)
class Operation:
    """How one route is described. `response` None: not a pydantic shape (this document and
    its page, a file's bytes); `stream`: the chunk each SSE event carries when the request
    sets stream; `params`: query and header parameters (path ones come from PATH_PARAMS)."""

    id: str
    summary: str
    tag: str
    scope: Scope | None
    response: type[BaseModel] | None
    request: type[BaseModel] | None = None
    stream: type[BaseModel] | None = None
    media_type: str = "application/json"
    request_media_type: str = "application/json"
    description: str = ""
    errors: tuple[int, ...] = (500,)
    params: tuple[dict[str, Any], ...] = ()
    cached: bool = False  # the response cache: X-Cache out, bypass headers in
    routed: bool = False  # the gateway reads routing hints from headers
    metered: bool = False  # charged to the key's limits: x-ratelimit-* headers on success
    peer_signed: bool = False  # peer regions only, signed with the federation secret


CACHE_PARAMS = [
    param("Cache-Control", "header", "`no-cache` or `no-store`: skip the response cache."),
    param(BYPASS_HEADER, "header", "`1`, `true` or `yes`: skip the response cache."),
]
ROUTING_PARAMS = [
    param(REGION_HEADER, "header", "The client's region (gateway; else from its IP)."),
    param(ZONE_HEADER, "header", "The client's zone (gateway)."),
    param(
        STRATEGY_HEADER,
        "header",
        "Override the routing strategy (gateway).",
        {"type": "string", "enum": [s.value for s in Strategy]},
    ),
]
PATH_PARAMS = {
    "model": "A model id, as the model list gives it (it may contain `/`).",
    "file_id": "A file id (`file-...`), as the upload or a batch's output gave it.",
    "batch_id": "A batch id (`batch_...`), as its creation gave it.",
}

# The bounds app.events.http.parse_query checks (tests/unit/test_openapi.py compares them).
EVENT_PARAMS = (
    param("type", "query", "Event types to stream, repeated or comma-separated (all when "
          f"absent): {', '.join(f'`{t}`' for t in EventType)}.",
          {"type": "array", "items": STRING}),
    param("after", "query", "Resume after this sequence number (else stream from now on).",
          {"type": "integer", "minimum": 0}),
    param("Last-Event-ID", "header", "What a reconnecting EventSource sends; wins over `after`.",
          {"type": "integer", "minimum": 0}),
    param("timeout_s", "query", "End the stream after this many seconds.",
          {"type": "number", "exclusiveMinimum": 0, "maximum": 600, "default": 60}),
    param("limit", "query", "End the stream after this many events.",
          {"type": "integer", "minimum": 1, "maximum": 100_000}),
)  # fmt: skip


def _page_params(what: str, default: int, most: int) -> tuple[dict[str, Any], ...]:
    """A list endpoint's paging (app.batches.http checks the same bounds)."""
    return (
        param("after", "query", f"The last id of the previous page: this one starts after it "
              f"(400 if it is not one of the key's {what})."),
        param("limit", "query", f"At most this many {what}.",
              {"type": "integer", "minimum": 1, "maximum": most, "default": default}),
    )  # fmt: skip


ORDERS = list(get_args(Order))
FILE_LIST_PARAMS = (
    *_page_params("files", 10_000, 10_000),
    param("order", "query", "By creation time.", {**STRING, "enum": ORDERS, "default": "desc"}),
    param("purpose", "query", "Only the files of this purpose (`batch`, `batch_output`)."),
)
BATCH_LIST_PARAMS = _page_params("batches", 20, 100)

# 499 (the client went away) is left out: nobody is there to read it.
INFERENCE_ERRORS = (400, 404, 413, 429, 500, 503, 504)
OWNED = "The file belongs to the API key that uploaded it; another key gets a 404."


def _inference(
    op_id: str, summary: str, kind: str, response: type[BaseModel], **more: Any
) -> Operation:
    return Operation(
        op_id,
        summary,
        "inference",
        Scope.INFERENCE,
        response,
        REQUEST_TYPES[kind],
        description="Served by the model's replicas; the gateway routes to them.",
        errors=INFERENCE_ERRORS,
        routed=True,
        metered=True,
        **more,
    )


def _stored(
    op_id: str, summary: str, tag: str, response: type[BaseModel] | None, *errors: int, **more: Any
) -> Operation:
    """A Files or Batch API operation (gateway): objects in the region's KV store, which is a
    503 when unreachable, owned by the inference key that created them."""
    codes = tuple(sorted({*errors, 500, 503}))
    return Operation(op_id, summary, tag, Scope.INFERENCE, response, errors=codes, **more)


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/chat/completions"): _inference(
        "createChatCompletion", "Create a chat completion", "chat", out.ChatCompletion,
        stream=out.ChatCompletionChunk, cached=True,
    ),
    ("POST", "/v1/completions"): _inference(
        "createCompletion", "Create a completion", "completions", out.Completion,
        stream=out.CompletionChunk, cached=True,
    ),
    ("POST", "/v1/embeddings"): _inference(
        "createEmbedding", "Create embeddings", "embeddings", out.EmbeddingList, cached=True
    ),
    ("POST", "/v1/images/generations"): _inference(
        "createImage", "Generate images", "images", out.ImagesResponse
    ),
    ("GET", "/v1/models"): Operation(
        "listModels", "List the models this base URL serves", "models", Scope.INFERENCE,
        out.ModelList,
    ),
    ("GET", "/v1/models/{model}"): Operation(
        "retrieveModel", "Describe one model", "models", Scope.INFERENCE, out.Model,
        errors=(404, 500),
    ),
    ("POST", "/v1/files"): _stored(
        "createFile", "Upload a file (gateway)", "files", out.FileObject, 400, 413,
        request=out.FileUpload, request_media_type="multipart/form-data",
        description="The body streams to the region's file store. A `batch` file is JSONL, "
        "one request per line; its size and line limits are the fleet's "
        "batches.file_limits (200 MiB and 50,000 lines by default). " + OWNED,
    ),
    ("GET", "/v1/files"): _stored(
        "listFiles", "List the key's files (gateway)", "files", out.FileList, 400,
        params=FILE_LIST_PARAMS, description="Newest first unless order=asc; expired files "
        "are left out.",
    ),
    ("GET", "/v1/files/{file_id}"): _stored(
        "retrieveFile", "Describe one file (gateway)", "files", out.FileObject, 404,
        description=OWNED,
    ),
    ("DELETE", "/v1/files/{file_id}"): _stored(
        "deleteFile", "Delete a file (gateway)", "files", out.FileDeleted, 404, 409,
        description="409 (file_in_use) while a batch that has not finished reads it.",
    ),
    ("GET", "/v1/files/{file_id}/content"): _stored(
        "downloadFile", "A file's bytes (gateway)", "files", None, 404,
        media_type="application/octet-stream", description="As uploaded, or as a batch wrote "
        "them (its output and error files are JSONL, one line per request).",
    ),
    ("POST", "/v1/batches"): _stored(
        "createBatch", "Create a batch (gateway)", "batches", out.Batch, 400, 413,
        request=BatchCreateRequest,
        description=f"Over a `batch` file of the key's. `endpoint`: one of "
        f"{', '.join(f'`{e}`' for e in ENDPOINTS)}; `completion_window`: "
        f"{', '.join(f'`{w}`' for w in COMPLETION_WINDOWS)}; `output_expires_after`: "
        f"`{{\"anchor\": \"created_at\", \"seconds\": {MIN_EXPIRY_S}..{MAX_EXPIRY_S}}}`, how "
        "long its output files are kept. The answer is the batch, `validating`; its input "
        "file cannot be deleted until the batch finishes.",
    ),
    ("GET", "/v1/batches"): _stored(
        "listBatches", "List the key's batches (gateway)", "batches", out.BatchList, 400,
        params=BATCH_LIST_PARAMS, description="Newest first.",
    ),
    ("GET", "/v1/batches/{batch_id}"): _stored(
        "retrieveBatch", "Describe one batch (gateway)", "batches", out.Batch, 404,
        description="Another key's batch is a 404.",
    ),
    ("POST", "/v1/batches/{batch_id}/cancel"): _stored(
        "cancelBatch", "Cancel a batch (gateway)", "batches", out.Batch, 404, 409,
        description="A validating or in-progress batch becomes `cancelling`, then "
        "`cancelled`; asking again is harmless. 409 (conflict) once it is finalizing or "
        "finished.",
    ),
    ("GET", "/healthz"): Operation(
        "health", "Health", "operations", None, out.Health, errors=(500, 503),
        description="The gateway answers 503 when no model application is running.",
    ),
    ("GET", "/v1/fleet"): Operation(
        "fleetView", "Nodes, replicas, health, federation, autoscaling (gateway)", "operations",
        Scope.ADMIN, out.FleetView, errors=(500, 503),
        description="503 when the fleet router is not available.",
    ),
    ("GET", "/federation/summary"): Operation(
        "regionSummary", "This region's load, for its peer regions (gateway)", "operations",
        None, out.RegionSummary, errors=(401, 500, 503), peer_signed=True,
        description="503 when the gateway is not a federated region.",
    ),
    ("GET", "/v1/events"): Operation(
        "streamEvents", "Stream the region's events (server-sent events, gateway)", "operations",
        Scope.ADMIN, None, media_type="text/event-stream", errors=(400, 500, 503),
        params=EVENT_PARAMS,
        description="One `data:` event per bus event (JSON: seq, type, time, source, data, "
        "id), `id:` its sequence number. The stream ends after timeout_s or limit events; "
        "an EventSource resumes where it left off. 503 when the KV store is unreachable.",
    ),
    ("GET", "/openapi.json"): Operation("openapiDocument", "This document", "meta", None, None),
    ("GET", "/docs"): Operation(
        "docsPage", "This document as an HTML page", "meta", None, None, media_type="text/html"
    ),
}  # fmt: skip
