"""Which routers hold which version of the fleet view, so that an operator action can be
confirmed rather than assumed.

Routers pull snapshots of the router actor in the background (app.fleet.request_router), so a
drain reaches each of them with its next pull: usually within `snapshot_interval_s`, later on
a loaded machine. Each pull names the router and the version it already applied; once every
live router has applied the version a drain produced, no router routes to the drained node
(the acknowledgement discipline of Envoy's xDS, where a proxy ACKs the config it applied).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Subscriber:
    version: int  # the version this router has applied
    seen: float  # monotonic time of its last pull


class Propagation:
    """The routers that pulled within `live_s`, with the version each holds. Routers that
    stopped pulling (their process gone) drop out after `live_s`, so a wait is never held by a
    router that no longer routes; the price is that a router stalled for longer than that is
    not waited for either."""

    def __init__(self, live_s: float) -> None:
        if live_s <= 0:
            raise ValueError(f"live_s must be positive, not {live_s}")
        self.live_s = live_s
        self._subscribers: dict[str, Subscriber] = {}

    def ack(self, router: str, version: int, now: float) -> None:
        """`router` pulled at `now` holding `version` (-1: it has none yet)."""
        self._subscribers[router] = Subscriber(version, now)

    def live(self, now: float) -> dict[str, int]:
        """Live routers and the version each holds; forgets the rest."""
        cutoff = now - self.live_s
        self._subscribers = {k: s for k, s in self._subscribers.items() if s.seen >= cutoff}
        return {k: s.version for k, s in self._subscribers.items()}

    def behind(self, version: int, now: float) -> list[str]:
        """Live routers that have not applied `version` yet, sorted."""
        return sorted(k for k, held in self.live(now).items() if held < version)
