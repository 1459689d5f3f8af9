"""Cache tier configuration: which L2 tiers, their bounds, timeouts and the L1 bounds; loaded from
APP_CACHE_* environment variables on top of the defaults (the embedded default needs none).

The Redis URL (it may hold a password) and the Redis signing key are secrets: SecretStr fields,
masked in reprs and dumps, and validation errors never echo the value given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

ENV_PREFIX = "APP_CACHE_"
REDIS_SCHEMES = ("redis", "rediss", "unix")
MIN_SIGNING_KEY_CHARS = 16
MASK = str(SecretStr("x"))  # how pydantic shows a secret


class TierKind(StrEnum):
    ACTORS = "actors"
    REDIS = "redis"


class CacheConfigError(ValueError):
    """The cache configuration is invalid; the message names the field (and variable)."""


class CacheConfig(BaseModel):
    """One named cache: its L2 tiers in lookup order and the L1 every process keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field("cache", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="Cache name.")
    namespace: str = Field("app-cache", min_length=1, description="Ray namespace of its actors.")
    tiers: tuple[TierKind, ...] = Field(
        (TierKind.ACTORS,),
        description="L2 tiers in lookup order: actors, redis, or both (Redis behind the actors).",
    )
    num_shards: int = Field(2, ge=1, le=1024, description="Cache actors (L2 shards).")
    shard_max_entries: int = Field(200_000, ge=1, description="Entries per cache actor.")
    shard_max_bytes: int = Field(256 << 20, ge=1, description="Value bytes per cache actor.")
    shard_num_cpus: float = Field(0.0, ge=0, description="CPUs each cache actor reserves.")
    l1_max_entries: int = Field(10_000, ge=1, description="Entries in each process's L1.")
    l1_max_bytes: int = Field(64 << 20, ge=1, description="Value bytes in each process's L1.")
    l1_ttl_s: float = Field(
        300.0, gt=0, description="Longest an entry lives in an L1 (bounds staleness in outages)."
    )
    default_ttl_s: float | None = Field(3600.0, gt=0, description="TTL when set() gives none.")
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis server or cluster URL: redis://, rediss:// (TLS) or unix://. "
        "A secret: it may carry a password.",
    )
    redis_cluster: bool = Field(False, description="Treat redis_url as a Redis Cluster node.")
    redis_ssl_ca_certs: str | None = Field(
        None, description="CA bundle that verifies a rediss:// server (default: the system's)."
    )
    redis_signing_key: SecretStr | None = Field(
        None,
        description=f"Secret ({MIN_SIGNING_KEY_CHARS}+ characters) that seals every value stored "
        "in Redis with HMAC-SHA256; unset: Redis holds only unsigned JSON, never pickle.",
    )
    redis_signing_key_file: str | None = Field(
        None, description="File holding the Redis signing key (wins over redis_signing_key)."
    )
    op_timeout_s: float = Field(0.5, gt=0, description="Deadline of one L2 operation.")
    retry_after_s: float = Field(
        1.0, gt=0, description="How long an L2 tier that failed is skipped before it is tried."
    )
    lease_ttl_s: float = Field(30.0, gt=0, description="Longest a loader holds a key's lease.")
    load_wait_s: float = Field(
        30.0, gt=0, description="Longest a miss waits for another process's loader."
    )
    poll_wait_s: float = Field(
        1.0, gt=0, description="Long-poll period of the invalidation log (and metrics export)."
    )
    log_capacity: int = Field(10_000, ge=1, description="Invalidations each shard remembers.")
    warm_batch_size: int = Field(64, ge=1, description="Loads warm() runs at once.")

    @field_validator("tiers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple) and not value:
            raise ValueError("at least one L2 tier is needed (actors, redis)")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # Only a Redis tier needs it: configs of actors-only caches may cross to actors as JSON
        # dumps, which mask the URL.
        url = value.get_secret_value()
        if _uses_redis(info) and urlsplit(url).scheme not in REDIS_SCHEMES:
            masked = " (a JSON dump masks it)" if url == MASK else ""
            raise ValueError(f"must start with redis://, rediss:// (TLS) or unix://{masked}")
        return value

    @field_validator("redis_signing_key", "redis_signing_key_file", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_signing_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < MIN_SIGNING_KEY_CHARS:
            masked = " (a JSON dump masks it)" if value.get_secret_value() == MASK else ""
            raise ValueError(f"must be at least {MIN_SIGNING_KEY_CHARS} characters{masked}")
        return value

    @field_validator("redis_ssl_ca_certs")
    @classmethod
    def _ca_needs_tls(cls, value: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("redis_url")  # absent when redis_url itself was invalid
        scheme = urlsplit(url.get_secret_value()).scheme if isinstance(url, SecretStr) else None
        if value and _uses_redis(info) and scheme not in (None, "rediss"):
            raise ValueError("needs a rediss:// redis_url (CA certificates verify TLS)")
        return value

    def shard_settings(self) -> dict[str, Any]:
        """The settings as JSON data for the cache actors: all but Redis's, which they do not
        use and which hold the secrets."""
        redis = {name for name in type(self).model_fields if name.startswith("redis_")}
        return self.model_dump(mode="json", exclude=redis)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> CacheConfig:
        """Defaults, then APP_CACHE_<FIELD> variables, then keyword overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            name: env[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in env
        }
        values |= overrides
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            fields = ", ".join(
                f"{'.'.join(str(p) for p in e['loc'])} ({ENV_PREFIX}"
                f"{str(e['loc'][0]).upper()}): {e['msg']}"
                for e in exc.errors()
            )
            raise CacheConfigError(f"invalid cache configuration: {fields}") from exc


def _uses_redis(info: ValidationInfo) -> bool:
    return TierKind.REDIS in info.data.get("tiers", ())


class ResponseCachePolicy(BaseModel):
    """The `response_cache` field of a model card: whether deterministic responses of this model
    are cached, and for how long."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = Field(
        None,
        description="None: on for embeddings and text generation, off for images. "
        "APP_RESPONSE_CACHE=0 turns it off everywhere.",
    )
    ttl_s: float = Field(600.0, gt=0, description="How long a cached response is served.")


def response_cache_enabled(env: Mapping[str, str] | None = None) -> bool:
    """The global switch APP_RESPONSE_CACHE (default on)."""
    env = os.environ if env is None else env
    value = env.get("APP_RESPONSE_CACHE", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "on", "off"):
        raise CacheConfigError(f"APP_RESPONSE_CACHE must be 0 or 1, not {value!r}")
    return value in ("1", "true", "on")
