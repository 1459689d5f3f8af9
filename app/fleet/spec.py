"""The fleet spec: regions (with coordinates and zones), which models run in which region with how
many replicas, and the load balancing settings every router uses. Loaded from YAML
(deployments/fleet.yaml is the multi-region example) and validated by pydantic.

Regions and zones are Ray node labels (`ray.io/availability-region`, `ray.io/availability-zone`,
the keys Ray itself fills from cloud metadata); a node without them belongs to the spec's
`default_region`. With no spec (the embedded default) the fleet is one region, `local`, and
every model keeps the replica counts of its card.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REGION_LABEL = "ray.io/availability-region"
ZONE_LABEL = "ray.io/availability-zone"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class FleetSpecError(ValueError):
    """The fleet spec file is missing or invalid; the message names the file and the field."""


class Strategy(StrEnum):
    """How a router ranks the eligible replicas of a model (see app.fleet.scoring)."""

    COMPOSITE = "composite"  # geo tiers with spill-over, then locality + load + performance
    GEO = "geo"  # nearest region first, least loaded within it
    LEAST_LOADED = "least_loaded"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    POWER_OF_TWO = "power_of_two"
    PERFORMANCE = "performance"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Region(_Strict):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    zones: tuple[Name, ...] = ()
    cloud: str | None = Field(None, description="Informational: which cloud hosts the region.")


class PerformanceWeights(_Strict):
    """Weights of the performance score; they must sum to 1."""

    latency: float = Field(0.4, ge=0, le=1)
    success_rate: float = Field(0.4, ge=0, le=1)
    throughput: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> PerformanceWeights:
        total = self.latency + self.success_rate + self.throughput
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"performance weights must sum to 1, not {total:g}")
        return self


class CompositeWeights(_Strict):
    """Weights of the composite score inside one region tier."""

    locality: float = Field(0.2, ge=0, description="Same zone as the client.")
    load: float = Field(0.4, ge=0, description="Spare capacity (1 - utilisation).")
    performance: float = Field(0.4, ge=0, description="The performance score.")


class LoadBalancing(_Strict):
    strategy: Strategy = Strategy.COMPOSITE
    health_check_interval_s: float = Field(2.0, gt=0, le=300)
    failover_threshold: int = Field(
        3, ge=1, le=100, description="Consecutive failed checks before a replica is unhealthy."
    )
    recovery_threshold: int = Field(
        1, ge=1, le=100, description="Consecutive passed checks before it is healthy again."
    )
    weights: PerformanceWeights = PerformanceWeights()
    composite: CompositeWeights = CompositeWeights()
    spillover_utilization: float = Field(
        1.0,
        gt=0,
        le=1,
        description="A region counts as saturated when every replica in it is at least this "
        "busy (ongoing / max_ongoing_requests); requests then spill to the next-nearest region.",
    )
    max_attempts: int = Field(3, ge=1, le=10, description="Tries per request, failover included.")
    backoff_s: float = Field(0.05, ge=0, le=10, description="First failover backoff; doubles.")
    snapshot_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often routers pull the router actor's snapshot."
    )


class GeoIP(_Strict):
    """How a client IP maps to a region when the request names none."""

    mmdb: str | None = Field(
        None, description="A MaxMind database (GeoLite2-City/Country .mmdb) read with maxminddb."
    )
    country_regions: dict[str, Name] = Field(
        default_factory=dict, description="ISO country code -> region, for the mmdb lookup."
    )
    cidr: dict[str, Name] = Field(
        default_factory=dict, description="CIDR block -> region, tried before the mmdb."
    )

    @model_validator(mode="after")
    def _valid_networks(self) -> GeoIP:
        for block in self.cidr:
            try:
                ipaddress.ip_network(block, strict=False)
            except ValueError as exc:
                raise ValueError(f"geoip.cidr: {block!r} is not a CIDR block") from exc
        return self


class FleetSpec(_Strict):
    regions: dict[Name, Region] = Field(min_length=1)
    default_region: Name = Field(
        description="Region of nodes that carry no region label (and of the embedded default)."
    )
    models: dict[Name, dict[Name, int]] = Field(
        default_factory=dict,
        description="model id -> {region: replicas}; models not listed keep their card's counts "
        "and may run anywhere.",
    )
    load_balancing: LoadBalancing = LoadBalancing()
    geoip: GeoIP = GeoIP()
    router_actor: Name = Field(
        "fleet-router", description="Name of the router actor (one control plane per fleet)."
    )

    @model_validator(mode="after")
    def _known_regions(self) -> FleetSpec:
        if self.default_region not in self.regions:
            raise ValueError(f"default_region {self.default_region!r} is not in regions")
        for model, placement in self.models.items():
            for region, count in placement.items():
                if region not in self.regions:
                    raise ValueError(
                        f"models.{model}: unknown region {region!r}; known: {sorted(self.regions)}"
                    )
                if count < 0:
                    raise ValueError(f"models.{model}.{region}: replicas must be >= 0")
            if sum(placement.values()) == 0:
                raise ValueError(f"models.{model}: place at least one replica")
        for target, source in (
            *((f"geoip.cidr[{k}]", v) for k, v in self.geoip.cidr.items()),
            *((f"geoip.country_regions[{k}]", v) for k, v in self.geoip.country_regions.items()),
        ):
            if source not in self.regions:
                raise ValueError(f"{target}: unknown region {source!r}")
        return self

    def placement(self, model: str) -> dict[str, int] | None:
        """{region: replicas} for a model the spec places, None for one it leaves to its card."""
        placement = self.models.get(model)
        return {r: n for r, n in placement.items() if n > 0} if placement else None


def embedded_fleet() -> FleetSpec:
    """The single-region fleet of the embedded default."""
    return FleetSpec(
        regions={"local": Region(latitude=0.0, longitude=0.0, zones=("local-a",))},
        default_region="local",
    )


def load_fleet(path: str | Path | None = None) -> FleetSpec:
    """The fleet spec at `path` (or $APP_FLEET); the embedded single-region fleet if neither."""
    path = path or os.environ.get("APP_FLEET") or None
    if path is None:
        return embedded_fleet()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FleetSpecError(f"{path}: cannot read the fleet spec: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise FleetSpecError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return FleetSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise FleetSpecError(f"{path}: {problems}") from exc


def node_locality(labels: dict[str, object]) -> tuple[str | None, str | None]:
    """(region, zone) from a node's labels (values may come as strings or one-item lists)."""

    def value(key: str) -> str | None:
        raw = labels.get(key)
        if isinstance(raw, list | tuple):
            raw = raw[0] if raw else None
        return str(raw) if raw else None

    return value(REGION_LABEL), value(ZONE_LABEL)


def own_locality() -> tuple[str | None, str | None]:
    """(region, zone) of the node this process runs on; (None, None) outside a Ray worker."""
    import ray

    if not ray.is_initialized():  # asking would connect this process to a cluster
        return None, None
    try:
        return node_locality(dict(ray.get_runtime_context().get_node_labels()))
    except Exception:
        return None, None
