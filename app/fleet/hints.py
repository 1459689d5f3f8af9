"""Per-request routing hints as they travel through a handle call: the `route` keyword argument,
a plain dict so that any Ray job can pass it without importing this package."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app.fleet.scoring import RouteHints
from app.fleet.spec import Strategy

ROUTE_KWARG = "route"
REGION_HEADER = "x-client-region"
ZONE_HEADER = "x-client-zone"
STRATEGY_HEADER = "x-route-strategy"


class InvalidRouteHintError(ValueError):
    """A routing hint names an unknown strategy or has the wrong type."""


# A `route` key the routers ignore and the model replica reads: work for the background (a
# batch job's line) is admitted within the card's batch_share of the slots.
PRIORITY = "priority"
BACKGROUND = "background"


def parse_strategy(value: str | None) -> Strategy | None:
    if value is None or value == "":
        return None
    try:
        return Strategy(value.strip().lower().replace("-", "_"))
    except ValueError:
        known = ", ".join(s.value for s in Strategy)
        raise InvalidRouteHintError(
            f"unknown routing strategy {value!r}; use one of: {known}"
        ) from None


def route_kwarg(
    region: str | None = None,
    zone: str | None = None,
    strategy: str | Strategy | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, Any]:
    """The `route=` value for a handle call (validated)."""
    parsed = strategy if isinstance(strategy, Strategy) else parse_strategy(strategy)
    return {
        "region": region,
        "zone": zone,
        "strategy": parsed.value if parsed else None,
        "exclude": sorted(exclude),
    }


def with_excluded(route: dict[str, Any], replicas: Iterable[str]) -> dict[str, Any]:
    """`route` that also excludes `replicas` (replicas a failed attempt tried, open circuits);
    the same dict when it already excludes them all."""
    given = route.get("exclude") or ()
    excluded = {*given, *replicas}
    if len(excluded) == len(set(given)):
        return route
    return route | {"exclude": sorted(excluded)}


def hints_from(value: Mapping[str, Any] | RouteHints | None) -> RouteHints:
    """RouteHints from a handle call's `route` keyword; tolerant, since routers must never fail
    a request over a hint (an unknown strategy falls back to the deployment's)."""
    if value is None:
        return RouteHints()
    if isinstance(value, RouteHints):
        return value
    if not isinstance(value, Mapping):
        return RouteHints()
    try:
        strategy = parse_strategy(value.get("strategy"))
    except InvalidRouteHintError:
        strategy = None
    region, zone = value.get("region"), value.get("zone")
    return RouteHints(
        region=region if isinstance(region, str) and region else None,
        zone=zone if isinstance(zone, str) and zone else None,
        strategy=strategy,
        exclude=frozenset(str(x) for x in value.get("exclude") or ()),
    )
