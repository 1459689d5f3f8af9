"""The runner interface: one loaded model behind a small, task-specific, synchronous API.

Runners know nothing about Ray or HTTP. A Serve replica owns one runner, batches requests into it
and calls it from a worker thread, so every method here may block.

Every request carries a `cancel` event: the replica sets it from its event loop when the request's
caller goes away, and a runner reads it between decode or denoising steps and drops the request.
A request that fails on its own (a bad prompt, a failed sampling step) fails alone, as a
`RowError` in its place of the batch; its batch neighbours go on.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from app.catalog.cards import ModelCard
from app.catalog.loaders import (  # UnknownLoaderError: still importable from here
    UnknownLoaderError,
    register_loader,
)
from app.catalog.tasks import Task


class RunnerError(RuntimeError):
    """A runner could not load or run its model; the message says why."""


class GenerationCancelled(Exception):
    """The request's caller went away, so its work stopped before it finished."""


@dataclass(frozen=True)
class RowError:
    """One request of a batch failed; it takes that request's place in the batch's results."""

    error: Exception


def _cancel_event() -> threading.Event:
    return threading.Event()


@dataclass(frozen=True)
class GenerationRequest:
    """One text-generation request after validation: a rendered prompt and sampling settings."""

    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # A batch job's line: the continuous engine runs it after interactive requests, within
    # the card's batch_share (app.serving.engines.scheduler).
    background: bool = False
    cancel: threading.Event = field(default_factory=_cancel_event, compare=False, repr=False)


@dataclass(frozen=True)
class TokenDelta:
    """New text for one request from one decode step; finish_reason is set on its last delta."""

    text: str
    tokens: int = 1
    finish_reason: str | None = None  # "stop" or "length"


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int = 1
    width: int = 64
    height: int = 64
    num_inference_steps: int = 2
    seed: int | None = None
    negative_prompt: str | None = None
    cancel: threading.Event = field(default_factory=_cancel_event, compare=False, repr=False)


# One request's entry in one decode step (see TextGenerationRunner.generate).
StepEntry: TypeAlias = TokenDelta | RowError | None


@dataclass
class LoadedInfo:
    """What a runner reports after load(): shown by `app status` and GET /v1/models."""

    device: str
    dtype: str
    parameters: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(ABC):
    """Base of all runners; a subclass registers a loader name: `class X(Runner, loader="x")`."""

    task: ClassVar[Task]
    loader: ClassVar[str]
    # Blocking runners are called from a worker thread; cheap ones run on the event loop.
    blocking: ClassVar[bool] = True
    _registry: ClassVar[dict[str, type[Runner]]] = {}

    def __init_subclass__(cls, loader: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if loader is None:
            return
        if loader in Runner._registry:
            raise TypeError(f"loader {loader!r} is registered twice")
        task = getattr(cls, "task", None)
        if not isinstance(task, Task):
            raise TypeError(f"runner {cls.__name__} registers loader {loader!r} but sets no task")
        register_loader(loader, task)  # so cards can validate it without importing runners
        cls.loader = loader
        Runner._registry[loader] = cls

    def __init__(self, card: ModelCard, source: str | None, device: str = "cpu") -> None:
        self.card = card
        self.source = source
        self.device = device

    @abstractmethod
    def load(self) -> LoadedInfo:
        """Load weights (from a local directory or the hub) onto self.device."""

    @classmethod
    def registered(cls) -> dict[str, type[Runner]]:
        return dict(Runner._registry)


class TextGenerationRunner(Runner):
    task = Task.TEXT_GENERATION

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """Turn OpenAI-style messages into the prompt this model expects (its chat template)."""

    @abstractmethod
    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        """Decode a batch together; yield one list per step with an entry per request.

        An entry is None when that request produced nothing this step (it has finished, was
        cancelled, or its text is held back while a stop sequence may be forming). Each
        request's final entry is a delta with its finish_reason or a RowError, after which its
        entries are None. A cancelled request stops within one step and gets no final entry;
        the iteration ends once every request has finished or been cancelled.
        """


class EmbeddingRunner(Runner):
    task = Task.EMBEDDING

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @property
    @abstractmethod
    def dimensions(self) -> int: ...

    @property
    @abstractmethod
    def max_input_tokens(self) -> int: ...

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-normalised embeddings, one per text, in order."""


class ImageRunner(Runner):
    task = Task.TEXT_TO_IMAGE

    @abstractmethod
    def generate(self, batch: Sequence[ImageRequest]) -> list[list[bytes] | RowError]:
        """PNG-encoded images: for each request, a list of n images, or the RowError that
        request alone failed with (GenerationCancelled once it is cancelled)."""


def runner_class(loader: str) -> type[Runner]:
    """The runner registered under a loader name (importing the built-in runners first)."""
    import app.serving.runners  # noqa: F401  (registers the built-in runners)

    try:
        return Runner._registry[loader]
    except KeyError:
        raise UnknownLoaderError(
            f"unknown loader {loader!r}; known loaders: {sorted(Runner._registry)}"
        ) from None
