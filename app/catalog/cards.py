"""Model cards: the validated description of one servable model id, loaded from YAML in models/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.api.schemas import MAX_EMBEDDING_INPUTS, MAX_STOP_LENGTH, MAX_STOP_SEQUENCES
from app.autoscaling.config import merged
from app.cache.config import ResponseCachePolicy
from app.catalog.engine import EngineSettings
from app.catalog.loaders import loader_task
from app.catalog.tasks import Task  # re-exported: `from app.catalog.cards import Task` still works

MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MAX_IMAGE_SIDE = 1024  # pixels; larger images take minutes and gigabytes even on a GPU
# Characters of prompt text accepted per context token before tokenising, unless
# limits.max_input_chars says otherwise: far above any real tokenizer's average.
INPUT_CHARS_PER_TOKEN = 16
# timeouts.request_s when a card gives none: what one request of the task may take on a loaded
# replica, queueing included (a long generation should stream: its chunks have their own limit).
DEFAULT_REQUEST_TIMEOUT_S = {
    Task.TEXT_GENERATION: 300.0,
    Task.TEXT_TO_IMAGE: 300.0,
    Task.EMBEDDING: 60.0,
}


class Dtype(StrEnum):
    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    num_gpus: float = Field(
        0, ge=0, description="GPUs each replica asks Ray for (fractions allowed)."
    )
    num_cpus: float = Field(1, ge=0, description="CPUs each replica asks Ray for.")
    memory: int | None = Field(
        None, ge=0, description="Bytes of memory each replica reserves; None reserves nothing."
    )


class Batching(_Strict):
    max_batch_size: int = Field(
        8, ge=1, le=1024, description="Most requests one forward pass takes."
    )
    wait_timeout_s: float = Field(
        0.005, ge=0, le=10, description="How long a partial batch waits for more requests."
    )


class Replicas(_Strict):
    min: int = Field(1, ge=0, description="Fewest replicas the autoscaler keeps.")
    max: int = Field(1, ge=1, description="Most replicas the autoscaler may start.")
    initial: int | None = Field(None, ge=0, description="Replicas at deploy time (default: min).")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must not exceed replicas.max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(
                f"replicas.initial ({self.initial}) must lie in "
                f"[min, max] = [{self.min}, {self.max}]"
            )
        return self


class GenerationDefaults(_Strict):
    max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    max_context_tokens: int = Field(
        2048, ge=1, description="Prompt plus completion tokens a request may use in total."
    )


class ImageDefaults(_Strict):
    size: str = Field("64x64", pattern=r"^\d+x\d+$", description="Default WIDTHxHEIGHT.")
    num_inference_steps: int = Field(2, ge=1, le=200, description="Denoising steps per image.")
    max_images: int = Field(4, ge=1, le=16, description="Largest n a request may ask for.")


class Limits(_Strict):
    """What one request may ask of a replica, so no request's cost is unbounded.

    A request over a limit gets a 400 that names the parameter, the limit and this field.
    Image limits left unset are the card's image defaults: a card serves its default size and
    step count unless it raises them here.
    """

    max_prompts: int = Field(
        16, ge=1, le=4096, description="Prompts one completions request may list."
    )
    max_sequences: int = Field(
        16,
        ge=1,
        le=4096,
        description=(
            "Sequences one text-generation request decodes (prompts times n). Each holds one of "
            "the replica's max_ongoing_requests slots, so the smaller of the two applies."
        ),
    )
    max_messages: int = Field(256, ge=1, le=100_000, description="Messages in one chat request.")
    max_inputs: int = Field(
        256,
        ge=1,
        le=MAX_EMBEDDING_INPUTS,
        description=(
            "Inputs one embeddings request may list. A request holds one of the replica's slots "
            "per batching.max_batch_size inputs it embeds."
        ),
    )
    max_stop_sequences: int = Field(
        4, ge=0, le=MAX_STOP_SEQUENCES, description="Stop sequences one request may give."
    )
    max_stop_length: int = Field(
        64, ge=1, le=MAX_STOP_LENGTH, description="Characters in one stop sequence."
    )
    max_input_chars: int | None = Field(
        None,
        ge=1,
        description=(
            "Characters of prompt text (all messages, or all prompts, together) accepted before "
            f"tokenising; default {INPUT_CHARS_PER_TOKEN} * generation.max_context_tokens."
        ),
    )
    max_image_size: str | None = Field(
        None,
        pattern=r"^\d+x\d+$",
        description=(
            "Largest image as WIDTHxHEIGHT: a request may ask for at most as many pixels "
            "(for example 64x64 also allows 32x128); default image.size."
        ),
    )
    max_inference_steps: int | None = Field(
        None,
        ge=1,
        le=200,
        description=(
            "Most denoising steps a request may ask for; default image.num_inference_steps."
        ),
    )


class Timeouts(_Strict):
    """How long one request may run before it is cut off with a 504 and its work cancelled."""

    request_s: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description=(
            "A whole non-streaming request, and a stream's wait for its first chunk; default by "
            "task: 300 s text generation and images, 60 s embeddings."
        ),
    )
    chunk_s: float = Field(
        30.0, gt=0, le=86_400, description="A stream's longest wait for each later chunk."
    )


class BuildRecipe(_Strict):
    """How `app models build` can generate a card's local source when it is missing."""

    recipe: str = Field(description="Name of a recipe in app.catalog.recipes.")
    seed: int = Field(0, ge=0, description="Random seed, so a build is reproducible.")


class ModelCard(_Strict):
    """One model id, as an operator writes it in models/<id>.yaml."""

    id: Annotated[str, Field(pattern=MODEL_ID_PATTERN, description="Model id clients send.")]
    task: Task = Field(description="What the model does; decides the runner interface.")
    loader: str = Field(
        description="Runner that loads and runs the model (see app.catalog.loaders)."
    )
    source: str | None = Field(
        None,
        description=(
            "Where the weights are: a local directory (relative paths resolve against the "
            "catalogue directory) or a Hugging Face hub id such as 'org/name'."
        ),
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Dtype = Field(Dtype.AUTO, description="Weights dtype; auto picks float32 on CPU.")
    resources: Resources = Resources()
    batching: Batching = Batching()
    max_ongoing_requests: int = Field(
        64, ge=1, le=100_000, description="Requests one replica holds at once before Serve queues."
    )
    batch_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of a replica's max_ongoing_requests slots that batch jobs "
        "(app.batches) may hold at once; beyond it their lines get 429 and back off, so "
        "interactive requests always find the other slots free.",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=-1,
        le=100_000,
        description="Requests one replica keeps waiting for a slot (and each caller's handle "
        "router at most, per model); beyond that a request is refused at once with a 429 and "
        "Retry-After instead of joining a queue that grows with the overload. Unset: as many "
        "as max_ongoing_requests, so an admitted request waits at most about one request's "
        "time; -1: unbounded (Serve's own default).",
    )
    replicas: Replicas = Replicas()
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="This model's autoscaling thresholds (app.autoscaling.config: e.g. "
        "slo_p95_ms, target_utilization, predictive, schedules); the fleet spec's and its "
        "regions' settings override them field by field.",
    )
    generation: GenerationDefaults = GenerationDefaults()
    engine: EngineSettings = Field(
        EngineSettings(),
        description="How text generation is scheduled: static or continuous batching, and the "
        "continuous engine's KV cache budget (app.catalog.engine).",
    )
    image: ImageDefaults = ImageDefaults()
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    build: BuildRecipe | None = Field(
        None, description="Recipe that generates `source` locally (offline catalogue only)."
    )
    response_cache: ResponseCachePolicy = ResponseCachePolicy()
    description: str = Field("", description="Free text shown by `app status`.")
    owned_by: str = Field("app", description="owned_by in GET /v1/models.")

    @field_validator("loader")
    @classmethod
    def _known_loader(cls, loader: str) -> str:
        loader_task(loader)  # raises UnknownLoaderError (a ValueError) naming the known ones
        return loader

    @field_validator("autoscaling")
    @classmethod
    def _valid_autoscaling(cls, layer: dict[str, Any] | None) -> dict[str, Any] | None:
        if layer:
            merged(layer)  # fails at load, naming the field, not at deploy time
        return layer

    @model_validator(mode="after")
    def _loader_matches_task(self) -> ModelCard:
        runner_task = loader_task(self.loader)
        if runner_task != self.task:
            raise ValueError(
                f"loader {self.loader!r} runs {runner_task.value} models, "
                f"but the card's task is {self.task.value}"
            )
        return self

    @model_validator(mode="after")
    def _limits_cover_defaults(self) -> ModelCard:
        width, height = parse_size(self.image.size)
        if max(width, height) > MAX_IMAGE_SIDE:
            raise ValueError(f"image.size {self.image.size} has a side over {MAX_IMAGE_SIDE}")
        max_width, max_height = self.image_size_limit
        if max_width * max_height < width * height:
            raise ValueError(
                f"limits.max_image_size ({max_width}x{max_height}) is smaller than the default "
                f"image.size ({self.image.size})"
            )
        if self.inference_step_limit < self.image.num_inference_steps:
            raise ValueError(
                f"limits.max_inference_steps ({self.inference_step_limit}) is below the default "
                f"image.num_inference_steps ({self.image.num_inference_steps})"
            )
        return self

    @property
    def input_char_limit(self) -> int:
        """Characters of prompt text one request may carry (limits.max_input_chars)."""
        default = INPUT_CHARS_PER_TOKEN * self.generation.max_context_tokens
        return self.limits.max_input_chars or default

    @property
    def request_timeout_s(self) -> float:
        """Seconds one request may run (timeouts.request_s, else the task's default)."""
        return self.timeouts.request_s or DEFAULT_REQUEST_TIMEOUT_S[self.task]

    @property
    def queue_limit(self) -> int:
        """Requests a replica queues beyond its slots (-1: unbounded); see max_queued_requests."""
        if self.max_queued_requests is None:
            return self.max_ongoing_requests
        return self.max_queued_requests

    @property
    def engine_max_running(self) -> int:
        """Sequences the continuous engine decodes at once (engine.max_running, else
        batching.max_batch_size)."""
        return self.engine.max_running or self.batching.max_batch_size

    @property
    def engine_max_waiting(self) -> int:
        """Sequences that may wait in the continuous engine (engine.max_waiting, else
        max_ongoing_requests)."""
        if self.engine.max_waiting is None:
            return self.max_ongoing_requests
        return self.engine.max_waiting

    @property
    def sequence_limit(self) -> int:
        """Sequences one request may decode: limits.max_sequences within the replica's slots."""
        return min(self.limits.max_sequences, self.max_ongoing_requests)

    @property
    def image_size_limit(self) -> tuple[int, int]:
        """The size whose pixel count bounds a request's images (limits.max_image_size)."""
        return parse_size(self.limits.max_image_size or self.image.size)

    @property
    def inference_step_limit(self) -> int:
        return self.limits.max_inference_steps or self.image.num_inference_steps

    @property
    def deployment_name(self) -> str:
        """Serve deployment (and application) name for this model id."""
        return deployment_name(self.id)

    def resolve_source(self, catalogue_dir: Path) -> str | None:
        """A local directory made absolute, or a hub id unchanged.

        A source is local when it starts with '.', '/' or '~', or names an existing directory
        under the catalogue; anything else (such as 'org/name') is a hub id.
        """
        if self.source is None:
            return None
        path = Path(self.source).expanduser()
        if not path.is_absolute():
            path = catalogue_dir / path
        if self.source.startswith((".", "/", "~")) or path.exists():
            return str(path.resolve())
        return self.source


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' as two ints (the pattern was checked when the card loaded)."""
    width, height = size.split("x")
    return int(width), int(height)


def deployment_name(model_id: str) -> str:
    """The Serve application and deployment name that serves a model id."""
    return "model-" + re.sub(r"[^a-zA-Z0-9-]", "-", model_id)


class CatalogueError(ValueError):
    """A model card or the catalogue as a whole is invalid; the message names file and field."""


def _format_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid model card"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<card>"
        lines.append(f"  {field}: {item['msg']}")
    return "\n".join(lines)


def load_card(path: Path) -> ModelCard:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogueError(f"{path}: a model card must be a YAML mapping")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise CatalogueError(_format_validation_error(path, exc)) from exc


class Catalogue(BaseModel):
    """All model cards of one directory, keyed by model id."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    directory: Path
    cards: dict[str, ModelCard]

    def get(self, model_id: str) -> ModelCard | None:
        return self.cards.get(model_id)

    def __iter__(self) -> Iterator[ModelCard]:  # type: ignore[override]
        return iter(self.cards.values())

    def __len__(self) -> int:
        return len(self.cards)

    def select(self, model_ids: list[str] | None) -> Catalogue:
        """Only the named ids; an unknown id is an error that lists the known ones."""
        if not model_ids:
            return self
        unknown = sorted(set(model_ids) - set(self.cards))
        if unknown:
            raise CatalogueError(
                f"unknown model id(s) {unknown}; the catalogue has {sorted(self.cards)}"
            )
        return Catalogue(directory=self.directory, cards={i: self.cards[i] for i in model_ids})


def load_catalogue(directory: Path | str) -> Catalogue:
    """Load every *.yaml card in a directory; ids must be unique and match their file names."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise CatalogueError(f"catalogue directory {directory} does not exist")
    cards: dict[str, ModelCard] = {}
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        card = load_card(path)
        if card.id in cards:
            raise CatalogueError(f"{path}: model id {card.id!r} is defined twice")
        cards[card.id] = card
    if not cards:
        raise CatalogueError(f"catalogue directory {directory} holds no *.yaml model cards")
    return Catalogue(directory=directory, cards=cards)
