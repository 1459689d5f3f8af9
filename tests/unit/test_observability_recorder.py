"""The recorder and the modules that export through the catalogue, against the real
ray.util.metrics classes with Ray's native (Cython) instruments replaced: Ray's own Python code
checks names, tag keys, boundaries and that every record names every tag key, and no Ray
starts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.util import metrics as ray_metrics

from app.autoscaling.metrics import AutoscalingMetrics
from app.autoscaling.signals import Signals
from app.autoscaling.state import Decision as ScalingDecision
from app.cache.stats import CacheStats, Event, MetricsExporter
from app.fleet.metrics import RoutingMetrics
from app.fleet.scoring import Decision, ReplicaView
from app.fleet.spec import Strategy
from app.observability import metrics as catalogue
from app.observability.metrics import CATALOGUE, Base, ForwardOutcome, KVOutcome, Queue, Reason
from app.observability.recorder import METRICS_ENV, Recorder, Sampler, create
from app.runtime import replica_env
from app.serving.engines import EngineStats


@dataclass
class Native:
    """Stands in for ray._raylet's Count, Sum, Gauge and Histogram: keeps what it was given."""

    name: str
    description: str
    args: tuple[Any, ...]
    records: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def record(self, value: float, tags: dict[str, str]) -> None:
        self.records.append((value, dict(tags)))


@pytest.fixture
def natives(monkeypatch: pytest.MonkeyPatch) -> dict[str, Native]:
    made: dict[str, Native] = {}

    def native(name: str, description: str, *args: Any) -> Native:
        made[name] = Native(name, description, args)
        return made[name]

    for cls in ("CythonCount", "CythonSum", "CythonGauge", "CythonHistogram"):
        monkeypatch.setattr(ray_metrics, cls, native)
    return made


def recorder() -> Recorder:
    return Recorder(enabled=lambda: True, sampler=Sampler(autostart=False))


@pytest.mark.parametrize("definition", CATALOGUE, ids=lambda d: d.name)
def test_definitions_make_ray_metrics_with_their_arguments(
    natives: dict[str, Native], definition: catalogue.MetricDef
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray only warns (and discards) for an invalid name
        metric = create(definition)
    assert metric.info["name"] == definition.name
    assert metric.info["description"] == definition.description
    assert metric.info["tag_keys"] == definition.tag_keys
    expected = {
        catalogue.Kind.COUNTER: ray_metrics.Counter,
        catalogue.Kind.GAUGE: ray_metrics.Gauge,
        catalogue.Kind.HISTOGRAM: ray_metrics.Histogram,
    }[definition.kind]
    assert type(metric) is expected
    native = natives[definition.name]
    if definition.kind is catalogue.Kind.HISTOGRAM:
        assert native.args == (list(definition.boundaries), definition.tag_keys)
    else:
        assert native.args == (definition.tag_keys,)


def test_every_helper_records_every_tag_key(natives: dict[str, Native]) -> None:
    rec = recorder()
    rec.observe_request("echo", "east", Base.MODEL, 200, 0.12, stream=False)
    rec.observe_first_token("echo", "east", Base.GATEWAY, 0.05)
    rec.observe_inter_token("echo", "east", Base.GATEWAY, 0.01)
    rec.count_tokens("echo", "east", prompt=12, completion=30)
    rec.reject("echo", "east", Base.MODEL, Reason.OVERLOADED)
    rec.set_batch_fill("echo", "east", "r1", 0.5)
    rec.breaker_transition("east", "open", peer="west")
    rec.observe_kv("kv", "get", KVOutcome.OK, 0.001)
    rec.count_forward("tiny", "east", "west", ForwardOutcome.BUSY)
    stops = [
        rec.sample_queue_depth("echo", "east", Queue.BATCH, "r1", lambda: 3),
        rec.sample_engine("tiny", "east", "r2", lambda: EngineStats("continuous", 2, 4, 0.5, 100)),
        rec.sample_slo("echo", "east", lambda: 0.5),
        rec.sample_replication_lag("kv", 0, "g0-r1", lambda: 12.5),
        rec.sample_peer_available("east", "west", lambda: False),
    ]
    rec.sampler.sample_once()
    for definition in CATALOGUE:
        if definition.name.startswith(("fleet_", "autoscaling_", "app_cache_")):
            continue  # their own modules record them (tested below)
        records = natives[definition.name].records
        assert records, f"no helper records {definition.name}"
        for _, tags in records:
            assert tuple(sorted(tags)) == tuple(sorted(definition.tag_keys)), definition.name
    assert natives["app_http_requests"].records == [
        (1.0, {"model": "echo", "region": "east", "base": "model", "status": "200"})
    ]
    assert natives["app_http_request_duration_seconds"].records[0][1]["stream"] == "false"
    assert natives["app_kv_replication_lag_seconds"].records == [
        (12.5, {"store": "kv", "group": "0", "member": "g0-r1"})
    ]
    assert natives["app_federation_peer_available"].records[0][0] == 0.0
    assert natives["app_kv_cache_utilization"].records == [
        (0.5, {"model": "tiny", "region": "east", "replica": "r2"})
    ]
    assert sorted(value for value, _ in natives["app_queue_depth"].records) == [2.0, 3.0]
    for stop in stops:
        stop()
    rec.sampler.sample_once()
    assert len(natives["app_queue_depth"].records) == 2


def test_a_failing_sample_is_dropped_and_the_others_go_on(natives: dict[str, Native]) -> None:
    rec = recorder()
    rec.sample_slo("echo", "east", lambda: 1 / 0)
    rec.sample_slo("tiny", "east", lambda: 2.0)
    rec.sampler.sample_once()
    rec.sampler.sample_once()
    assert [tags["model"] for _, tags in natives["app_slo_p95_seconds"].records] == ["tiny"] * 2


def test_zero_tokens_are_not_recorded(natives: dict[str, Native]) -> None:
    recorder().count_tokens("all-minilm-l6-v2", "east", prompt=8, completion=0)  # embeddings
    assert natives["app_prompt_tokens"].records == [
        (8.0, {"model": "all-minilm-l6-v2", "region": "east"})
    ]
    assert natives["app_completion_tokens"].records == []


def test_without_ray_the_recorder_makes_nothing_and_records_nothing() -> None:
    made: list[str] = []

    def factory(definition: catalogue.MetricDef) -> Any:
        made.append(definition.name)
        raise AssertionError("no metric may be created without Ray")

    rec = Recorder(enabled=lambda: False, factory=factory, sampler=Sampler(autostart=False))
    rec.observe_request("echo", "east", Base.MODEL, 200, 0.1, stream=True)
    rec.sample_slo("echo", "east", lambda: 1.0)()
    rec.sampler.sample_once()
    assert made == []


def test_a_metric_that_cannot_be_made_never_fails_the_caller() -> None:
    def factory(definition: catalogue.MetricDef) -> Any:
        raise RuntimeError("no metrics agent")

    rec = Recorder(enabled=lambda: True, factory=factory, sampler=Sampler(autostart=False))
    rec.observe_request("echo", "east", Base.GATEWAY, 503, 0.1, stream=False)
    rec.count_forward("echo", "east", "west", ForwardOutcome.UNREACHABLE)


def test_app_metrics_off_records_nothing_until_it_is_on_again(
    monkeypatch: pytest.MonkeyPatch, connected: dict[str, Native]
) -> None:
    rec = Recorder(sampler=Sampler(autostart=False))  # the default check: Ray and APP_METRICS
    monkeypatch.setenv(METRICS_ENV, "off")
    rec.observe_request("echo", "east", Base.MODEL, 200, 0.1, stream=False)
    assert "app_http_requests" not in connected
    monkeypatch.setenv(METRICS_ENV, "on")
    rec.observe_request("echo", "east", Base.MODEL, 200, 0.1, stream=False)
    assert len(connected["app_http_requests"].records) == 1


def test_the_metrics_switch_reaches_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(METRICS_ENV, "off")
    assert replica_env()[METRICS_ENV] == "off"


# ---- the modules that exported before the catalogue: same names, same tags ------------------


@pytest.fixture
def connected(monkeypatch: pytest.MonkeyPatch, natives: dict[str, Native]) -> dict[str, Native]:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    return natives


def test_routing_metrics_keep_their_names_and_tags(connected: dict[str, Native]) -> None:
    chosen = ReplicaView("r1", "eu-west-1")
    RoutingMetrics("echo").decision(
        Decision([chosen], Strategy.GEO, "us-east-1", spilled=True), retry=True
    )
    tags = {"model": "echo", "strategy": "geo", "region": "eu-west-1"}
    for name in ("decisions", "spillovers", "retries"):
        assert connected[f"fleet_routing_{name}"].records == [(1, tags)]
    assert connected["fleet_routing_panics"].records == []


def test_autoscaling_metrics_keep_their_names_and_tags(connected: dict[str, Native]) -> None:
    decision = ScalingDecision(3, 2, "load_up", "busy", at_s=0.0)
    signals = Signals(0.0, running_replicas=2, total_requests=6, queued_requests=0,
                      max_ongoing_requests=4)  # fmt: skip
    AutoscalingMetrics("echo", "east").observe(decision, signals)
    tags = {"model": "echo", "region": "east"}
    assert connected["autoscaling_target_replicas"].records == [(3, tags)]
    assert connected["autoscaling_running_replicas"].records == [(2, tags)]
    assert connected["autoscaling_utilization"].records == [(0.75, tags)]
    assert connected["autoscaling_decisions"].records == [
        (1, tags | {"rule": "load_up", "direction": "up"})
    ]


def test_cache_events_keep_their_name_and_tags(connected: dict[str, Native]) -> None:
    stats = CacheStats()
    stats.add("l1", Event.HIT, 3)
    stats.add("redis", Event.ERROR)
    assert MetricsExporter("responses").flush(stats) == 2
    assert sorted(connected["app_cache_events"].records, key=lambda r: r[1]["tier"]) == [
        (3, {"cache": "responses", "tier": "l1", "event": "hit"}),
        (1, {"cache": "responses", "tier": "redis", "event": "error"}),
    ]
