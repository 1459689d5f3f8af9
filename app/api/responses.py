"""OpenAI response and stream-chunk pieces shared by every endpoint: ids, usage, choices."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.catalog.cards import ModelCard
from app.ids import new_id as new_id  # re-exported for existing importers


def model_object(card: ModelCard, created: int) -> dict[str, Any]:
    return {
        "id": card.id,
        "object": "model",
        "created": created,
        "owned_by": card.owned_by,
        "task": card.task.value,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def encode_vector(vector: Sequence[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector)


def parse_size(size: str) -> tuple[int, int]:
    width, height = size.split("x")
    return int(width), int(height)


def chat_choice(index: int, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def text_choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
