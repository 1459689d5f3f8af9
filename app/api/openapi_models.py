"""Pydantic models of what the service answers, for the OpenAPI document: the shapes the
service, the gateway and the router actor build as plain dicts (app.serving.service,
app.api.responses, app.serving.gateway, app.fleet.router_actor, app.regions.summary,
app.batches.files and app.batches.batches); and the upload form, which app.batches.multipart
parses as it streams, without a model.

The service never builds these models on the request path: the dicts go out as they are,
and a unit test checks that real payloads validate against these models, so the document
cannot drift from the wire.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import SkipJsonSchema

from app.batches.batches import COMPLETION_WINDOWS, BatchStatus
from app.batches.files import MAX_EXPIRY_S, MIN_EXPIRY_S
from app.batches.lines import ENDPOINTS
from app.catalog.tasks import Task
from app.fleet.spec import Strategy

FinishReason = Literal["stop", "length"]


class _Response(BaseModel):
    # forbid: a field the code adds without describing it fails the payload test.
    model_config = ConfigDict(extra="forbid")


class Usage(_Response):
    prompt_tokens: int = Field(description="Tokens in the prompt (all prompts and choices).")
    completion_tokens: int = Field(description="Tokens generated, over every choice.")
    total_tokens: int


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: None = Field(description="Always null: logprobs are not supported.")
    finish_reason: FinishReason


class ChatCompletion(_Response):
    """The answer to a chat completion request without `stream`."""

    id: str = Field(description="`chatcmpl-...`")
    object: Literal["chat.completion"]
    created: int = Field(description="Unix time in seconds.")
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = Field(
        description="The replica that answered, as region/zone/replica id."
    )


class ChatDelta(_Response):
    role: Literal["assistant"] | None = Field(None, description="In a choice's first chunk only.")
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta = Field(description="Empty in the chunk that carries finish_reason.")
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(description="Empty in the closing usage chunk.")
    system_fingerprint: str | None
    usage: Usage | None = Field(
        None, description="Only in the last chunk, when stream_options.include_usage is true."
    )


class TextChoice(_Response):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None = Field(description="Null in a stream's middle chunks.")


class Completion(_Response):
    """The answer to a completion request without `stream`."""

    id: str = Field(description="`cmpl-...`")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice] = Field(description="`n` choices per prompt, prompt by prompt.")
    usage: Usage
    system_fingerprint: str | None


class CompletionChunk(_Response):
    """One server-sent event of a streamed completion (OpenAI names its object
    `text_completion` too)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    system_fingerprint: str | None
    usage: Usage | None = None


class Embedding(_Response):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(
        description="Unit-normalised floats, or base64 of little-endian float32 when "
        "encoding_format is base64."
    )


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Response):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Image(_Response):
    b64_json: str = Field(description="A PNG image, base64-encoded.")


class ImagesResponse(_Response):
    created: int
    data: list[Image]


class Model(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: Task = Field(description="What the model does (not in OpenAI's model object).")


class ModelList(_Response):
    object: Literal["list"]
    data: list[Model]


class ErrorDetail(_Response):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error, ...")
    param: str | None = Field(description="The request parameter at fault, if one is.")
    code: str | None = Field(description="model_not_found, invalid_api_key, overloaded, ...")


class ErrorResponse(_Response):
    """Every error status carries this body (OpenAI's format)."""

    error: ErrorDetail


class GatewayHealth(_Response):
    status: Literal["ok", "degraded"] = Field(description="degraded: some model is not running.")
    models: dict[str, str] = Field(
        description="Per model id, its Serve application status (RUNNING, DEPLOYING, ...), "
        "NOT_DEPLOYED, or SERVED_BY_PEERS for a model other regions serve."
    )


class ReplicaHealth(_Response):
    status: Literal["ok"]
    model: str
    device: str
    inflight: int = Field(description="Admission slots in use (sequences and images).")


class Health(RootModel[GatewayHealth | ReplicaHealth]):
    """GET /healthz: the gateway's view of every model, or one replica's own state."""


class FleetRegion(_Response):
    latitude: float
    longitude: float
    zones: list[str]


class FleetNode(_Response):
    node_id: str
    region: str
    zone: str | None
    address: str
    alive: bool
    drained: bool


class FleetReplica(_Response):
    replica_id: str
    model: str
    node_id: str | None
    region: str
    zone: str | None
    capacity: int
    ongoing: int
    healthy: bool
    failed_checks: int
    drained: bool
    weight: float
    inject_latency_ms: float
    heartbeat_age_s: float
    performance: dict[str, Any] = Field(description="Latency, success rate and load figures.")


class FleetView(_Response):
    """GET /v1/fleet: what the fleet router knows, plus the federation and autoscaling views."""

    version: int
    strategy: Strategy
    regions: dict[str, FleetRegion]
    nodes: list[FleetNode]
    replicas: list[FleetReplica]
    placement: dict[str, Any] = Field(description="Per model: wanted and running replicas.")
    events: list[dict[str, Any]]
    region_drained: bool
    federation: dict[str, Any] | None
    autoscaling: list[dict[str, Any]] | None = Field(
        description="Per model: replicas, signals, forecast and recent decisions; null "
        "without a KV store."
    )


class ModelLoad(_Response):
    replicas: int
    healthy: int
    capacity: int = Field(description="Sum of the healthy replicas' max_ongoing_requests.")
    ongoing: int
    latency_ms: float | None
    success_rate: float


class RegionSummary(_Response):
    """GET /federation/summary: this region's load per model, for its peer regions."""

    region: str
    drained: bool
    generated_at: float = Field(description="Unix time of the producer, for display.")
    models: dict[str, ModelLoad]


class FileObject(_Response):
    """A file (OpenAI's file object): an upload, or a batch's output or error file."""

    id: str = Field(description="`file-...`")
    object: Literal["file"]
    bytes: int
    created_at: int = Field(description="Unix time in seconds.")
    filename: str
    purpose: str = Field(description="`batch` (uploaded) or `batch_output` (a batch's output).")
    status: Literal["processed"] = Field(description="A file is stored whole or not at all.")
    expires_at: int | None = Field(description="Unix time it goes; null: kept until deleted.")
    status_details: None = Field(description="Always null.")


class FileList(_Response):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool = Field(description="Whether a page after this one has files (use `after`).")


class FileDeleted(_Response):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchError(_Response):
    code: str = Field(description="file_not_found, empty_file, start_failed, ...")
    message: str


class BatchErrors(_Response):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(_Response):
    total: int = Field(description="Request lines in the input file (0 until validated).")
    completed: int
    failed: int = Field(description="Lines that failed, invalid ones included.")


class Batch(_Response):
    """A batch (OpenAI's batch object). Each `<status>_at` is the Unix time (seconds) it
    entered that status; null until it does."""

    id: str = Field(description="`batch_...`")
    object: Literal["batch"]
    endpoint: str = Field(description=f"One of {', '.join(ENDPOINTS)}.")
    errors: BatchErrors | None = Field(description="Why a failed batch failed; else null.")
    input_file_id: str
    completion_window: str = Field(description=f"One of {', '.join(COMPLETION_WINDOWS)}.")
    status: BatchStatus
    output_file_id: str | None = Field(description="The results (JSONL), once finished.")
    error_file_id: str | None = Field(description="The failed lines (JSONL), if any failed.")
    created_at: int
    in_progress_at: int | None
    expires_at: int = Field(description="When an unfinished batch expires.")
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(_Response):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool = Field(description="Whether a page after this one has batches.")


def _optional(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # a form field is sent or not: it has no null default


class FileUpload(BaseModel):
    """POST /v1/files: a multipart/form-data body; other parts are ignored."""

    file: bytes = Field(description="The file, with its filename (a `batch` file: JSONL).")
    purpose: str = Field(description="`batch` (the purposes a client may upload).")
    expires_after_anchor: Literal["created_at"] | SkipJsonSchema[None] = Field(
        None, alias="expires_after[anchor]", json_schema_extra=_optional
    )
    expires_after_seconds: (
        Annotated[int, Field(ge=MIN_EXPIRY_S, le=MAX_EXPIRY_S)] | SkipJsonSchema[None]
    ) = Field(
        None,
        alias="expires_after[seconds]",
        description="With the anchor: the file goes this long after its creation (else it is "
        "kept until deleted).",
        json_schema_extra=_optional,
    )


RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    EmbeddingList,
    ImagesResponse,
    Model,
    ModelList,
    ErrorResponse,
    Health,
    FleetView,
    RegionSummary,
    FileObject,
    FileList,
    FileDeleted,
    Batch,
    BatchList,
)
