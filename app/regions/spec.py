"""The per-region part of the fleet spec: where a region runs (cloud, cloud region, zones, node
types, public endpoint), which models it serves within which replica bounds, and how its peers
reach it. Pure pydantic, no Ray: the launcher renderer, `app up --region` and the gateways'
federation all read the same objects."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.autoscaling.config import merged

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cloud(StrEnum):
    """Where a region's Ray cluster runs; each has its own launcher (app.regions.launcher)."""

    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    KUBERNETES = "kubernetes"
    LOCAL = "local"  # a Ray cluster on this machine with its own ports (development, tests)


class Market(StrEnum):
    ON_DEMAND = "on_demand"
    SPOT = "spot"


class NodeType(StrictModel):
    """One kind of worker node. The launcher makes one node type per zone it lists, each with
    the region and zone labels, so the cluster autoscaler adds nodes where replicas wait."""

    instance_type: str = Field(min_length=1, description="The cloud's machine type.")
    cpus: float = Field(gt=0, description="Logical CPUs Ray schedules on one node.")
    gpus: int = Field(0, ge=0, description="GPUs per node.")
    accelerator: str | None = Field(None, description="GPU kind, e.g. L4 or H100 (GCP, K8s).")
    memory_gb: float | None = Field(None, gt=0, description="Memory per node (K8s requests).")
    min_nodes: int = Field(0, ge=0, description="Nodes kept per zone even when idle.")
    max_nodes: int = Field(1, ge=1, description="Most nodes per zone.")
    zones: tuple[Name, ...] = Field((), description="Zones to run in (default: the region's).")
    market: Market = Market.ON_DEMAND

    @model_validator(mode="after")
    def _bounds(self) -> NodeType:
        if self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) exceeds max_nodes ({self.max_nodes})")
        return self


class HeadNode(StrictModel):
    """The head runs the GCS, Serve's controller, HAProxy, the gateway and the fleet router; it
    gets no model replicas (the launcher gives it no CPU resources for them)."""

    instance_type: str = Field("m7i.2xlarge", min_length=1)
    cpus: float = Field(8, gt=0)
    memory_gb: float | None = Field(None, gt=0)


class ModelPlacement(StrictModel):
    """How many replicas of a model one region runs; min = max is a fixed count."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0, description="At deploy time (default: min).")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Overrides of the autoscaling thresholds for this model here."
    )

    @model_validator(mode="before")
    @classmethod
    def _fixed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"min_replicas": value, "max_replicas": max(1, value)}
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ModelPlacement:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"initial_replicas ({initial}) must lie in [min, max]")
        if self.autoscaling:
            merged(self.autoscaling)  # fails here, naming the field, not at deploy time
        return self

    @property
    def initial(self) -> int:
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas


class LocalCluster(StrictModel):
    """A `cloud: local` region's Ray cluster on this machine: every port it opens is derived
    from `port_base`, so several regions run side by side without colliding."""

    port_base: int = Field(
        20000, ge=1024, le=62000, description="GCS port; the others follow (see local_ports)."
    )
    num_cpus: int | None = Field(
        None, ge=0, description="Logical CPUs of the head node (0: it takes no replicas)."
    )
    autoscaler: bool = Field(
        False,
        description="Run Ray's autoscaler over the region's node_types with its fake multi-node "
        "provider: worker nodes are raylets on this machine, added when replicas do not fit "
        "and removed when idle, as a cloud region's are (app.regions.fake).",
    )
    idle_timeout_s: float = Field(
        60, gt=0, le=3600, description="With autoscaler: how long a node may idle before it goes."
    )


class Kubernetes(StrictModel):
    namespace: Name = "default"
    image: str = "rayproject/ray:2.60.0-py311-cpu"
    gpu_image: str = "rayproject/ray:2.60.0-py311-gpu"
    service_type: str = Field("ClusterIP", pattern=r"^(ClusterIP|LoadBalancer|NodePort)$")


class Region(StrictModel):
    cloud: Cloud = Cloud.LOCAL
    cloud_region: str | None = Field(
        None, description="The cloud's own name for the region (default: the region's name)."
    )
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)
    zones: tuple[Name, ...] = ()
    endpoint: str | None = Field(
        None,
        description="Public base URL of the region's gateway (scheme://host[:port]); peers "
        "forward to <endpoint>/v1.",
    )
    head: HeadNode = HeadNode()
    node_types: dict[Name, NodeType] = Field(default_factory=dict)
    models: dict[Name, ModelPlacement] = Field(
        default_factory=dict, description="model id -> replica bounds in this region."
    )
    autoscaling: dict[str, Any] | None = Field(
        None, description="Overrides of the fleet's autoscaling thresholds in this region."
    )
    provider: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra provider settings merged into the launcher's provider section "
        "(gcp: project_id; azure: resource_group, subscription_id).",
    )
    local: LocalCluster = LocalCluster()
    kubernetes: Kubernetes = Kubernetes()

    @model_validator(mode="after")
    def _consistent(self) -> Region:
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"endpoint {self.endpoint!r} is not an http(s) URL")
            if parts.path.rstrip("/") or parts.query:
                raise ValueError(f"endpoint {self.endpoint!r} must be scheme://host[:port] only")
        for name, node_type in self.node_types.items():
            unknown = set(node_type.zones) - set(self.zones)
            if unknown:
                raise ValueError(f"node_types.{name}.zones: {sorted(unknown)} not in zones")
        if self.autoscaling:
            merged(self.autoscaling)
        if self.local.autoscaler and not self.node_types:
            raise ValueError("local.autoscaler needs node_types: the nodes it may add")
        return self

    def base_url(self) -> str | None:
        """Where peers reach this region's gateway: the endpoint, or for a local region the
        loopback address of its HTTP port."""
        if self.endpoint:
            return self.endpoint.rstrip("/")
        if self.cloud is Cloud.LOCAL:
            return f"http://127.0.0.1:{local_ports(self.local)['http']}"
        return None


class Federation(StrictModel):
    """How the regions' gateways cooperate (app.regions.federation)."""

    summary_interval_s: float = Field(2.0, gt=0, le=300, description="Peer summary pull period.")
    summary_timeout_s: float = Field(2.0, gt=0, le=60)
    connect_timeout_s: float = Field(2.0, gt=0, le=60, description="Connect to a peer region.")
    forward_timeout_s: float = Field(
        300,
        gt=0,
        description="Whole-response limit of a forwarded non-streaming request; for a stream, "
        "the longest wait for its next piece.",
    )
    failure_threshold: int = Field(
        2, ge=1, le=100, description="Consecutive failures that take a peer out of rotation."
    )
    max_attempts: int = Field(3, ge=1, le=10, description="Regions tried per forwarded request.")
    secret_env: str = Field("APP_FEDERATION_SECRET", description="Variable holding the secret.")
    secret_file: str | None = Field(None, description="File holding the secret (wins if set).")


def local_ports(local: LocalCluster) -> dict[str, int]:
    """Every port a local region's cluster opens, from its port_base. Worker and replica port
    ranges get their own blocks so that two regions never hand out the same port."""
    base = local.port_base
    return {
        "gcs": base,
        "http": base + 1,
        "ray_client": base + 2,
        "node_manager": base + 3,
        "object_manager": base + 4,
        "dashboard_agent_listen": base + 5,
        "dashboard_agent_grpc": base + 6,
        "metrics_export": base + 7,
        "runtime_env_agent": base + 8,
        "haproxy_stats": base + 9,
        "haproxy_metrics": base + 10,
        "dashboard": base + 11,
        "min_worker": base + 100,
        "max_worker": base + 899,
        "direct_ingress_http_min": base + 900,
        "direct_ingress_http_max": base + 1399,
        "direct_ingress_grpc_min": base + 1400,
        "direct_ingress_grpc_max": base + 1899,
    }
