"""The catalogue of every metric the service exports: name, kind, description, tag keys and
histogram boundaries, and the names Ray's Prometheus endpoint gives them. No Ray import here;
app.observability.recorder turns these definitions into ray.util.metrics objects.

How Ray 2.60 names what it exports (ray/_private/telemetry/open_telemetry_metric_recorder.py
registers each metric as `ray_<name>`; opentelemetry's Prometheus exporter then writes it):

- a Counter as `ray_<name>_total` (prometheus_client's CounterMetricFamily adds `_total`);
- a Gauge as `ray_<name>`;
- a Histogram as `ray_<name>_bucket` (with `le`), `ray_<name>_sum` and `ray_<name>_count`.

Ray registers every instrument with unit "1", which the exporter maps to no suffix. With the
legacy OpenCensus path (`RAY_enable_open_telemetry=0`) counters are still `ray_<name>_total`,
plus a deprecated gauge `ray_<name>`; dashboards and alerts use only the names above. Every
series also carries Ray's own labels (SessionName, NodeAddress, WorkerId, ...), so queries
aggregate with `sum by (...)` / `max by (...)` over the labels listed here.

Gauges must be set again at least once per export interval (`metrics_report_interval_ms`,
10 s by default): the worker's recorder forgets a gauge's value after each export and the
metrics agent drops it two intervals later (the recorder's sampler does this for gauges that
change rarely).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

PREFIX = "ray_"  # what Ray's metrics agent puts before every metric name
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
BUCKET_LABEL = "le"  # the label Prometheus adds to a histogram's _bucket series

# Ray's rule for names (ray/util/metrics.py, from prometheus_client; ':' is deprecated there);
# tag keys must be Prometheus label names, and names starting with "__" are reserved.
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_EXPORTED_SUFFIXES = ("_total", *HISTOGRAM_SUFFIXES)


class Kind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricDef:
    """One metric as ray.util.metrics creates it. Invalid definitions fail at import."""

    name: str
    kind: Kind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name.endswith(_EXPORTED_SUFFIXES):
            raise ValueError(f"metric name {self.name!r}: letters, digits and _, no suffix")
        if not self.description:
            raise ValueError(f"metric {self.name}: a description is required")
        if len(set(self.tag_keys)) != len(self.tag_keys):
            raise ValueError(f"metric {self.name}: duplicate tag keys {self.tag_keys}")
        for key in self.tag_keys:
            if not _LABEL.match(key) or key.startswith("__") or key == BUCKET_LABEL:
                raise ValueError(f"metric {self.name}: {key!r} is not a usable label name")
        if (self.kind is Kind.HISTOGRAM) != bool(self.boundaries):
            raise ValueError(f"metric {self.name}: boundaries go with histograms, and only them")
        bounds = self.boundaries
        if any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"metric {self.name}: boundaries must be positive and increasing")

    @property
    def exported(self) -> str:
        """The metric family's name on Ray's Prometheus endpoint."""
        suffix = "_total" if self.kind is Kind.COUNTER else ""
        return f"{PREFIX}{self.name}{suffix}"

    @property
    def series(self) -> tuple[str, ...]:
        """Every series name a query may use for this metric."""
        if self.kind is Kind.HISTOGRAM:
            return tuple(f"{PREFIX}{self.name}{s}" for s in HISTOGRAM_SUFFIXES)
        return (self.exported,)


# ---- label values that are not free text ----------------------------------------------------


class Base(StrEnum):
    """Which base URL a request came in on."""

    GATEWAY = "gateway"  # /v1: every model, with failover and federation
    MODEL = "model"  # /models/<id>/v1: straight to the model's replicas


class Reason(StrEnum):
    """Why a request was turned away before any work (a 429 or an ingress 503)."""

    RATE_LIMITED = "rate_limited"  # the API key's requests, tokens or concurrency limit
    OVERLOADED = "overloaded"  # no replica slot: replica full, or the ingress wait ran out


class Queue(StrEnum):
    """Where requests wait."""

    INGRESS = "ingress"  # in a model's ingress router, for a replica with a free slot
    BATCH = "batch"  # in a replica, for the next batch or a place in the running one


class ForwardOutcome(StrEnum):
    OK = "ok"
    BUSY = "busy"  # the peer answered 429/503: the next region is tried
    UNREACHABLE = "unreachable"  # connection failed, or the peer's circuit is open
    ERROR = "error"  # the peer's final answer was an error, relayed to the client


class KVOutcome(StrEnum):
    OK = "ok"
    ERROR = "error"


# ---- boundaries (seconds) ---------------------------------------------------------------------

REQUEST_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FIRST_TOKEN_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTER_TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
KV_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
HTTP_TAGS = ("model", "region", "base")

# ---- requests (app/api, app/serving) ----------------------------------------------------------

HTTP_REQUESTS = MetricDef(
    "app_http_requests",
    C,
    "HTTP inference requests answered, by model, serving region, base URL and status code.",
    (*HTTP_TAGS, "status"),
)
HTTP_REQUEST_DURATION = MetricDef(
    "app_http_request_duration_seconds",
    H,
    "Time from a request's arrival to its last byte (a stream's end when stream=true).",
    (*HTTP_TAGS, "stream"),
    REQUEST_SECONDS,
)
STREAM_FIRST_TOKEN = MetricDef(
    "app_stream_first_token_seconds",
    H,
    "Time to first token: from a streaming request's arrival to its first content chunk.",
    HTTP_TAGS,
    FIRST_TOKEN_SECONDS,
)
STREAM_INTER_TOKEN = MetricDef(
    "app_stream_inter_token_seconds",
    H,
    "Inter-token latency: the gap between consecutive chunks of a stream (one token each, "
    "unless the model produced several in one event-loop turn).",
    HTTP_TAGS,
    INTER_TOKEN_SECONDS,
)
PROMPT_TOKENS = MetricDef(
    "app_prompt_tokens",
    C,
    "Tokens in: the prompt tokens of answered requests (usage.prompt_tokens).",
    ("model", "region"),
)
COMPLETION_TOKENS = MetricDef(
    "app_completion_tokens",
    C,
    "Tokens out: the completion tokens of answered requests (usage.completion_tokens).",
    ("model", "region"),
)
REJECTIONS = MetricDef(
    "app_rejections",
    C,
    "Requests turned away before any work: rate_limited (the key's limits) or overloaded.",
    (*HTTP_TAGS, "reason"),
)
BATCH_FILL = MetricDef(
    "app_batch_fill",
    G,
    "Size of a replica's last batch over its max_batch_size (0 to 1).",
    ("model", "region", "replica"),
)
KV_CACHE_UTILIZATION = MetricDef(
    "app_kv_cache_utilization",
    G,
    "Share of a continuous-engine replica's KV cache budget its running batch may fill "
    "(0 to 1; padding included).",
    ("model", "region", "replica"),
)
QUEUE_DEPTH = MetricDef(
    "app_queue_depth",
    G,
    "Requests waiting: in a model's ingress router for a free replica slot (queue=ingress), "
    "or in a replica for the next batch (queue=batch).",
    ("model", "region", "queue", "replica"),
)
SLO_P95 = MetricDef(
    "app_slo_p95_seconds",
    G,
    "A model's p95 latency objective in a region (autoscaling slo_p95_ms), for alerts.",
    ("model", "region"),
)

# ---- routing (app/fleet) and autoscaling: names exported before this catalogue ---------------

ROUTING_TAGS = ("model", "strategy", "region")  # region: the chosen replica's
ROUTING_DECISIONS = MetricDef(
    "fleet_routing_decisions",
    C,
    "Requests routed, by strategy and the chosen replica's region.",
    ROUTING_TAGS,
)
ROUTING_SPILLOVERS = MetricDef(
    "fleet_routing_spillovers",
    C,
    "Requests sent outside the client's nearest region (it was full).",
    ROUTING_TAGS,
)
ROUTING_RETRIES = MetricDef(
    "fleet_routing_retries", C, "Failover attempts routed after a failed try.", ROUTING_TAGS
)
ROUTING_PANICS = MetricDef(
    "fleet_routing_panics",
    C,
    "Decisions made ignoring health because no replica was healthy.",
    ROUTING_TAGS,
)
BREAKER_TRANSITIONS = MetricDef(
    "app_breaker_transitions",
    C,
    "Circuit breaker state changes, to state: a model's replica breakers (peer empty) or a "
    "peer region's (model empty).",
    ("region", "model", "peer", "state"),
)

AUTOSCALING_TAGS = ("model", "region")
AUTOSCALING_DECISIONS = MetricDef(
    "autoscaling_decisions",
    C,
    "Replica target changes, by the rule that made them.",
    (*AUTOSCALING_TAGS, "rule", "direction"),
)
AUTOSCALING_TARGET = MetricDef(
    "autoscaling_target_replicas", G, "Replicas the policy asks for.", AUTOSCALING_TAGS
)
AUTOSCALING_RUNNING = MetricDef(
    "autoscaling_running_replicas",
    G,
    "Replicas running when the policy decided.",
    AUTOSCALING_TAGS,
)
AUTOSCALING_UTILIZATION = MetricDef(
    "autoscaling_utilization",
    G,
    "Requests per replica slot (ongoing + queued) / capacity.",
    AUTOSCALING_TAGS,
)

# ---- cache (app/cache) ------------------------------------------------------------------------

CACHE_EVENTS = MetricDef(
    "app_cache_events",
    C,
    "Cache events (hits, misses, evictions, loads, errors) by tier.",
    ("cache", "tier", "event"),
)

# ---- KV store (app/kv) ------------------------------------------------------------------------

KV_OPERATIONS = MetricDef(
    "app_kv_operations",
    C,
    "KV client operations (get, put, cas, mget, ...) by outcome.",
    ("store", "op", "outcome"),
)
KV_OPERATION_DURATION = MetricDef(
    "app_kv_operation_duration_seconds",
    H,
    "KV client operation latency, retries and failovers included.",
    ("store", "op"),
    KV_SECONDS,
)
KV_REPLICATION_LAG = MetricDef(
    "app_kv_replication_lag_seconds",
    G,
    "How far a KV replica is behind its group's primary (0 on the primary).",
    ("store", "group", "member"),
)

# ---- federation (app/regions) -----------------------------------------------------------------

FEDERATION_FORWARDS = MetricDef(
    "app_federation_forwards",
    C,
    "Requests this region's gateway forwarded to a peer region, by outcome.",
    ("model", "region", "peer", "outcome"),
)
FEDERATION_PEER_AVAILABLE = MetricDef(
    "app_federation_peer_available",
    G,
    "1 while a peer region is in this gateway's rotation (circuit not open), else 0.",
    ("region", "peer"),
)

CATALOGUE: tuple[MetricDef, ...] = (
    HTTP_REQUESTS,
    HTTP_REQUEST_DURATION,
    STREAM_FIRST_TOKEN,
    STREAM_INTER_TOKEN,
    PROMPT_TOKENS,
    COMPLETION_TOKENS,
    REJECTIONS,
    BATCH_FILL,
    KV_CACHE_UTILIZATION,
    QUEUE_DEPTH,
    SLO_P95,
    ROUTING_DECISIONS,
    ROUTING_SPILLOVERS,
    ROUTING_RETRIES,
    ROUTING_PANICS,
    BREAKER_TRANSITIONS,
    AUTOSCALING_DECISIONS,
    AUTOSCALING_TARGET,
    AUTOSCALING_RUNNING,
    AUTOSCALING_UTILIZATION,
    CACHE_EVENTS,
    KV_OPERATIONS,
    KV_OPERATION_DURATION,
    KV_REPLICATION_LAG,
    FEDERATION_FORWARDS,
    FEDERATION_PEER_AVAILABLE,
)


def by_series() -> dict[str, MetricDef]:
    """Each exported series name (`ray_..._total`, `ray_..._bucket`, ...) -> its metric."""
    return {series: d for d in CATALOGUE for series in d.series}
