"""The in-memory RateHistory: what the KV-backed one must also do."""

from __future__ import annotations

from app.autoscaling.history import InMemoryRateHistory, RateHistory


def test_append_and_load_per_model_and_region() -> None:
    history: RateHistory = InMemoryRateHistory()
    history.append("m", "eu", 101, 7)
    history.append("m", "eu", 100, 5)
    history.append("m", "us", 100, 9)
    history.append("other", "eu", 100, 1)
    assert history.load("m", "eu", since=0) == [(100, 5), (101, 7)]
    assert history.load("m", "eu", since=101) == [(101, 7)]
    assert history.load("m", "us", since=0) == [(100, 9)]
    assert history.load("m", "ap", since=0) == []


def test_appending_a_minute_again_replaces_it() -> None:
    history = InMemoryRateHistory()
    history.append("m", "eu", 100, 5)
    history.append("m", "eu", 100, 6)
    assert history.load("m", "eu", since=0) == [(100, 6)]


def test_retention_drops_the_oldest_minutes() -> None:
    history = InMemoryRateHistory(retention_minutes=3)
    for minute in range(10):
        history.append("m", "eu", minute, minute)
    assert history.load("m", "eu", since=0) == [(7, 7), (8, 8), (9, 9)]
