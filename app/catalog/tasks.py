"""Model tasks: what a model does, shared by the catalogue (cards, loaders) and the runners."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    TEXT_GENERATION = "text-generation"
    TEXT_TO_IMAGE = "text-to-image"
    EMBEDDING = "embedding"
