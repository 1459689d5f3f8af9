"""The peer table (rotation, staleness, ranking of peer regions) and the per-request plan."""

from __future__ import annotations

import random

import pytest

from app.fleet.breaker import BreakerConfig
from app.fleet.spec import LoadBalancing, Strategy
from app.regions.peers import LOCAL, STALE_AFTER_INTERVALS, PeerTable, plan
from app.regions.spec import Federation
from app.regions.summary import ModelLoad, RegionSummary

# Regions on a line, so distances are obvious: |a - b| km.
POSITION = {"home": 0.0, "near": 100.0, "mid": 1_000.0, "far": 10_000.0}
PEERS = ("near", "mid", "far")


def distance_km(a: str, b: str) -> float:
    return abs(POSITION[a] - POSITION[b])


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def table(
    clock: Clock | None = None,
    *,
    failure_threshold: int = 2,
    summary_interval_s: float = 2.0,
    **balancing: object,
) -> PeerTable:
    t = PeerTable(
        Federation(failure_threshold=failure_threshold, summary_interval_s=summary_interval_s),
        LoadBalancing(**balancing),
        distance_km,
        clock=clock or Clock(),
    )
    t._policy.rng = random.Random(3)
    for region in PEERS:
        t.add(region, f"https://{region}.example.com/")
    return t


def load(capacity: int = 8, ongoing: int = 0, **fields: object) -> ModelLoad:
    fields.setdefault("replicas", 2)
    fields.setdefault("healthy", 2)
    return ModelLoad(capacity=capacity, ongoing=ongoing, **fields)  # type: ignore[arg-type]


def summary(region: str, *, drained: bool = False, **models: ModelLoad) -> RegionSummary:
    return RegionSummary(region, drained=drained, models=dict(models), generated_at=1.0)


def report_all(t: PeerTable, **loads: ModelLoad) -> None:
    """Every peer serves model `m` with the given load (idle by default)."""
    for region in PEERS:
        t.record_summary(region, summary(region, m=loads.get(region, load())))


def rank(t: PeerTable, client: str | None = "home", **kwargs: object) -> list[str]:
    kwargs.setdefault("spec_regions", list(PEERS))
    return t.rank("m", client, **kwargs)  # type: ignore[arg-type]


# ---- rotation ---------------------------------------------------------------------------------


def test_add_strips_the_trailing_slash() -> None:
    t = table()
    assert t.peers["near"].base_url == "https://near.example.com"
    assert t.peers["near"].in_rotation
    assert t.peers["near"].summary is None


def test_peer_leaves_rotation_after_threshold_consecutive_failures() -> None:
    t = table(failure_threshold=3)
    report_all(t)
    t.record_failure("near", "connect refused")
    t.record_failure("near", "connect refused")
    assert t.peers["near"].in_rotation
    assert rank(t)[0] == "near"
    t.record_failure("near", "timed out")
    peer = t.peers["near"]
    assert not peer.in_rotation
    assert peer.failures == 3
    assert peer.last_error == "timed out"
    assert rank(t) == ["mid", "far"]


def test_a_good_summary_puts_the_peer_back_in_rotation() -> None:
    t = table(failure_threshold=1)
    report_all(t)
    t.record_failure("near", "boom")
    assert rank(t) == ["mid", "far"]
    t.record_summary("near", summary("near", m=load()))
    peer = t.peers["near"]
    assert (peer.in_rotation, peer.failures, peer.last_error) == (True, 0, None)
    assert rank(t) == ["near", "mid", "far"]


def test_failures_must_be_consecutive() -> None:
    t = table(failure_threshold=2)
    t.record_failure("mid", "x")
    t.record_forward("mid", 50.0)  # a successful forward resets the count
    t.record_failure("mid", "y")
    assert t.peers["mid"].in_rotation
    assert t.peers["mid"].failures == 1
    t.record_failure("mid", "z")
    assert not t.peers["mid"].in_rotation


def test_after_the_cooloff_one_forward_probes_the_peer() -> None:
    clock = Clock()
    t = table(clock, failure_threshold=1)
    report_all(t)
    t.record_failure("near", "refused")
    clock.now += BreakerConfig().cooloff_s - 1
    assert rank(t) == ["mid", "far"]  # the circuit is still open
    clock.now += 1
    assert t.peers["near"].in_rotation and t.status()["near"]["circuit"] == "half_open"
    assert "near" in rank(t)
    assert t.admit("near")  # this forward is the probe
    assert not t.admit("near")  # no second one while it runs
    assert "near" not in rank(t)
    t.record_forward("near", 30.0)  # the probe got through: closed
    assert t.status()["near"]["circuit"] == "closed" and t.admit("near") and t.admit("near")


def test_a_failed_probe_takes_the_peer_out_for_another_cooloff() -> None:
    clock = Clock()
    t = table(clock, failure_threshold=1)
    t.record_failure("near", "refused")
    clock.now += BreakerConfig().cooloff_s
    assert t.admit("near")
    t.record_failure("near", "refused again")
    assert not t.peers["near"].in_rotation and not t.admit("near")


def test_a_probe_without_a_verdict_is_released() -> None:
    clock = Clock()
    t = table(clock, failure_threshold=1)
    t.record_failure("near", "refused")
    clock.now += BreakerConfig().cooloff_s
    assert t.admit("near")
    t.release("near")  # the peer was busy: nothing learnt, the next request may probe
    assert t.admit("near")


def test_forward_latency_is_a_moving_average() -> None:
    t = table()
    t.record_forward("far", 100.0)
    assert t.peers["far"].forward_latency_ms == 100.0
    t.record_forward("far", 200.0)
    assert t.peers["far"].forward_latency_ms == pytest.approx(120.0)  # 100 + 0.2 * 100


# ---- staleness --------------------------------------------------------------------------------


def test_summary_goes_stale_after_three_pull_periods() -> None:
    assert STALE_AFTER_INTERVALS == 3
    clock = Clock(500.0)
    t = table(clock, summary_interval_s=2.0)
    s = summary("near", m=load())
    t.record_summary("near", s)
    peer = t.peers["near"]
    assert peer.fetched_at == 500.0
    clock.now = 506.0  # exactly 3 x 2 s: still fresh
    assert t.fresh_summary(peer) is s
    clock.now = 506.01
    assert t.fresh_summary(peer) is None
    assert t.fresh_summary(t.peers["mid"]) is None  # never pulled


def test_a_stale_summary_falls_back_to_the_spec() -> None:
    clock = Clock()
    t = table(clock, summary_interval_s=1.0)
    # The summary says drained, but it is too old to say anything.
    t.record_summary("near", summary("near", drained=True, m=load()))
    assert rank(t, spec_regions=["near"]) == []
    clock.now += 3.5
    assert rank(t, spec_regions=["near"]) == ["near"]
    assert rank(t, spec_regions=["mid"]) == ["mid"]  # stale and not in the spec: left out


def test_status_reports_every_peer() -> None:
    clock = Clock(100.0)
    t = table(clock)
    s = summary("near", m=load())
    t.record_summary("near", s)
    t.record_forward("near", 42.0)
    t.record_failure("far", "refused")
    clock.now = 101.5
    status = t.status()
    assert set(status) == set(PEERS)
    assert status["near"] == {
        "endpoint": "https://near.example.com",
        "in_rotation": True,
        "circuit": "closed",
        "failures": 0,
        "last_error": None,
        "summary_age_s": 1.5,
        "forward_latency_ms": 42.0,
        "summary": s.to_json(),
    }
    assert status["far"]["failures"] == 1
    assert status["far"]["last_error"] == "refused"
    assert status["far"]["summary_age_s"] is None
    assert status["far"]["summary"] is None


# ---- rank -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [Strategy.COMPOSITE, Strategy.GEO])
def test_nearest_region_to_the_client_first(strategy: Strategy) -> None:
    t = table(strategy=strategy)
    report_all(t)
    assert rank(t, "home") == ["near", "mid", "far"]
    assert rank(t, "far") == ["far", "mid", "near"]
    assert rank(t, "mid") == ["mid", "near", "far"]


def test_drained_peers_are_excluded() -> None:
    t = table()
    report_all(t)
    t.record_summary("near", summary("near", drained=True, m=load()))
    assert rank(t) == ["mid", "far"]


@pytest.mark.parametrize(
    "models",
    [
        {"m": load(healthy=0)},  # every replica unhealthy
        {"m": load(capacity=0)},
    ],
    ids=["no-healthy", "no-capacity"],
)
def test_peers_that_cannot_serve_the_model_are_excluded(models: dict[str, ModelLoad]) -> None:
    t = table()
    report_all(t)
    t.record_summary("mid", RegionSummary("mid", models=models))
    # A fresh summary that reports the model unservable wins over the spec.
    assert rank(t) == ["near", "far"]


@pytest.mark.parametrize("models", [{}, {"other": load()}], ids=["no-models", "other-model"])
def test_a_peer_whose_summary_does_not_list_the_model_yet_is_tried_last(
    models: dict[str, ModelLoad],
) -> None:
    """Its replicas may not have reported yet; the spec says it serves the model, so it is a
    last resort, after every peer known to have room."""
    t = table()
    report_all(t)
    t.record_summary("mid", RegionSummary("mid", models=models))
    assert rank(t) == ["near", "far", "mid"]
    assert rank(t, spec_regions=["near", "far"]) == ["near", "far"]


def test_saturated_peers_rank_last() -> None:
    t = table()
    report_all(t, near=load(capacity=8, ongoing=8), mid=load(capacity=8, ongoing=3))
    assert rank(t) == ["mid", "far", "near"]


def test_saturation_follows_the_spillover_threshold() -> None:
    t = table(spillover_utilization=0.5)
    report_all(t, near=load(capacity=10, ongoing=5), mid=load(capacity=10, ongoing=9))
    # Both are at or over 50%: the idle far region first, then the saturated by utilization.
    assert rank(t) == ["far", "near", "mid"]
    report_all(t, near=load(capacity=10, ongoing=4))
    assert rank(t) == ["near", "mid", "far"]


def test_every_peer_saturated_still_ranks_them_least_busy_first() -> None:
    t = table()
    report_all(
        t,
        near=load(capacity=4, ongoing=6),
        mid=load(capacity=4, ongoing=4),
        far=load(capacity=4, ongoing=5),
    )
    assert rank(t) == ["mid", "far", "near"]


def test_least_loaded_strategy_ignores_distance() -> None:
    t = table(strategy=Strategy.LEAST_LOADED)
    report_all(
        t,
        near=load(capacity=10, ongoing=7),
        mid=load(capacity=10, ongoing=2),
        far=load(capacity=10, ongoing=0),
    )
    assert rank(t) == ["far", "mid", "near"]


def test_exclude_skips_regions_already_tried() -> None:
    t = table()
    report_all(t)
    assert rank(t, exclude=frozenset({"near"})) == ["mid", "far"]
    assert rank(t, exclude=frozenset(PEERS)) == []


def test_peers_without_a_summary_only_when_the_spec_says_they_serve_the_model() -> None:
    t = table()
    assert rank(t, spec_regions=[]) == []
    assert rank(t, spec_regions=["mid", "home"]) == ["mid"]
    # A known peer that serves the model does not need the spec, and it goes before the
    # nearer peer whose load is unknown.
    t.record_summary("far", summary("far", m=load()))
    assert rank(t, spec_regions=["mid"]) == ["far", "mid"]


def test_unknown_peers_rank_after_known_farther_ones_that_are_idle_too() -> None:
    # The unknown peer is the farthest: after the known ones either way.
    t = table()
    t.record_summary("near", summary("near", m=load()))
    t.record_summary("mid", summary("mid", m=load()))
    assert rank(t) == ["near", "mid", "far"]


def test_an_unknown_nearer_peer_ranks_after_known_idle_ones() -> None:
    t = table()
    t.record_summary("mid", summary("mid", m=load()))
    t.record_summary("far", summary("far", m=load()))
    assert rank(t) == ["mid", "far", "near"]


def test_forward_latency_feeds_the_performance_strategy() -> None:
    t = table(strategy=Strategy.PERFORMANCE)
    report_all(
        t,
        near=load(latency_ms=100.0),
        mid=load(latency_ms=100.0),
        far=load(latency_ms=100.0),
    )
    for _ in range(5):
        t.record_forward("near", 5_000.0)
        t.record_forward("mid", 5_000.0)
    assert rank(t)[0] == "far"


def test_a_client_region_the_distance_table_does_not_know_is_served_anyway() -> None:
    t = table()
    report_all(t)
    # An unknown region is at infinite distance from every peer; each peer is still ranked.
    assert sorted(rank(t, "mars")) == sorted(PEERS)
    assert sorted(rank(t, None)) == sorted(PEERS)


# ---- plan -------------------------------------------------------------------------------------

IDLE = load(capacity=10, ongoing=2)


def decide(**overrides: object) -> list[str]:
    args: dict[str, object] = {
        "local": IDLE,
        "served_here": True,
        "drained": False,
        "inflight": 0,
        "spillover_utilization": 1.0,
        "forwarded": False,
        "peers": ["p1", "p2"],
    }
    return plan(**(args | overrides))  # type: ignore[arg-type]


def test_local_first_when_it_can_serve() -> None:
    assert decide() == [LOCAL, "p1", "p2"]
    assert decide(peers=[]) == [LOCAL]


@pytest.mark.parametrize(
    ("served_here", "drained", "local", "expected"),
    [
        (True, False, IDLE, [LOCAL]),
        (True, False, load(capacity=10, ongoing=10), [LOCAL]),  # saturated: still here
        (True, False, load(healthy=0), [LOCAL]),
        (True, False, None, [LOCAL]),
        (True, True, IDLE, []),  # drained: nowhere
        (False, False, None, []),  # not served here: nowhere
        (False, True, None, []),
    ],
)
def test_a_forwarded_request_is_served_here_or_nowhere(
    served_here: bool, drained: bool, local: ModelLoad | None, expected: list[str]
) -> None:
    # Peers are never in the plan of a forwarded request: no loops, no ping-pong.
    got = decide(forwarded=True, served_here=served_here, drained=drained, local=local)
    assert got == expected


def test_a_drained_region_sends_to_peers_only() -> None:
    assert decide(drained=True) == ["p1", "p2"]
    assert decide(drained=True, local=None) == ["p1", "p2"]
    assert decide(drained=True, peers=[]) == []


def test_a_model_not_served_here_goes_to_peers_only() -> None:
    assert decide(served_here=False) == ["p1", "p2"]
    assert decide(served_here=False, local=None, peers=[]) == []


def test_local_not_reported_yet_is_tried_first() -> None:
    assert decide(local=None) == [LOCAL, "p1", "p2"]


def test_saturated_by_summary_puts_peers_first_and_local_last() -> None:
    assert decide(local=load(capacity=10, ongoing=10)) == ["p1", "p2", LOCAL]
    assert decide(local=load(capacity=10, ongoing=9)) == [LOCAL, "p1", "p2"]


def test_saturated_by_gateway_inflight_puts_peers_first() -> None:
    # The summary lags; the gateway's own count of in-flight requests is fresher.
    assert decide(local=load(capacity=10, ongoing=0), inflight=10) == ["p1", "p2", LOCAL]
    assert decide(local=load(capacity=10, ongoing=0), inflight=9) == [LOCAL, "p1", "p2"]


def test_spillover_threshold_sets_when_local_counts_as_saturated() -> None:
    local = load(capacity=10, ongoing=8)
    assert decide(local=local, spillover_utilization=0.8) == ["p1", "p2", LOCAL]
    assert decide(local=local, spillover_utilization=0.9) == [LOCAL, "p1", "p2"]
    assert decide(local=load(capacity=10), inflight=8, spillover_utilization=0.8)[-1] == LOCAL


@pytest.mark.parametrize(
    "local",
    [load(healthy=0), load(capacity=0), ModelLoad()],
    ids=["no-healthy", "no-capacity", "nothing"],
)
def test_unhealthy_local_puts_peers_first_and_keeps_local_as_last_resort(
    local: ModelLoad,
) -> None:
    assert decide(local=local) == ["p1", "p2", LOCAL]
    assert decide(local=local, peers=[]) == [LOCAL]


def test_plan_does_not_alias_the_peer_list() -> None:
    peers = ["p1"]
    decide(drained=True, peers=peers).append("x")
    assert peers == ["p1"]
