"""Rate-limited warnings: once per key per window, a bounded number per window in all, and what
was held back is said in the next warning."""

from __future__ import annotations

import logging

import pytest

from app.cache.stats import WarningLimiter


def test_warnings_are_limited_per_key_and_per_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = WarningLimiter(logging.getLogger("t"), window_s=10, burst=3, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        assert limiter.warn("a", "bad %s", "a")
        assert not limiter.warn("a", "bad %s", "a")  # same key, same window
        assert limiter.warn("b", "bad %s", "b") and limiter.warn("c", "bad %s", "c")
        assert not limiter.warn("d", "bad %s", "d")  # the window's budget is spent
        assert len(caplog.records) == 3 and limiter.held_back == 1
        now[0] = 10.0
        assert limiter.warn("a", "bad %s", "a")
    said = [r.getMessage() for r in caplog.records]
    assert said[1] == "bad b (1 similar warnings held back)"
    assert said[-1] == "bad a (1 similar warnings held back)"
    assert limiter.held_back == 0
