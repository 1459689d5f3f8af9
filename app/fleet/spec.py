"""The fleet spec, the one description of a deployment: its regions (app.regions.spec: cloud,
zones, node types, models with replica bounds, public endpoint), how they federate, the load
balancing every router uses, autoscaling thresholds and the GeoIP table. Loaded from YAML
(deployments/fleet.yaml) and validated by pydantic; errors name the file and the field.

Two layouts read the same spec. One Ray cluster per region (recommended): `app up --region R`
sets `own_region`, the cluster runs R's models and its gateway federates with the peers. One
cluster for every region (small private networks): nodes carry the region and zone labels
(`ray.io/availability-region`, `ray.io/availability-zone`) and a node without them belongs to
`default_region`. With no spec (the embedded default) the fleet is one local region and every
model keeps its card's replica counts.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from app.autoscaling.config import merged
from app.batches.settings import BatchSettings
from app.fleet.breaker import BreakerConfig
from app.regions.spec import Federation, ModelPlacement, Name, Region, StrictModel
from app.security.config import Auth

REGION_LABEL = "ray.io/availability-region"
ZONE_LABEL = "ray.io/availability-zone"


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


class PerformanceWeights(StrictModel):
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


class CompositeWeights(StrictModel):
    """Weights of the composite score inside one region tier."""

    locality: float = Field(0.2, ge=0, description="Same zone as the client.")
    load: float = Field(0.4, ge=0, description="Spare capacity (1 - utilisation).")
    performance: float = Field(0.4, ge=0, description="The performance score.")


class LoadBalancing(StrictModel):
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
    max_queue_wait_s: float | None = Field(
        30.0,
        gt=0,
        le=3600,
        description="On a model's own URL, the longest a request waits for a free replica slot "
        "before it is refused with 503 (load shedding); None waits as long as it takes.",
    )
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig,
        description="Per-replica circuit breakers in gateways and Python clients "
        "(app.fleet.breaker).",
    )


class GeoIP(StrictModel):
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


class FleetSpec(StrictModel):
    regions: dict[Name, Region] = Field(min_length=1)
    default_region: Name = Field(
        description="Region of nodes that carry no region label (and of the embedded default)."
    )
    own_region: Name | None = Field(
        None,
        description="Set by `app up --region`: this cluster is that region alone and its peers "
        "are federated; unset, one cluster holds every region (nodes labelled by region).",
    )
    load_balancing: LoadBalancing = LoadBalancing()
    federation: Federation = Federation()
    autoscaling: dict[str, Any] | None = Field(
        None, description="Fleet-wide autoscaling thresholds (app.autoscaling.config)."
    )
    geoip: GeoIP = GeoIP()
    auth: Auth = Field(
        default_factory=Auth, description="API keys: off (loopback only) or keys (app.security)."
    )
    router_actor: Name = Field(
        "fleet-router", description="Name of the router actor (one control plane per cluster)."
    )
    batches: BatchSettings = Field(
        default_factory=BatchSettings,
        description="Files and Batch APIs (app.batches): file store, limits, quotas and the "
        "batch workers; the gateway and the workers read the same settings from here.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, value: Any) -> Any:
        if isinstance(value, dict) and "models" in value:
            raise ValueError(
                "models: replica placement moved into each region "
                "(regions.<region>.models.<model>: {min_replicas, max_replicas} or a count)"
            )
        return value

    @model_validator(mode="after")
    def _known_regions(self) -> FleetSpec:
        for field, region in (
            ("default_region", self.default_region),
            ("own_region", self.own_region),
        ):
            if region is not None and region not in self.regions:
                raise ValueError(f"{field} {region!r} is not in regions {sorted(self.regions)}")
        for target, source in (
            *((f"geoip.cidr[{k}]", v) for k, v in self.geoip.cidr.items()),
            *((f"geoip.country_regions[{k}]", v) for k, v in self.geoip.country_regions.items()),
        ):
            if source not in self.regions:
                raise ValueError(f"{target}: unknown region {source!r}")
        if self.autoscaling:
            merged(self.autoscaling)
        return self

    def for_region(self, region: str) -> FleetSpec:
        """This spec as seen by the cluster of one region (`app up --region`)."""
        if region not in self.regions:
            raise FleetSpecError(f"unknown region {region!r}; the spec has {sorted(self.regions)}")
        return self.model_copy(update={"own_region": region})

    @property
    def home_region(self) -> str:
        """The region a process of this cluster belongs to when its node carries no label."""
        return self.own_region or self.default_region

    def local_regions(self) -> dict[str, Region]:
        """The regions this cluster runs: its own, or all of them in a single-cluster layout."""
        if self.own_region is None:
            return dict(self.regions)
        return {self.own_region: self.regions[self.own_region]}

    def peers(self) -> dict[str, Region]:
        """The other regions' clusters, reached through their gateways (empty when one cluster
        holds every region)."""
        if self.own_region is None:
            return {}
        return {name: r for name, r in self.regions.items() if name != self.own_region}

    def placed_models(self) -> set[str]:
        return {model for region in self.regions.values() for model in region.models}

    def placement(self, model: str) -> dict[str, ModelPlacement] | None:
        """{region: bounds} of a model in this cluster's regions; None for a model the spec
        leaves to its card (it runs anywhere with the card's counts)."""
        if model not in self.placed_models():
            return None
        return {
            name: region.models[model]
            for name, region in self.local_regions().items()
            if model in region.models and region.models[model].max_replicas > 0
        }

    def serves_here(self, model: str) -> bool:
        """Whether this cluster runs the model: the spec places it in one of this cluster's
        regions, or leaves it to its card (then every region runs it)."""
        placement = self.placement(model)
        return placement is None or bool(placement)

    def serving_regions(self, model: str) -> list[str]:
        """Every region that serves the model (the spec's view, across clusters)."""
        if model not in self.placed_models():
            return list(self.regions)
        return [name for name, region in self.regions.items() if model in region.models]

    def autoscaling_config(self, model: str, card_layer: dict[str, Any] | None = None) -> Any:
        """Thresholds for one model in this cluster: card < fleet < region < model-in-region."""
        region = self.regions[self.home_region]
        placed = region.models.get(model)
        return merged(
            card_layer, self.autoscaling, region.autoscaling, placed.autoscaling if placed else None
        )


def embedded_fleet() -> FleetSpec:
    """The single-region fleet of the embedded default."""
    return FleetSpec(
        regions={"local": Region(latitude=0.0, longitude=0.0, zones=("local-a",), cloud="local")},
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
