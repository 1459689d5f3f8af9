"""API keys: `sk-app-<id>_<secret>`, stored as a record under `apikey:<id>` in the region's KV
store with the SHA-256 of the whole key (keys are 192-bit random, so a fast hash is as strong as
a slow one here and keeps the check cheap), its scopes, limits and revocation time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from enum import StrEnum

from pydantic import Field

from app.regions.spec import StrictModel

PREFIX = "sk-app-"
RECORD_PREFIX = "apikey:"
_KEY = re.compile(rf"^{PREFIX}([0-9a-f]{{12}})_([A-Za-z0-9_-]{{32}})$")


class Scope(StrEnum):
    INFERENCE = "inference"  # the OpenAI endpoints and model listing
    ADMIN = "admin"  # fleet, cache, autoscaling and key management endpoints; implies inference


class KeyLimits(StrictModel):
    """Per-key limits, cluster-wide; None is unlimited."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)


class KeyRecord(StrictModel):
    key_id: str
    name: str = Field(min_length=1, max_length=200)
    key_hash: str = Field(repr=False)
    scopes: tuple[Scope, ...]
    limits: KeyLimits = KeyLimits()
    created_s: float
    revoked_s: float | None = None

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    def public(self) -> dict[str, object]:
        """What `app keys list` shows: everything but the hash."""
        return self.model_dump(mode="json", exclude={"key_hash"})


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(
    name: str, scopes: tuple[Scope, ...], limits: KeyLimits, now_s: float
) -> tuple[str, KeyRecord]:
    """A fresh key (shown once) and the record that stores only its hash."""
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    record = KeyRecord(
        key_id=key_id,
        name=name,
        key_hash=digest(key),
        scopes=scopes,
        limits=limits,
        created_s=now_s,
    )
    return key, record


def key_id_of(key: str) -> str | None:
    """The id inside a well-formed key; None for anything else."""
    match = _KEY.match(key)
    return match.group(1) if match else None


def matches(record: KeyRecord, key: str) -> bool:
    return hmac.compare_digest(record.key_hash, digest(key))


def record_key(key_id: str) -> str:
    return f"{RECORD_PREFIX}{key_id}"
