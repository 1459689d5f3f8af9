"""Fleet spec validation, the GeoIP table, routing hints and performance stats (failover:
test_fleet_failover)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.fleet.geo import GeoLocator, forwarded_client_ip
from app.fleet.hints import InvalidRouteHintError, hints_from, parse_strategy, route_kwarg
from app.fleet.spec import FleetSpecError, Strategy, load_fleet, node_locality
from app.fleet.stats import PerfTracker, percentile

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_shipped_fleet_spec_is_valid() -> None:
    spec = load_fleet(ROOT / "deployments" / "fleet.yaml")
    assert {"us-east-1", "eu-west-1", "ap-southeast-1"} <= set(spec.regions)
    assert {spec.regions[r].cloud for r in spec.regions} >= {"aws", "gcp"}
    assert spec.placement("echo")


def test_a_region_cluster_sees_its_own_share_and_its_peers() -> None:
    spec = load_fleet(ROOT / "deployments" / "fleet.yaml").for_region("eu-west-1")
    echo = spec.placement("echo")
    assert echo is not None and list(echo) == ["eu-west-1"]
    assert (echo["eu-west-1"].min_replicas, echo["eu-west-1"].max_replicas) == (1, 4)
    assert set(spec.peers()) == {"us-east-1", "ap-southeast-1"}
    assert not spec.serves_here("tiny-sd") and spec.serving_regions("tiny-sd") == ["us-east-1"]
    assert spec.serves_here("an-unplaced-model")  # left to its card: every region runs it
    # card < fleet < region: eu-west-1 overrides the fleet's downscale cooldown
    assert spec.autoscaling_config("echo").downscale_cooldown_s == 900
    assert spec.autoscaling_config("echo", {"max_step_up": 3}).max_step_up == 3
    with pytest.raises(FleetSpecError, match="unknown region 'mars'"):
        spec.for_region("mars")


def test_a_count_is_a_fixed_replica_number(tmp_path: Path) -> None:
    spec = load_fleet(
        write(
            tmp_path,
            "regions: {a: {latitude: 0, longitude: 0, models: {m: 3}}}\ndefault_region: a\n",
        )
    )
    placed = spec.placement("m")
    assert placed is not None and (placed["a"].min_replicas, placed["a"].max_replicas) == (3, 3)


def test_no_spec_is_the_embedded_single_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APP_FLEET", raising=False)
    spec = load_fleet()
    assert list(spec.regions) == ["local"] and spec.placement("echo") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("regions: {}\ndefault_region: a\n", "regions"),
        ("regions: {a: {latitude: 0, longitude: 0}}\ndefault_region: b\n", "default_region"),
        (
            "regions: {a: {latitude: 0, longitude: 0}}\ndefault_region: a\nmodels: {m: {z: 1}}\n",
            "moved into each region",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0, models: {m: {min_replicas: 3, max_replicas: 2}}}}\n"
            "default_region: a\n",
            "regions.a.models.m",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0, zones: [a1], node_types: {cpu: {instance_type: x, cpus: 4, zones: [b1]}}}}\n"
            "default_region: a\n",
            "not in zones",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0, endpoint: 'ftp://x'}}\ndefault_region: a\n",
            "not an http(s) URL",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0, endpoint: 'https://x/v1'}}\ndefault_region: a\n",
            "scheme://host[:port] only",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0, cloud: moon}}\ndefault_region: a\n",
            "regions.a.cloud",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0}}\ndefault_region: a\nown_region: b\n",
            "own_region 'b'",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0, autoscaling: {target_utilisation: 0.5}}}\n"
            "default_region: a\n",
            "target_utilisation",
        ),
        ("regions: {a: {latitude: 91, longitude: 0}}\ndefault_region: a\n", "latitude"),
        (
            "regions: {a: {latitude: 0, longitude: 0}}\ndefault_region: a\n"
            "load_balancing: {strategy: fastest}\n",
            "load_balancing.strategy",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0}}\ndefault_region: a\n"
            "load_balancing: {weights: {latency: 0.5, success_rate: 0.5, throughput: 0.5}}\n",
            "sum to 1",
        ),
        (
            "regions: {a: {latitude: 0, longitude: 0}}\ndefault_region: a\n"
            "geoip: {cidr: {'10.0.0.0/33': a}}\n",
            "not a CIDR block",
        ),
        ("regions: [\n", "not valid YAML"),
    ],
)
def test_bad_specs_name_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(FleetSpecError, match=r"fleet\.yaml") as info:
        load_fleet(path)
    assert message in str(info.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(FleetSpecError, match="cannot read"):
        load_fleet(tmp_path / "nope.yaml")


def test_geoip_cidr_most_specific_block_wins_and_header_beats_ip(tmp_path: Path) -> None:
    spec = load_fleet(
        write(
            tmp_path,
            "regions: {a: {latitude: 0, longitude: 0}, b: {latitude: 1, longitude: 1}}\n"
            "default_region: a\n"
            "geoip: {cidr: {'10.0.0.0/8': a, '10.1.0.0/16': b, '2001:db8::/32': b}}\n",
        )
    )
    geo = GeoLocator(spec)
    assert geo.lookup("10.2.3.4") == "a"
    assert geo.lookup("10.1.3.4") == "b"
    assert geo.lookup("2001:db8::1") == "b"
    assert geo.lookup("192.168.0.1") is None
    assert geo.lookup("not an ip") is None
    assert geo.client_region("B ", "10.2.3.4") == "b"
    assert geo.client_region("atlantis", "10.1.0.9") == "b"  # unknown header: fall back to IP
    assert geo.client_region(None, None) is None


def test_forwarded_client_ip() -> None:
    assert forwarded_client_ip("203.0.113.9, 10.0.0.1", "10.0.0.2") == "203.0.113.9"
    assert forwarded_client_ip(None, "10.0.0.2") == "10.0.0.2"
    assert forwarded_client_ip(" ", None) is None


def test_node_locality_accepts_strings_and_lists() -> None:
    labels = {"ray.io/availability-region": ["eu-west-1"], "ray.io/availability-zone": "eu-1a"}
    assert node_locality(labels) == ("eu-west-1", "eu-1a")
    assert node_locality({}) == (None, None)


def test_route_hints_validate_strategy_but_routers_tolerate_junk() -> None:
    assert parse_strategy("Power-Of-Two") is Strategy.POWER_OF_TWO
    with pytest.raises(InvalidRouteHintError, match="least_loaded"):
        route_kwarg(strategy="fastest")
    hints = hints_from({"region": "eu-west-1", "strategy": "bogus", "exclude": ["x"]})
    assert hints.region == "eu-west-1" and hints.strategy is None
    assert hints.exclude == frozenset({"x"})
    assert hints_from("garbage").region is None  # type: ignore[arg-type]


def test_perf_tracker_window_percentiles_and_success_rate() -> None:
    now = [0.0]
    tracker = PerfTracker(window_s=10, alpha=0.5, clock=lambda: now[0])
    for ms in (10, 20, 30, 40):
        now[0] += 1
        tracker.record(ms / 1000)
    tracker.record(1.0, ok=False)
    snap = tracker.snapshot()
    assert snap.p50_ms == 20 and snap.p99_ms == 40 and snap.p95_ms == 40
    assert snap.success_rate == pytest.approx(4 / 5)
    assert snap.latency_ms == pytest.approx(((10 + 20) / 2 + 30) / 2 / 2 + 20)
    now[0] += 20  # everything falls out of the window
    empty = tracker.snapshot()
    assert empty.completed == 0 and empty.success_rate == 1.0 and empty.p99_ms is None
    assert empty.latency_ms is None  # a stale average is not reported


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 75) == 3.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0


def test_cluster_yaml_is_a_valid_launcher_config_with_fleet_labels() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # Ray's own JSON schema for `ray up`
    fleet = load_fleet(ROOT / "deployments" / "fleet.yaml")
    for name, node_type in config["available_node_types"].items():
        region = node_type["labels"]["ray.io/availability-region"]
        zone = node_type["labels"]["ray.io/availability-zone"]
        assert region in fleet.regions, name
        assert zone in fleet.regions[region].zones, name


def test_merging_autoscaling_layers_leaves_every_layer_unchanged() -> None:
    """One region's override must not leak into the fleet's layer (shared by every model)."""
    from app.autoscaling.config import merged

    card = {"predictive": {"buffer": 0.5}}
    fleet = {"predictive": {"enabled": True, "horizon_s": 600}, "max_step_up": 4}
    region = {"predictive": {"enabled": False}}
    assert merged(card, fleet, region).predictive.enabled is False
    assert merged(card, fleet, region).predictive.buffer == 0.5
    assert card == {"predictive": {"buffer": 0.5}}
    assert fleet == {"predictive": {"enabled": True, "horizon_s": 600}, "max_step_up": 4}
    assert merged(card, fleet).predictive.enabled is True


def test_shipped_local_regions_spec_is_two_federated_local_clusters() -> None:
    spec = load_fleet(ROOT / "deployments" / "local-regions.yaml")
    east, west = spec.for_region("east"), spec.for_region("west")
    assert {r.cloud for r in spec.regions.values()} == {"local"}
    assert east.peers()["west"].base_url() == "http://127.0.0.1:23001"
    assert not east.serves_here("tiny-llama") and west.serves_here("tiny-llama")
