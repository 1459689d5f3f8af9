"""The metrics catalogue against what reads it: every metric a Grafana panel or a Prometheus rule
names is exported (in app/observability/metrics.py, or one of Ray's and Prometheus's own on an
explicit allow-list), every label a query filters or groups by exists on that metric, label
values come from the enums that produce them, and promtool accepts the rules and their tests."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cache.stats import Event
from app.observability import metrics as catalogue
from app.observability.metrics import CATALOGUE, MetricDef
from tests.unit.test_observability_promql import grafana_to_promql, parse

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deployments" / "grafana" / "app-dashboard.json"
RULES = ROOT / "deployments" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deployments" / "prometheus" / "alerts.test.yaml"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not on PATH (Debian: apt-get install prometheus)"


@dataclass(frozen=True)
class BuiltIn:
    """A series the service does not define but queries: its labels, and the installed Ray
    source file that defines it (None: Prometheus's own)."""

    labels: frozenset[str]
    source: str | None


# Ray Serve's metrics used by the dashboard and alerts. Serve exports them with these tags
# (replica: RAY_SERVE_CONTROLLER_METRICS_INCLUDE_HIGH_CARDINALITY_TAGS, on by default).
ALLOWED_BUILT_INS = {
    "ray_serve_deployment_replica_healthy": BuiltIn(
        frozenset({"application", "deployment", "replica"}), "serve/_private/deployment_state.py"
    ),
    "ray_serve_deployment_status": BuiltIn(
        frozenset({"application", "deployment"}), "serve/_private/deployment_state.py"
    ),
    "ray_serve_deployment_queued_queries": BuiltIn(
        frozenset({"application", "deployment", "handle", "actor_id"}), "serve/_private/router.py"
    ),
    "up": BuiltIn(frozenset({"job", "instance"}), None),
}

# Label values that come from an enum: a query filtering on another value matches nothing.
KNOWN_VALUES: dict[tuple[str, str], set[str]] = {
    (catalogue.CACHE_EVENTS.name, "event"): {str(e) for e in Event},
    (catalogue.REJECTIONS.name, "reason"): {str(r) for r in catalogue.Reason},
    (catalogue.KV_OPERATIONS.name, "outcome"): {str(o) for o in catalogue.KVOutcome},
    (catalogue.FEDERATION_FORWARDS.name, "outcome"): {str(o) for o in catalogue.ForwardOutcome},
    (catalogue.QUEUE_DEPTH.name, "queue"): {str(q) for q in catalogue.Queue},
    (catalogue.HTTP_REQUEST_DURATION.name, "stream"): {"true", "false"},
}
for _d in (catalogue.HTTP_REQUESTS, catalogue.HTTP_REQUEST_DURATION, catalogue.REJECTIONS):
    KNOWN_VALUES[(_d.name, "base")] = {str(b) for b in catalogue.Base}

# Names exported before the catalogue existed: dashboards outside this repository may use them.
EXPORTED_BEFORE = {
    "ray_fleet_routing_decisions_total": ("model", "strategy", "region"),
    "ray_fleet_routing_spillovers_total": ("model", "strategy", "region"),
    "ray_fleet_routing_retries_total": ("model", "strategy", "region"),
    "ray_fleet_routing_panics_total": ("model", "strategy", "region"),
    "ray_autoscaling_decisions_total": ("model", "region", "rule", "direction"),
    "ray_autoscaling_target_replicas": ("model", "region"),
    "ray_autoscaling_running_replicas": ("model", "region"),
    "ray_autoscaling_utilization": ("model", "region"),
    "ray_app_cache_events_total": ("cache", "tier", "event"),
}


# ---- what the dashboard and the rules query --------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"panel {p['title']!r} {t['refId']}", grafana_to_promql(t["expr"]))
        for p in panels()
        for t in p["targets"]
    ]


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def all_queries() -> list[tuple[str, str]]:
    alerts = [(f"alert {r['alert']}", r["expr"]) for r in rules()]
    return dashboard_queries() + alerts


def labels_of(series: str) -> frozenset[str] | None:
    """The labels a series carries, or None when nothing exports it."""
    definition = catalogue.by_series().get(series)
    if definition is not None:
        extra = {catalogue.BUCKET_LABEL} if series.endswith("_bucket") else set()
        return frozenset(definition.tag_keys) | extra
    built_in = ALLOWED_BUILT_INS.get(series)
    return built_in.labels if built_in else None


def definition_of(series: str) -> MetricDef | None:
    return catalogue.by_series().get(series)


# ---- the catalogue itself --------------------------------------------------------------------


def test_catalogue_names_and_series_are_unique() -> None:
    names = [d.name for d in CATALOGUE]
    assert len(names) == len(set(names))
    series = [s for d in CATALOGUE for s in d.series]
    assert len(series) == len(set(series))
    assert not set(series) & set(ALLOWED_BUILT_INS)


def test_every_metric_defined_in_the_module_is_in_the_catalogue() -> None:
    defined = {v.name for v in vars(catalogue).values() if isinstance(v, MetricDef)}
    assert defined == {d.name for d in CATALOGUE}


def test_names_exported_before_the_catalogue_are_unchanged() -> None:
    for series, tags in EXPORTED_BEFORE.items():
        definition = definition_of(series)
        assert definition is not None, series
        assert definition.tag_keys == tags, series


@pytest.mark.parametrize(
    ("kind", "series"),
    [
        (catalogue.Kind.COUNTER, ("ray_x_total",)),
        (catalogue.Kind.GAUGE, ("ray_x",)),
        (catalogue.Kind.HISTOGRAM, ("ray_x_bucket", "ray_x_sum", "ray_x_count")),
    ],
)
def test_exported_series_follow_rays_naming(kind: catalogue.Kind, series: tuple[str, ...]) -> None:
    bounds = (1.0,) if kind is catalogue.Kind.HISTOGRAM else ()
    assert MetricDef("x", kind, "d", ("a",), bounds).series == series


@pytest.mark.parametrize(
    ("name", "tags", "bounds", "kind"),
    [
        ("bad-name", ("a",), (), catalogue.Kind.COUNTER),
        ("x_total", ("a",), (), catalogue.Kind.COUNTER),  # Prometheus would add _total again
        ("x", ("a", "a"), (), catalogue.Kind.GAUGE),
        ("x", ("le",), (1.0,), catalogue.Kind.HISTOGRAM),  # the bucket label
        ("x", ("__name",), (), catalogue.Kind.GAUGE),
        ("x", ("a",), (), catalogue.Kind.HISTOGRAM),  # Ray refuses a histogram without bounds
        ("x", ("a",), (0.0, 1.0), catalogue.Kind.HISTOGRAM),  # ... and bounds <= 0
        ("x", ("a",), (2.0, 1.0), catalogue.Kind.HISTOGRAM),
        ("x", ("a",), (1.0,), catalogue.Kind.GAUGE),
    ],
)
def test_invalid_definitions_fail_when_defined(
    name: str, tags: tuple[str, ...], bounds: tuple[float, ...], kind: catalogue.Kind
) -> None:
    with pytest.raises(ValueError):
        MetricDef(name, kind, "d", tags, bounds)


# ---- what the dashboard and the rules name ---------------------------------------------------


@pytest.mark.parametrize(("where", "expr"), all_queries(), ids=lambda v: str(v)[:60])
def test_every_queried_metric_is_exported(where: str, expr: str) -> None:
    query = parse(expr)
    assert query.metrics, f"{where}: no metric in {expr!r}"
    for _, series in query.metrics:
        assert labels_of(series) is not None, f"{where}: {series} is not exported"


@pytest.mark.parametrize(("where", "expr"), all_queries(), ids=lambda v: str(v)[:60])
def test_every_filtered_or_grouped_label_exists_on_its_metric(where: str, expr: str) -> None:
    query = parse(expr)
    for series, label, _, _ in query.matchers:
        assert label in (labels_of(series) or ()), f"{where}: {series} has no label {label}"
    for clause, labels, scope in query.clauses:
        assert scope, f"{where}: {clause} applies to no metric"
        carried = [labels_of(s) or frozenset() for s in scope]
        for label in labels:
            if clause in ("by", "on"):  # kept: every metric must have it
                missing = [s for s, have in zip(scope, carried, strict=True) if label not in have]
                assert not missing, f"{where}: {clause} ({label}) but {missing} lack it"
            else:  # dropped or copied: at least one must have it
                assert any(label in have for have in carried), f"{where}: {label} on none"


@pytest.mark.parametrize(("where", "expr"), all_queries(), ids=lambda v: str(v)[:60])
def test_label_values_in_queries_are_values_the_service_records(where: str, expr: str) -> None:
    for series, label, op, value in parse(expr).matchers:
        definition = definition_of(series)
        known = KNOWN_VALUES.get((definition.name, label)) if definition else None
        if known is None or op not in ("=", "=~"):
            continue
        if op == "=~" and not re.fullmatch(r"[\w]+(\|[\w]+)*", value):
            continue  # a real pattern (or a dashboard variable): nothing to enumerate
        for alternative in value.split("|"):
            assert alternative in known, f"{where}: {label}={alternative!r} is never recorded"


def test_every_catalogue_metric_has_a_panel() -> None:
    queried = {name for _, expr in dashboard_queries() for _, name in parse(expr).metrics}
    missing = [d.name for d in CATALOGUE if not set(d.series) & queried]
    assert not missing


def test_allow_listed_ray_metrics_exist_in_the_installed_ray() -> None:
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    ray_dir = Path(spec.origin).parent
    for series, built_in in ALLOWED_BUILT_INS.items():
        if built_in.source is None:
            continue
        text = (ray_dir / built_in.source).read_text()
        assert f'"{series.removeprefix(catalogue.PREFIX)}"' in text, series
        for label in built_in.labels:
            assert f'"{label}"' in text, (series, label)


# ---- the dashboard ---------------------------------------------------------------------------


def test_dashboard_has_a_prometheus_datasource_and_model_and_region_variables() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "region"):
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variables[name]["query"]["query"])
        assert match, name
        series, label = match.groups()
        assert label == name and label in (labels_of(series) or ())


def test_every_panel_queries_through_the_datasource_variable() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_legends_name_labels_their_query_keeps() -> None:
    for panel in panels():
        for target in panel["targets"]:
            query = parse(grafana_to_promql(target["expr"]))
            kept = {
                label for clause, labels, _ in query.clauses if clause == "by" for label in labels
            }
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in kept, f"{panel['title']}: legend {label} is aggregated away"


# ---- the rules -------------------------------------------------------------------------------


def test_rules_have_durations_severities_and_summaries() -> None:
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_cover_the_alerts_the_service_needs() -> None:
    queried = {name for r in rules() for _, name in parse(r["expr"]).metrics}
    for needed in (
        "ray_app_http_requests_total",  # error rate
        "ray_app_slo_p95_seconds",  # p95 over a model's SLO
        "ray_app_kv_replication_lag_seconds",
        "ray_serve_deployment_replica_healthy",  # a replica down
        "ray_app_federation_peer_available",  # a region down
        "ray_autoscaling_utilization",  # sustained saturation
    ):
        assert needed in queried, needed


def test_every_alert_has_a_promtool_test_that_fires_it() -> None:
    suite = yaml.safe_load(RULE_TESTS.read_text())
    assert suite["rule_files"] == [RULES.name]
    fired = {
        case["alertname"]
        for test in suite["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == {r["alert"] for r in rules()}


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    assert PROMTOOL is not None
    for command in (["check", "rules", RULES.name], ["test", "rules", RULE_TESTS.name]):
        done = subprocess.run(
            [PROMTOOL, *command], cwd=RULES.parent, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    records = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
