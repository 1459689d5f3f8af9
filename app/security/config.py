"""The fleet spec's `auth` section: whether requests need an API key, and how keys are cached.
Pure: imported by the fleet spec, so no Ray and no KV imports here."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from app.regions.spec import StrictModel


class AuthMode(StrEnum):
    OFF = "off"  # anyone who reaches the port may call (only ever on loopback: see app up)
    KEYS = "keys"  # every request carries `Authorization: Bearer <key>`


class Auth(StrictModel):
    mode: AuthMode = AuthMode.OFF
    kv_name: str = Field("kv", description="The region's KV store holding the keys.")
    kv_namespace: str = Field("app-kv")
    key_cache_s: float = Field(
        10,
        ge=0,
        le=600,
        description="How long a replica trusts a key it looked up: revocation takes effect "
        "within this (0: look up every request).",
    )
    lease_fraction: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Share of a key's per-minute budget one process leases from the store at a "
        "time: the store is asked about once per this share of the traffic, not per request.",
    )
    lookup_timeout_s: float = Field(2.0, gt=0, le=60, description="A key lookup's deadline.")
