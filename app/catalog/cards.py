"""Model cards: the validated description of one servable model id, loaded from YAML in models/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.cache.config import ResponseCachePolicy
from app.catalog.loaders import loader_task
from app.catalog.tasks import Task  # re-exported: `from app.catalog.cards import Task` still works

MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


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
    replicas: Replicas = Replicas()
    generation: GenerationDefaults = GenerationDefaults()
    image: ImageDefaults = ImageDefaults()
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

    @model_validator(mode="after")
    def _loader_matches_task(self) -> ModelCard:
        runner_task = loader_task(self.loader)
        if runner_task != self.task:
            raise ValueError(
                f"loader {self.loader!r} runs {runner_task.value} models, "
                f"but the card's task is {self.task.value}"
            )
        return self

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
