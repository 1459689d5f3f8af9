"""What the inference response cache may store and under which key: deterministic requests only
(greedy text generation, every embedding), keyed by model id, revision and the canonical request;
plus how clients opt out (headers, a request field). Pure functions, no Ray."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from enum import StrEnum

import orjson
from pydantic import BaseModel

from app.catalog.cards import ModelCard, Task

CACHE_STATUS_FIELD = "x_cache"
"""Key in the response dict a model replica returns: 'hit', 'miss' or 'bypass'. The HTTP routes
move it into the X-Cache header; handle callers read it from the dict."""
CACHE_HEADER = "X-Cache"
BYPASS_HEADER = "x-cache-bypass"
RESPONSE_KEY_PREFIX = "resp:"
# Fields that never change the answer: how it is delivered, and the opt-out itself.
_IGNORED_FIELDS = frozenset({"stream", "stream_options", "cache_bypass", "user"})


class CacheStatus(StrEnum):
    HIT = "hit"
    MISS = "miss"
    BYPASS = "bypass"


def is_deterministic(req: BaseModel) -> bool:
    """Greedy decoding (temperature 0) and embeddings give the same answer every time; any
    sampled output (temperature > 0, with or without a seed) is never cached."""
    if hasattr(req, "temperature"):
        return float(req.temperature) == 0.0
    return hasattr(req, "input")  # embeddings


def bypass_requested(headers: Mapping[str, str]) -> bool:
    """`Cache-Control: no-cache` / `no-store`, or `X-Cache-Bypass: 1|true|yes`."""
    control = headers.get("cache-control", "").lower()
    if "no-cache" in control or "no-store" in control:
        return True
    return headers.get(BYPASS_HEADER, "").strip().lower() in ("1", "true", "yes")


def model_revision(card: ModelCard) -> str:
    """The card's revision, else a fingerprint of what decides the weights and the runner."""
    if card.revision:
        return card.revision
    basis = f"{card.loader}|{card.source}|{card.dtype.value}|{card.build}"
    return "fp-" + hashlib.sha256(basis.encode()).hexdigest()[:12]


def model_prefix(card: ModelCard) -> str:
    """Every cached response of one model starts with this (for prefix invalidation)."""
    return f"{RESPONSE_KEY_PREFIX}{card.id}:"


def response_key(operation: str, card: ModelCard, req: BaseModel) -> str:
    """resp:<model>:<revision>:<operation>:<sha256 of the canonical request>.

    Canonical: the declared fields only (extra fields a client sends are ignored by the server,
    so they must not split the cache), delivery fields dropped, keys sorted.
    """
    fields = set(type(req).model_fields) - _IGNORED_FIELDS
    body = orjson.dumps(req.model_dump(mode="json", include=fields), option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(body).hexdigest()
    return f"{model_prefix(card)}{model_revision(card)}:{operation}:{digest}"


def default_enabled(card: ModelCard) -> bool:
    """Cards that say nothing: on for embeddings and text generation, off for images."""
    return card.task in (Task.EMBEDDING, Task.TEXT_GENERATION)
