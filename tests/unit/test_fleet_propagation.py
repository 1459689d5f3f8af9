"""Which routers hold which fleet-view version (app.fleet.propagation)."""

from __future__ import annotations

import pytest

from app.fleet.propagation import Propagation


def test_a_version_is_propagated_once_every_live_router_has_applied_it() -> None:
    p = Propagation(live_s=10)
    p.ack("gateway", 4, now=0.0)
    p.ack("ingress-eu", 3, now=0.0)
    assert p.behind(4, now=1.0) == ["ingress-eu"]
    assert p.behind(3, now=1.0) == []
    p.ack("ingress-eu", 5, now=2.0)
    assert p.behind(4, now=2.0) == []
    assert p.behind(5, now=2.0) == ["gateway"]


def test_a_router_that_stopped_pulling_is_no_longer_waited_for() -> None:
    p = Propagation(live_s=10)
    p.ack("gone", -1, now=0.0)
    p.ack("here", 1, now=5.0)
    assert p.behind(1, now=9.0) == ["gone"]
    assert p.behind(1, now=10.5) == []
    assert p.live(now=10.5) == {"here": 1}


def test_live_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="live_s"):
        Propagation(live_s=0)
