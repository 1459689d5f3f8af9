"""RegionFederation's forwards and the peer's circuit breaker, without Ray or a network: the
forwarder is replaced by a script. An unreachable peer counts against its circuit, a busy one
only frees the half-open probe, and an open circuit refuses the forward before any request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.fleet.breaker import BreakerConfig, BreakerState
from app.fleet.spec import load_fleet
from app.regions.federation import RegionFederation
from app.regions.forwarding import PeerBusyError, PeerUnreachableError

ROOT = Path(__file__).resolve().parents[2]


class ScriptedForwarder:
    """Answers forwards from a list: a payload, or an exception to raise."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def unary(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def federation(monkeypatch: pytest.MonkeyPatch) -> RegionFederation:
    monkeypatch.setenv("APP_FEDERATION_SECRET", "s" * 32)
    fleet = load_fleet(ROOT / "deployments" / "local-regions.yaml").for_region("east")
    return RegionFederation(fleet)


def clocked(federation: RegionFederation) -> list[float]:
    now = [0.0]
    breaker = federation.table.peers["west"].breaker
    breaker.clock = lambda: now[0]
    return now


async def forward(federation: RegionFederation) -> Any:
    return await federation.forward("west", "/models/echo/v1/chat/completions", b"{}", {})


async def test_unreachable_forwards_open_the_peers_circuit(federation: RegionFederation) -> None:
    threshold = federation.fleet.federation.failure_threshold
    scripted = ScriptedForwarder(*[PeerUnreachableError("refused")] * threshold)
    federation.forwarder = scripted  # type: ignore[assignment]
    for _ in range(threshold):
        with pytest.raises(PeerUnreachableError, match="refused"):
            await forward(federation)
    peer = federation.table.peers["west"]
    assert peer.breaker.state is BreakerState.OPEN and not peer.in_rotation
    with pytest.raises(PeerUnreachableError, match="circuit open"):
        await forward(federation)
    assert scripted.calls == threshold  # the open circuit sent nothing


async def test_a_half_open_peer_is_probed_and_closes_on_success(
    federation: RegionFederation,
) -> None:
    now = clocked(federation)
    peer = federation.table.peers["west"]
    for _ in range(federation.fleet.federation.failure_threshold):
        federation.table.record_failure("west", "refused")
    now[0] += BreakerConfig().cooloff_s
    federation.forwarder = ScriptedForwarder({"id": "cmpl-1"})  # type: ignore[assignment]
    assert await forward(federation) == {"id": "cmpl-1"}
    assert peer.breaker.state is BreakerState.CLOSED and peer.failures == 0


async def test_a_busy_answer_frees_the_probe_without_a_verdict(
    federation: RegionFederation,
) -> None:
    now = clocked(federation)
    peer = federation.table.peers["west"]
    for _ in range(federation.fleet.federation.failure_threshold):
        federation.table.record_failure("west", "refused")
    now[0] += BreakerConfig().cooloff_s
    federation.forwarder = ScriptedForwarder(PeerBusyError(503, b"{}"))  # type: ignore[assignment]
    with pytest.raises(PeerBusyError):
        await forward(federation)
    assert peer.breaker.state is BreakerState.HALF_OPEN
    assert federation.table.admit("west")  # the next forward may probe
