"""Wire types between client, shard and coordinator: redirects, markers and the slot-map view."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Read modes and write concerns travel as small ints: cheaper to pickle than enums on the hot path.
READ_STRONG = 0
READ_EVENTUAL = 1
READ_BOUNDED = 2
WRITE_ONE = 1
WRITE_MAJORITY = 2
WRITE_ALL = 3


@dataclass(frozen=True, slots=True)
class Moved:
    """The slot belongs to another shard group for good: update the map and retry there."""

    gid: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Ask:
    """The slot is migrating and this key is not (or no longer) here: ask `gid` once."""

    gid: int


@dataclass(frozen=True, slots=True)
class NotPrimary:
    """The member called is not its group's primary (the caller's map is stale)."""

    term: int


@dataclass(frozen=True, slots=True)
class Stale:
    """A replica is further behind than the bounded-staleness read allows: read the primary."""

    lag_ms: float


@dataclass(frozen=True, slots=True)
class TryAgain:
    """A transient condition (quorum wait timed out, slot mid-migration): retry the same call."""

    reason: str


REDIRECTS = (Moved, Ask, NotPrimary, Stale, TryAgain)


@dataclass(frozen=True, slots=True)
class ByValue:
    """A large value sent whole instead of as an object-store ref (an ObjectRef cannot leave
    Ray's own serialisation): by a direct-transport client writing it, by a member answering
    a direct read, and by a primary replicating it. Members hold it as `[None, size, value]`
    until a Ray caller needs a ref (see shard_base.wire)."""

    value: Any
    size: int


@dataclass(frozen=True, slots=True)
class UseRay:
    """A direct-transport reply meaning: make this call through Ray (its large values are
    cheaper to hand over as refs than to copy through the socket, or it holds something only
    Ray's cloudpickle carries). Unpickles as the one USE_RAY."""

    def __reduce__(self) -> str:
        return "USE_RAY"


USE_RAY = UseRay()


@dataclass(frozen=True, slots=True)
class Call:
    """A data-path call the routing engine asks its driver to make: `handle.method(*args)`.

    The synchronous driver sends it over the direct transport when `direct` is set (its
    arguments hold no ObjectRef) and the member has an endpoint; otherwise, and always in the
    asyncio driver, it goes as a Ray actor call (`submit`)."""

    handle: Any
    method: str
    args: tuple[Any, ...]
    direct: bool = True

    def submit(self) -> Any:
        return getattr(self.handle, self.method).remote(*self.args)


@dataclass(frozen=True)
class GroupView:
    """One shard group as clients see it: handles of its primary and replicas."""

    gid: int
    term: int
    primary: Any
    replicas: tuple[Any, ...] = ()

    @property
    def members(self) -> tuple[Any, ...]:
        return (self.primary, *self.replicas)


@dataclass(frozen=True)
class MapView:
    """A versioned copy of the slot map plus the handles a client needs to reach every group."""

    epoch: int
    owners: list[int]
    groups: dict[int, GroupView] = field(default_factory=dict)
