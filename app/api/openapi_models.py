"""Pydantic models of what the service answers, for the OpenAPI document: the shapes the
service, the gateway and the router actor build as plain dicts (app.serving.service,
app.api.responses, app.serving.gateway, app.fleet.router_actor, app.regions.summary).

The service never builds these models on the request path: the dicts go out as they are,
and a unit test checks that real payloads validate against these models, so the document
cannot drift from the wire.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

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
)
