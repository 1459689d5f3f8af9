"""Which model each request kind names."""

from __future__ import annotations

import pytest

from app.loadtest.config import Models, RequestKind
from app.loadtest.models import ModelSelectionError, select_models, task_of

ALL = list(RequestKind)
OURS = [
    {"id": "echo", "owned_by": "app", "task": "text-generation"},
    {"id": "tiny-llama", "owned_by": "app", "task": "text-generation"},
    {"id": "all-minilm-l6-v2", "owned_by": "app", "task": "embedding"},
    {"id": "tiny-sd", "owned_by": "app", "task": "text-to-image"},
]


def test_task_from_the_listing() -> None:
    assert task_of(OURS[0]) == "generation"
    assert task_of(OURS[2]) == "embedding"
    assert task_of(OURS[3]) is None
    assert task_of({"id": "x", "kind": "Embeddings"}) == "embedding"
    assert task_of({"id": "gpt", "owned_by": "openai"}) is None


def test_first_model_of_each_task_with_a_note() -> None:
    models, notes = select_models(Models(), OURS, ALL)
    assert models[RequestKind.CHAT] == models[RequestKind.STREAM] == "echo"
    assert models[RequestKind.EMBEDDING] == "all-minilm-l6-v2"
    assert notes == ["generation model echo (first of echo, tiny-llama; choose with --model)"]


def test_flags_win() -> None:
    models, notes = select_models(Models(generation="tiny-llama"), OURS, ALL)
    assert models[RequestKind.COMPLETION] == "tiny-llama" and notes == []


def test_a_listing_that_says_nothing_needs_flags() -> None:
    listing = [{"id": "gpt-x", "owned_by": "vendor"}]
    with pytest.raises(ModelSelectionError, match="pass --model MODEL"):
        select_models(Models(), listing, ALL)
    with pytest.raises(ModelSelectionError, match="pass --embedding-model MODEL"):
        select_models(Models(generation="gpt-x"), listing, ALL)
    models, _ = select_models(Models(generation="gpt-x"), listing, [RequestKind.CHAT])
    assert models == {RequestKind.CHAT: "gpt-x"}
