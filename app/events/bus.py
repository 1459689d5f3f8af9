"""EventBus: a durable, ordered log of typed events in the KV store, with batch publish,
retention by count and age, and consumer groups that acknowledge what they have handled.

Key layout, under `events:<stream>:`:
- `seq`: {"last": last sequence number handed out, "reserved": recent reservations as
  [first, last, first_at, last_at]}, advanced by compare-and-set; a batch reserves its
  numbers in one step, so they are contiguous.
- `low`: {"low": first retained sequence number}, moved forward by `trim`.
- `e:<seq, 12 digits>`: one event.
- `g:<group>`: a consumer group's {"delivered": read position, "pending": {seq: [consumer,
  delivered_at, deliveries]}}, changed by compare-and-set.

A publisher reserves numbers first and writes the events after, so a reader may find a number
with no event yet: it stops there while the reservation is younger than `gap_timeout_s`
(its publisher is still writing) and skips it after that (its publisher died), so readers and
groups never pass an event that is still to appear. Reading n events is one mget per 1,000
numbers plus one for the two meta keys; publishing a batch is two calls plus the CAS retries
that concurrent publishers cause.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

PAGE = 1000
CAS_ATTEMPTS = 64
EXPIRE_S = 0.001  # deleting in bulk: overwrite a page of keys with a TTL this short
MERGE_S = 1.0  # reservations this close together share one entry of the `seq` record


class EventType(StrEnum):
    JOB_SUBMITTED = "job.submitted"
    JOB_STARTED = "job.started"
    JOB_PROGRESS = "job.progress"
    JOB_COMPLETED = "job.completed"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    NODE_JOINED = "node.joined"
    NODE_LEFT = "node.left"
    REPLICA_UNHEALTHY = "replica.unhealthy"
    REPLICA_HEALTHY = "replica.healthy"
    SCALING_DECISION = "scaling.decision"
    SYSTEM_OVERLOAD = "system.overload"


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    time: float
    source: str
    data: dict[str, Any]
    id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BusKV(Protocol):
    """What the bus uses of app.kv's KVClient (which satisfies it)."""

    def get_versioned(self, key: str) -> tuple[Any, int] | None: ...

    def cas(
        self, key: str, expected_version: int | None, value: Any, *, ttl: float | None = None
    ) -> tuple[bool, int | None]: ...

    def mget(self, keys: Iterable[str], default: Any = None) -> list[Any]: ...

    def mset(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None: ...


class BusBusyError(RuntimeError):
    """A bus record kept changing under this caller (extreme contention)."""


def _update(kv: BusKV, key: str, default: Any, change: Callable[[Any], Any]) -> Any:
    """Compare-and-set `key` to `change(current)`, again on each conflict; `change` returns
    None when there is nothing to write. Returns what was written (or None)."""
    for _ in range(CAS_ATTEMPTS):
        got = kv.get_versioned(key)
        current, version = (default, None) if got is None else got
        new = change(current)
        if new is None or kv.cas(key, version, new)[0]:
            return new
    raise BusBusyError(f"{key}: contended {CAS_ATTEMPTS} times")


class EventBus:
    """One stream of events; see the module docstring for its layout. Sequence numbers start
    at 1, so `after_seq=0` reads from the beginning of what is retained."""

    def __init__(
        self,
        kv: BusKV,
        stream: str = "events",
        *,
        max_events: int = 100_000,
        max_age_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
        gap_timeout_s: float = 30.0,
        trim_every: int = 1000,
    ) -> None:
        self.stream = stream
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.gap_timeout_s = gap_timeout_s
        self.trim_every = trim_every  # publishing crosses a multiple of this: trim (0: never)
        self._kv = kv
        self._clock = clock
        self._prefix = f"events:{stream.replace('%', '%25').replace(':', '%3A')}:"
        self._seq_key = self._prefix + "seq"
        self._low_key = self._prefix + "low"

    def event_key(self, seq: int) -> str:
        return f"{self._prefix}e:{seq:012d}"

    def group_key(self, group: str) -> str:
        return f"{self._prefix}g:{group}"

    @property
    def kv(self) -> BusKV:
        return self._kv

    def now(self) -> float:
        return self._clock()

    # Publishing -------------------------------------------------------------------------
    def publish(self, type: EventType | str, data: dict[str, Any], *, source: str) -> Event:
        return self.publish_batch([(type, data, source)])[0]

    def publish_batch(
        self, events: Sequence[tuple[EventType | str, dict[str, Any], str]]
    ) -> list[Event]:
        """Append events with contiguous sequence numbers (one reservation, one write)."""
        if not events:
            return []
        now = self._clock()
        first = self._reserve(len(events), now)
        built = [
            Event(first + i, str(kind), now, source, dict(data), uuid.uuid4().hex)
            for i, (kind, data, source) in enumerate(events)
        ]
        # The TTL is a safety net for a stream nobody trims; trim works well before it.
        ttl = 2 * self.max_age_s
        self._kv.mset({self.event_key(e.seq): e.to_dict() for e in built}, ttl=ttl)
        last = first + len(events) - 1
        if self.trim_every and last // self.trim_every != (first - 1) // self.trim_every:
            try:
                self.trim()
            except Exception:  # published all the same; the next crossing trims
                logger.warning("event stream %s: trim failed", self.stream, exc_info=True)
        return built

    def _reserve(self, count: int, now: float) -> int:
        first = 0

        def change(current: dict[str, Any]) -> dict[str, Any]:
            nonlocal first
            first = current["last"] + 1
            last = current["last"] + count
            kept = [r for r in current["reserved"] if now - r[3] < self.gap_timeout_s]
            if kept and kept[-1][1] == first - 1 and now - kept[-1][2] < MERGE_S:
                kept[-1] = [kept[-1][0], last, kept[-1][2], now]
            else:
                kept.append([first, last, now, now])
            return {"last": last, "reserved": kept}

        _update(self._kv, self._seq_key, {"last": 0, "reserved": []}, change)
        return first

    # Reading ----------------------------------------------------------------------------
    def read(
        self, after_seq: int = 0, *, limit: int = 100, types: Collection[str] | None = None
    ) -> list[Event]:
        """Events after `after_seq` in sequence order (of `types` only, when given)."""
        return self.read_page(after_seq, limit=limit, types=types)[0]

    def read_page(
        self,
        after_seq: int = 0,
        *,
        limit: int = 100,
        types: Collection[str] | None = None,
        max_scan: int = 10 * PAGE,
    ) -> tuple[list[Event], int]:
        """Events as `read`, and the number up to which it looked (the next `after_seq`): a
        type filter can pass over more numbers than it returns. Stops at a number whose
        event may still appear (see the module docstring), and after `max_scan` numbers."""
        last, low, reserved = self._meta()
        pos = max(after_seq, low - 1)
        wanted = {str(t) for t in types} if types else None
        now = self._clock()
        out: list[Event] = []
        end = min(last, pos + max_scan)
        while pos < end and len(out) < limit:
            size = PAGE if wanted else min(PAGE, limit - len(out))
            window = range(pos + 1, min(end, pos + size) + 1)
            records = self._kv.mget([self.event_key(s) for s in window])
            for seq, record in zip(window, records, strict=True):
                if record is None and self._young(reserved, seq, now):
                    return out, pos
                pos = seq
                if record is not None and (wanted is None or record["type"] in wanted):
                    out.append(Event(**record))
                    if len(out) >= limit:
                        return out, pos
        return out, pos

    def get_many(self, seqs: Sequence[int]) -> list[Event | None]:
        """The events with these numbers (None where trimmed or never written)."""
        records = self._kv.mget([self.event_key(s) for s in seqs]) if seqs else []
        return [None if r is None else Event(**r) for r in records]

    def last_seq(self) -> int:
        """The last number handed out (its event may be a moment from being readable)."""
        return int(self._meta()[0])

    def low_seq(self) -> int:
        """The first number retention has kept."""
        return int(self._meta()[1])

    def _meta(self) -> tuple[int, int, list[list[float]]]:
        seq_meta, low_meta = self._kv.mget([self._seq_key, self._low_key])
        return (
            seq_meta["last"] if seq_meta else 0,
            low_meta["low"] if low_meta else 1,
            seq_meta["reserved"] if seq_meta else [],
        )

    def _young(self, reserved: list[list[float]], seq: int, now: float) -> bool:
        return any(r[0] <= seq <= r[1] and now - r[3] < self.gap_timeout_s for r in reserved)

    # Retention --------------------------------------------------------------------------
    def trim(self) -> int:
        """Drop events beyond `max_events` and older than `max_age_s`; readers and groups
        skip what is dropped. Returns how many sequence numbers were dropped."""
        last, low, reserved = self._meta()
        now = self._clock()
        new_low = self._aged_out(max(low, last - self.max_events + 1), last, reserved, now)
        if new_low <= low:
            return 0

        def change(current: dict[str, int]) -> dict[str, int] | None:
            return {"low": new_low} if current["low"] < new_low else None

        if _update(self._kv, self._low_key, {"low": 1}, change) is None:
            return 0  # another trim got there first
        for start in range(low, new_low, PAGE):
            keys = [self.event_key(s) for s in range(start, min(new_low, start + PAGE))]
            self._kv.mset(dict.fromkeys(keys), ttl=EXPIRE_S)
        return new_low - low

    def _aged_out(self, pos: int, last: int, reserved: list[list[float]], now: float) -> int:
        """The first number from `pos` on whose event is younger than `max_age_s` (or may
        still appear); numbers are handed out in time order, so all before it are older."""
        cutoff = now - self.max_age_s
        size = 1  # usually nothing has aged out: one event tells
        while pos <= last:
            window = range(pos, min(last, pos + size - 1) + 1)
            size = PAGE
            records = self._kv.mget([self.event_key(s) for s in window])
            for seq, record in zip(window, records, strict=True):
                if record is None and self._young(reserved, seq, now):
                    return seq
                if record is not None and record["time"] >= cutoff:
                    return seq
                pos = seq + 1
        return pos


class ConsumerGroup:
    """Consumers sharing one position in a stream: each event goes to one consumer of the
    group, in order, at least once; once acknowledged it is never delivered to the group
    again, and one left unacknowledged past `ack_timeout_s` is delivered again. Every group
    sees every retained event. A group's `types` filter should be the same on every poll:
    events it passes over are never delivered to the group."""

    def __init__(
        self,
        bus: EventBus,
        group: str,
        *,
        ack_timeout_s: float = 30.0,
        start: Literal["earliest", "latest"] = "earliest",
    ) -> None:
        self.bus = bus
        self.group = group
        self.ack_timeout_s = ack_timeout_s
        self.start = start
        self._key = bus.group_key(group)

    def _initial(self) -> dict[str, Any]:
        delivered = self.bus.last_seq() if self.start == "latest" else 0
        return {"delivered": delivered, "pending": {}}

    def poll(
        self, consumer: str, *, limit: int = 100, types: Collection[str] | None = None
    ) -> list[Event]:
        """Events past their ack timeout again, then the next ones; in sequence order."""
        if limit <= 0:
            return []
        handed: list[Event] = []

        def change(state: dict[str, Any] | None) -> dict[str, Any] | None:
            created = state is None  # its start position is written even with nothing read
            state = self._initial() if state is None else state
            handed.clear()
            now = self.bus.now()
            pending: dict[int, list[Any]] = dict(state["pending"])
            due = sorted(s for s, p in pending.items() if now - p[1] >= self.ack_timeout_s)
            due = due[:limit]
            again = self.bus.get_many(due)
            for seq, event in zip(due, again, strict=True):
                if event is None:  # trimmed before it was acknowledged
                    pending.pop(seq)
                else:
                    handed.append(event)
            fresh, pos = self.bus.read_page(
                state["delivered"], limit=limit - len(handed), types=types
            )
            handed.extend(fresh)
            unchanged = pos == state["delivered"] and len(pending) == len(state["pending"])
            if unchanged and not handed and not created:
                return None
            for event in handed:
                deliveries = pending[event.seq][2] if event.seq in pending else 0
                pending[event.seq] = [consumer, now, deliveries + 1]
            return {"delivered": pos, "pending": pending}

        _update(self.bus.kv, self._key, None, change)
        return sorted(handed, key=lambda e: e.seq)

    def ack(self, seqs: Iterable[int]) -> None:
        done = set(seqs)

        def change(state: dict[str, Any] | None) -> dict[str, Any] | None:
            if state is None or not done & state["pending"].keys():
                return None
            pending = {s: p for s, p in state["pending"].items() if s not in done}
            return {"delivered": state["delivered"], "pending": pending}

        _update(self.bus.kv, self._key, None, change)

    def pending(self) -> list[tuple[int, str, float]]:
        """(seq, consumer, delivered_at) of every event delivered and not acknowledged."""
        got = self.bus.kv.get_versioned(self._key)
        state = got[0] if got is not None else {"pending": {}}
        return sorted((s, p[0], p[1]) for s, p in state["pending"].items())
