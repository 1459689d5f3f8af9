"""The KV-backed autoscaling store: rate history, decision ring, status, fallback to memory."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from app.autoscaling.cli import format_summaries
from app.autoscaling.history import RateHistory
from app.autoscaling.store import (
    AutoscaleStore,
    log_key,
    rate_key,
    read_log,
    read_summaries,
    status_key,
)
from app.kv import (
    ClusterNotFoundError,
    KVClient,
    KVUnavailableError,
    ReadConcern,
    ScanPage,
    WriteConcern,
)

NOW = 1_000_000 * 60.0  # minute 1,000,000


class FakeKV(KVClient):
    """The KVClient methods the store uses, over a dict (values pickled, as the real client
    does); `down` makes every call fail, `gate` holds writes until it is set."""

    def __init__(self) -> None:  # no coordinator: nothing here talks to Ray
        self.data: dict[str, Any] = {}
        self.ttls: dict[str, float | None] = {}
        self.down = False
        self.gate: threading.Event | None = None
        self.writes = 0

    def _check(self) -> None:
        if self.down:
            raise KVUnavailableError("no primary for the slot")

    def get(
        self,
        key: str,
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> Any:
        self._check()
        return pickle.loads(self.data[key]) if key in self.data else default

    def mget(
        self,
        keys: Iterable[str],
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> list[Any]:
        return [self.get(key, default) for key in keys]

    def mset(
        self,
        mapping: Mapping[str, Any],
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        self._check()
        self.writes += 1
        for key, value in mapping.items():
            self.data[key] = pickle.dumps(value)
            self.ttls[key] = ttl

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage:
        self._check()
        keys = sorted(
            k for k in self.data if k.startswith(prefix) and (cursor is None or k > cursor)
        )
        page = keys[:page_size]
        more = len(keys) > page_size
        return ScanPage([(k, pickle.loads(self.data[k])) for k in page], page[-1] if more else None)


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_store(kv: FakeKV, clock: Clock | None = None, **kwargs: Any) -> AutoscaleStore:
    return AutoscaleStore(lambda: kv, clock=clock or Clock(), background=False, **kwargs)


def test_rate_history_contract_over_the_kv_store() -> None:
    kv = FakeKV()
    history: RateHistory = make_store(kv)
    history.append("m", "eu", 1_000_001, 7)
    history.append("m", "eu", 1_000_000, 5)
    history.append("m", "us", 1_000_000, 9)
    history.append("m", "eu", 1_000_001, 8)  # a minute again replaces its count
    assert history.load("m", "eu", since=0) == [(1_000_000, 5), (1_000_001, 8)]
    assert history.load("m", "eu", since=1_000_001) == [(1_000_001, 8)]
    assert history.load("m", "us", since=0) == [(1_000_000, 9)]
    assert history.load("m", "ap", since=0) == []
    # One key per model, region and hour, expiring after the retention.
    hour = 1_000_000 // 60
    assert pickle.loads(kv.data[rate_key("m", "eu", hour)]) == {1_000_000: 5, 1_000_001: 8}
    assert kv.ttls[rate_key("m", "eu", hour)] == 8 * 1440 * 60


def test_retention_drops_the_oldest_minutes() -> None:
    store = make_store(FakeKV(), retention_minutes=3)
    for minute in range(10):
        store.append("m", "eu", minute, minute)
    assert store.load("m", "eu", since=0) == [(7, 7), (8, 8), (9, 9)]


def test_history_decisions_and_status_survive_a_restart() -> None:
    kv, clock = FakeKV(), Clock()
    before = make_store(kv, clock)
    for minute in range(999_990, 1_000_000):
        before.append("m", "eu", minute, minute % 7)
    before.record("m", "eu", {"rule": "panic", "at_s": NOW})
    before.set_status("m", "eu", {"model": "m", "region": "eu", "replica_start_s": 12.5})

    after = make_store(kv, clock)  # a new controller process
    assert after.load("m", "eu", since=0) == before.load("m", "eu", since=0)
    assert [e["rule"] for e in after.recent("m", "eu", 10)] == ["panic"]
    assert after.status("m", "eu") == {"model": "m", "region": "eu", "replica_start_s": 12.5}
    assert after.loaded("m", "eu") and after.backend == "kv"


def test_decision_log_is_a_bounded_ring() -> None:
    kv = FakeKV()
    store = make_store(kv, log_size=5)
    for i in range(12):
        store.record("m", "eu", {"i": i})
    log_keys = [k for k in kv.data if k.startswith("autoscale:log:m:eu:")]
    assert len(log_keys) == 6  # five slots and the head
    assert pickle.loads(kv.data[log_key("m", "eu", "head")]) == {"seq": 11, "size": 5}
    assert [e["i"] for e in read_log(kv, "m", "eu", 3)] == [9, 10, 11]
    assert [e["i"] for e in read_log(kv, "m", "eu", 50)] == [7, 8, 9, 10, 11]
    assert [e["i"] for e in store.recent("m", "eu", 50)] == [7, 8, 9, 10, 11]
    # A restarted store goes on numbering after the stored head.
    again = make_store(kv, log_size=5)
    again.record("m", "eu", {"i": 12})
    assert [e["seq"] for e in read_log(kv, "m", "eu", 2)] == [11, 12]


def test_without_a_kv_store_it_keeps_memory_and_writes_through_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kv, clock = FakeKV(), Clock()
    make_store(kv, clock).append("m", "eu", 999_000, 3)  # an earlier controller's minute
    available = False

    def connect() -> FakeKV:
        if not available:
            raise ClusterNotFoundError("no KV cluster named 'kv'")
        return kv

    store = AutoscaleStore(connect, clock=clock, background=False, retry_s=30)
    with caplog.at_level(logging.INFO, logger="app.autoscaling.store"):
        for i in range(5):
            clock.t += 31
            store.append("m", "eu", 1_000_000 + i, 5)
            store.record("m", "eu", {"i": i})
        assert store.backend == "memory"
        assert len(store.load("m", "eu", since=0)) == 5
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "in memory" in warnings[0].getMessage()

        available = True
        clock.t += 31
        store.set_status("m", "eu", {"model": "m", "region": "eu"})
    assert store.backend == "kv"
    assert any("reached" in r.getMessage() for r in caplog.records)
    # What the store held before is merged in; what memory had is written through.
    assert store.load("m", "eu", since=0)[0] == (999_000, 3)
    assert [e["i"] for e in read_log(kv, "m", "eu", 10)] == [0, 1, 2, 3, 4]
    fresh = make_store(kv, clock)
    assert len(fresh.load("m", "eu", since=0)) == 6


def test_failed_writes_stay_for_the_next_flush(caplog: pytest.LogCaptureFixture) -> None:
    kv, clock = FakeKV(), Clock()
    store = make_store(kv, clock, retry_s=10)
    store.append("m", "eu", 1_000_000, 1)
    kv.down = True
    with caplog.at_level(logging.WARNING, logger="app.autoscaling.store"):
        store.append("m", "eu", 1_000_001, 2)
        store.record("m", "eu", {"i": 0})
        store.append("m", "eu", 1_000_002, 3)
    assert len(caplog.records) == 1  # once per outage
    kv.down = False
    clock.t += 11
    assert store.flush()
    assert pickle.loads(kv.data[rate_key("m", "eu", 1_000_000 // 60)]) == {
        1_000_000: 1,
        1_000_001: 2,
        1_000_002: 3,
    }
    assert [e["i"] for e in read_log(kv, "m", "eu", 5)] == [0]


def test_writes_happen_off_the_callers_thread() -> None:
    kv = FakeKV()
    kv.gate = threading.Event()  # every write blocks until released
    store = AutoscaleStore(lambda: kv, clock=Clock(), retry_s=0.05)
    started = time.monotonic()
    store.append("m", "eu", 1_000_000, 4)
    store.record("m", "eu", {"i": 0})
    assert time.monotonic() - started < 0.5  # the Serve controller's loop is not held
    kv.gate.set()
    deadline = time.monotonic() + 5
    while rate_key("m", "eu", 1_000_000 // 60) not in kv.data and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pickle.loads(kv.data[rate_key("m", "eu", 1_000_000 // 60)]) == {1_000_000: 4}


def test_summaries_for_autoscale_status() -> None:
    kv = FakeKV()
    store = make_store(kv)
    for model, region in (("tiny", "us"), ("echo", "eu"), ("echo", "us")):
        status = {
            "model": model,
            "region": region,
            "at_s": NOW - 30,
            "current": 2,
            "target": 3,
            "min": 1,
            "max": 8,
            "rule": "utilization_up",
            "reason": "utilisation 90% > 77%; +1 (needs 3)",
            "signals": {"total_requests": 12.0, "queued_requests": 1.0, "p95_latency_ms": 80.0},
            "forecast": {
                "next_per_min": 40.0,
                "peak_per_min": 90.0,
                "horizon_min": 61,
                "error": 0.08,
                "history_s": 7200.0,
            },
            "floors": {"forecast": {"replicas": 2, "applied": False, "reason": "history short"}},
            "replica_start_s": 7.5,
            "store": "kv",
        }
        store.set_status(model, region, status)
        store.record(
            model,
            region,
            {
                "at_s": NOW - 40,
                "current_replicas": 2,
                "target_replicas": 2,
                "rule": "steady",
                "reason": "load within thresholds",
                "applied": True,
            },
        )
        store.record(
            model,
            region,
            {
                "at_s": NOW - 30,
                "current_replicas": 2,
                "target_replicas": 3,
                "rule": "utilization_up",
                "reason": "+1",
                "applied": True,
            },
        )
    assert kv.ttls[status_key("echo", "eu")] == 86_400.0

    rows = read_summaries(kv, decisions=1)
    assert [(r["model"], r["region"]) for r in rows] == [
        ("echo", "eu"),
        ("echo", "us"),
        ("tiny", "us"),
    ]
    assert [d["rule"] for d in rows[0]["decisions"]] == ["utilization_up"]
    text = format_summaries(rows, now=NOW)
    assert "echo [eu]  replicas 2 -> 3 (min 1, max 8)  utilization_up" in text
    assert "p95 ms 80" in text and "forecast: next 40/min, peak 90/min" in text
    assert "forecast floor: 2 (recorded only): history short" in text
    assert "30s ago  2 -> 3  utilization_up: +1" in text
    assert format_summaries([], now=NOW).startswith("no autoscaled deployments")


def test_the_status_a_previous_process_left_is_kept_apart_from_this_ones() -> None:
    """A new controller writes its own status before the store answers; the old one (with the
    timings to restore) must still come back, not be taken for the new one."""
    kv, clock = FakeKV(), Clock()
    make_store(kv, clock).set_status("m", "eu", {"replica_start_s": 12.5})
    available = False

    def connect() -> FakeKV:
        if not available:
            raise ClusterNotFoundError("coordinator restarting")
        return kv

    store = AutoscaleStore(connect, clock=clock, background=False, retry_s=30)
    store.set_status("m", "eu", {"replica_start_s": None})
    assert not store.loaded("m", "eu") and store.restored_status("m", "eu") is None
    available, clock.t = True, clock.t + 31
    assert store.flush() and store.loaded("m", "eu")
    assert store.restored_status("m", "eu") == {"replica_start_s": 12.5}
    assert store.status("m", "eu") == {"replica_start_s": None}
    assert pickle.loads(kv.data[status_key("m", "eu")]) == {"replica_start_s": None}
