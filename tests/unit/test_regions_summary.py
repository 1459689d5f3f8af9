"""A region's summary for its peers: aggregation of replica rows, the JSON round trip, bad input."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.regions import summary as summary_module
from app.regions.summary import ModelLoad, RegionSummary, summarize


def row(model: str = "m", **fields: Any) -> dict[str, Any]:
    """One replica row as the router actor's fleet view has it."""
    base: dict[str, Any] = {
        "model": model,
        "healthy": True,
        "drained": False,
        "weight": 1.0,
        "capacity": 4,
        "ongoing": 1,
        "performance": {"latency_ms": 100.0, "success_rate": 1.0},
    }
    return base | fields


# ---- ModelLoad --------------------------------------------------------------------------------


def test_model_load_utilization_and_serviceable() -> None:
    assert ModelLoad(replicas=2, healthy=2, capacity=8, ongoing=2).utilization == 0.25
    # No capacity reads as full: nothing can be sent there.
    assert ModelLoad(replicas=1, healthy=0, capacity=0, ongoing=0).utilization == 1.0
    assert ModelLoad(replicas=1, healthy=1, capacity=4).serviceable()
    assert not ModelLoad(replicas=1, healthy=0, capacity=4).serviceable()
    assert not ModelLoad(replicas=1, healthy=1, capacity=0).serviceable()
    assert not ModelLoad().serviceable()


# ---- summarize --------------------------------------------------------------------------------


def test_summarize_groups_rows_by_model_and_sums_healthy_replicas() -> None:
    rows = [
        row("a", capacity=4, ongoing=1, performance={"latency_ms": 100.0, "success_rate": 0.9}),
        row("a", capacity=8, ongoing=3, performance={"latency_ms": 300.0, "success_rate": 0.99}),
        row("b", capacity=2, ongoing=2, performance={"latency_ms": 50.0}),
    ]
    s = summarize("us-east-1", rows, drained=False, now=1234.5)
    assert s.region == "us-east-1"
    assert not s.drained
    assert s.generated_at == 1234.5
    assert set(s.models) == {"a", "b"}
    assert s.models["a"] == ModelLoad(
        replicas=2, healthy=2, capacity=12, ongoing=4, latency_ms=200.0, success_rate=0.9
    )
    assert s.models["b"] == ModelLoad(
        replicas=1, healthy=1, capacity=2, ongoing=2, latency_ms=50.0, success_rate=1.0
    )
    assert s.load_of("a") is s.models["a"]
    assert s.load_of("missing") is None


@pytest.mark.parametrize(
    "excluded",
    [
        {"healthy": False},
        {"drained": True},  # on a drained node
        {"weight": 0.0},  # weighted out by the operator
    ],
    ids=["unhealthy", "drained-node", "weighted-out"],
)
def test_replicas_not_serving_count_as_present_but_not_healthy(excluded: dict[str, Any]) -> None:
    rows = [
        row(capacity=4, ongoing=1, performance={"latency_ms": 100.0, "success_rate": 1.0}),
        row(capacity=16, ongoing=9, performance={"latency_ms": 900.0, "success_rate": 0.1})
        | excluded,
    ]
    load = summarize("r", rows, drained=False, now=0.0).models["m"]
    # Its capacity, load, latency and success rate are left out; it still counts as a replica.
    assert load == ModelLoad(
        replicas=2, healthy=1, capacity=4, ongoing=1, latency_ms=100.0, success_rate=1.0
    )


def test_a_model_with_no_serving_replica_is_not_serviceable() -> None:
    rows = [row(healthy=False), row(drained=True)]
    load = summarize("r", rows, drained=False, now=0.0).models["m"]
    assert load == ModelLoad(
        replicas=2, healthy=0, capacity=0, ongoing=0, latency_ms=None, success_rate=1.0
    )
    assert not load.serviceable()


def test_missing_figures_default_sensibly() -> None:
    rows = [
        {"model": "m", "healthy": True, "capacity": 4, "ongoing": None},  # not probed yet
        row(capacity=4, ongoing=2, performance={"latency_ms": None}),
        row(capacity=4, ongoing=1, performance={"latency_ms": 40.0, "success_rate": 0.5}),
    ]
    load = summarize("r", rows, drained=False, now=0.0).models["m"]
    assert load.healthy == 3
    assert load.capacity == 12
    assert load.ongoing == 3  # None counts as 0
    assert load.latency_ms == 40.0  # only replicas with a latency sample are averaged
    assert load.success_rate == 0.5  # the worst replica's


def test_summarize_carries_drained_and_handles_an_empty_region() -> None:
    s = summarize("eu-west-1", [], drained=True, now=5.0)
    assert s == RegionSummary("eu-west-1", drained=True, models={}, generated_at=5.0)


def test_summarize_stamps_the_wall_clock_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summary_module.time, "time", lambda: 4242.0)
    assert summarize("r", [row()], drained=False).generated_at == 4242.0


# ---- JSON -------------------------------------------------------------------------------------


SAMPLE = RegionSummary(
    region="ap-southeast-1",
    drained=True,
    models={
        "llama": ModelLoad(
            replicas=3, healthy=2, capacity=16, ongoing=5, latency_ms=87.5, success_rate=0.97
        ),
        "tiny": ModelLoad(replicas=1, healthy=0, capacity=0, ongoing=0, latency_ms=None),
    },
    generated_at=1700000000.25,
)


def test_to_json_has_the_wire_shape() -> None:
    assert SAMPLE.to_json() == {
        "region": "ap-southeast-1",
        "drained": True,
        "generated_at": 1700000000.25,
        "models": {
            "llama": {
                "replicas": 3,
                "healthy": 2,
                "capacity": 16,
                "ongoing": 5,
                "latency_ms": 87.5,
                "success_rate": 0.97,
            },
            "tiny": {
                "replicas": 1,
                "healthy": 0,
                "capacity": 0,
                "ongoing": 0,
                "latency_ms": None,
                "success_rate": 1.0,
            },
        },
    }


def test_json_round_trip_through_bytes() -> None:
    wire = orjson.dumps(SAMPLE.to_json())
    assert RegionSummary.from_json(orjson.loads(wire)) == SAMPLE
    empty = RegionSummary("r")
    assert RegionSummary.from_json(empty.to_json()) == empty


def test_from_json_defaults_optional_fields() -> None:
    parsed = RegionSummary.from_json(
        {
            "region": "r",
            "drained": False,
            "models": {"m": {"replicas": 1, "healthy": 1, "capacity": 2, "ongoing": 0}},
        }
    )
    assert parsed.generated_at == 0.0
    assert parsed.models["m"] == ModelLoad(1, 1, 2, 0, latency_ms=None, success_rate=1.0)


GOOD_MODEL = {"replicas": 1, "healthy": 1, "capacity": 2, "ongoing": 0}


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "a summary",
        42,
        {},
        {"drained": False, "models": {}},  # no region
        {"region": "r", "models": {}},  # no drained
        {"region": "r", "drained": False},  # no models
        {"region": "r", "drained": False, "models": None},
        {"region": "r", "drained": False, "models": [1, 2]},
        {"region": "r", "drained": False, "models": "abc"},
        {"region": "r", "drained": False, "models": {"m": None}},
        {"region": "r", "drained": False, "models": {"m": [1, 2, 3, 4]}},
        {"region": "r", "drained": False, "models": {"m": {"replicas": 1}}},
        {"region": "r", "drained": False, "models": {"m": GOOD_MODEL | {"capacity": "lots"}}},
        {"region": "r", "drained": False, "models": {"m": GOOD_MODEL | {"ongoing": None}}},
        {"region": "r", "drained": False, "models": {"m": GOOD_MODEL | {"latency_ms": "fast"}}},
        {"region": "r", "drained": False, "models": {"m": GOOD_MODEL | {"success_rate": [1]}}},
        {"region": "r", "drained": False, "models": {}, "generated_at": "yesterday"},
    ],
)
def test_malformed_summaries_raise_value_error(data: Any) -> None:
    with pytest.raises(ValueError, match="malformed region summary"):
        RegionSummary.from_json(data)
