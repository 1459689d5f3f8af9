"""Loader names a model card may use, and the task each runs; runners register theirs here."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from app.catalog.tasks import Task

# The built-in runners in app.serving.runners, so cards validate without importing them (or any ML
# library). Each runner registers its loader again on import, which fails if the task disagrees;
# tests/unit/test_catalog_loaders.py checks the two sets match.
BUILTIN_LOADERS: Mapping[str, Task] = MappingProxyType(
    {
        "echo": Task.TEXT_GENERATION,
        "transformers-causal-lm": Task.TEXT_GENERATION,
        "sentence-transformers": Task.EMBEDDING,
        "diffusers-stable-diffusion": Task.TEXT_TO_IMAGE,
    }
)

_loaders: dict[str, Task] = dict(BUILTIN_LOADERS)


class UnknownLoaderError(ValueError):
    """A card names a loader no runner registered."""


def register_loader(name: str, task: Task) -> None:
    """Declare a loader and its task; registering the same pair again is a no-op."""
    known = _loaders.get(name)
    if known is not None and known != task:
        raise ValueError(
            f"loader {name!r} is registered for {known.value} models, not {task.value}"
        )
    _loaders[name] = task


def loader_task(name: str) -> Task:
    """The task a loader runs; UnknownLoaderError names the known loaders."""
    try:
        return _loaders[name]
    except KeyError:
        raise UnknownLoaderError(
            f"unknown loader {name!r}; known loaders: {sorted(_loaders)}"
        ) from None


def known_loaders() -> dict[str, Task]:
    """Every registered loader and its task (a copy)."""
    return dict(_loaders)
