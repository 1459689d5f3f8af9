"""Runners, one module per loader family; importing this package registers them all."""

from app.serving.runners import echo, embedding, image, text  # noqa: F401
from app.serving.runners.base import (
    EmbeddingRunner,
    GenerationCancelled,
    GenerationRequest,
    ImageRequest,
    ImageRunner,
    LoadedInfo,
    RowError,
    Runner,
    RunnerError,
    StepEntry,
    TextGenerationRunner,
    TokenDelta,
    UnknownLoaderError,
    runner_class,
)

__all__ = [
    "EmbeddingRunner",
    "GenerationCancelled",
    "GenerationRequest",
    "ImageRequest",
    "ImageRunner",
    "LoadedInfo",
    "RowError",
    "Runner",
    "RunnerError",
    "StepEntry",
    "TextGenerationRunner",
    "TokenDelta",
    "UnknownLoaderError",
    "runner_class",
]
