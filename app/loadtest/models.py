"""Which model each request kind names: the user's choice, else one found in GET /v1/models."""

from __future__ import annotations

from typing import Any

import httpx

from app.loadtest.config import LoadTestConfig, Models, RequestKind

GENERATION_TASKS = {"text-generation", "chat", "completion", "completions", "llm", "generate"}
EMBEDDING_TASKS = {"embedding", "embeddings", "embed", "text-embedding"}
_KIND_FIELDS = ("task", "kind", "type", "owned_by")


class ModelSelectionError(ValueError):
    """A kind of the mix has no model: none given and none recognisable in /v1/models."""


def fetch_models(config: LoadTestConfig, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The base URL's model list (no redirects: they could lead away from the allowed host)."""
    headers = {}
    if config.api_key is not None:
        headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
    response = httpx.get(
        f"{config.base_url}/models", headers=headers, timeout=timeout_s, follow_redirects=False
    )
    response.raise_for_status()
    data = response.json().get("data")
    return [entry for entry in data or [] if isinstance(entry, dict) and "id" in entry]


def task_of(entry: dict[str, Any]) -> str | None:
    """`generation`, `embedding`, or None when the entry does not say (most servers other
    than this one list ids only)."""
    for name in _KIND_FIELDS:
        value = str(entry.get(name, "")).lower()
        if value in GENERATION_TASKS:
            return "generation"
        if value in EMBEDDING_TASKS:
            return "embedding"
    return None


def select_models(
    chosen: Models, listing: list[dict[str, Any]], kinds: list[RequestKind]
) -> tuple[dict[RequestKind, str], list[str]]:
    """The model for every kind in `kinds`, and notes on what was picked. The first listed
    model of the right task is taken; ModelSelectionError names the flag to pass when the
    list says nothing."""
    found: dict[str, list[str]] = {"generation": [], "embedding": []}
    for entry in listing:
        task = task_of(entry)
        if task is not None:
            found[task].append(str(entry["id"]))
    picked = {
        "generation": chosen.generation or next(iter(found["generation"]), None),
        "embedding": chosen.embedding or next(iter(found["embedding"]), None),
    }
    notes = [
        f"{task} model {picked[task]} (first of {', '.join(found[task])}; choose with {flag})"
        for task, flag, given in (
            ("generation", "--model", chosen.generation),
            ("embedding", "--embedding-model", chosen.embedding),
        )
        if not given and len(found[task]) > 1 and _needed(task, kinds)
    ]
    models: dict[RequestKind, str] = {}
    for kind in kinds:
        task = "embedding" if kind is RequestKind.EMBEDDING else "generation"
        model = picked[task]
        if model is None:
            flag = "--embedding-model" if task == "embedding" else "--model"
            raise ModelSelectionError(
                f"no {task} model for {kind.value} requests: /v1/models does not say which "
                f"model does what; pass {flag} MODEL, or weigh {kind.value} 0 in --mix"
            )
        models[kind] = model
    return models, notes


def _needed(task: str, kinds: list[RequestKind]) -> bool:
    return any((kind is RequestKind.EMBEDDING) == (task == "embedding") for kind in kinds)
