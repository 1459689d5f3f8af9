"""A history checker for tests: acknowledged writes survive, strong reads linearize per key.

Writes must carry unique values per key. Then per-key linearizability of a register can be
decided exactly in polynomial time (Gibbons & Korach, 1997): group each write with the reads that
returned its value into a cluster; a cluster's zone runs from the earliest completion to the
latest invocation among its operations. The history is linearizable iff every read starts after
its write was invoked, no two forward zones (earliest completion < latest invocation) overlap,
and no backward zone lies inside a forward zone.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

INITIAL: Hashable = None  # value a read returns before any write (missing key)


@dataclass(frozen=True)
class Event:
    """One completed or indeterminate operation on one key.

    `end` is None for a write whose outcome is unknown (it raised): it may or may not have
    applied, so the checker lets it take effect at any time after `start`, or never.
    """

    kind: str  # "write" or "read"
    key: str
    value: Hashable
    start: float
    end: float | None
    client: str = ""


class History:
    """Thread-safe recorder; timestamps come from one monotonic clock in one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def add(
        self,
        kind: str,
        key: str,
        value: Hashable,
        start: float,
        end: float | None,
        client: str = "",
    ) -> None:
        with self._lock:
            self.events.append(Event(kind, key, value, start, end, client))

    def acknowledged(self) -> list[Event]:
        return [e for e in self.events if e.kind == "write" and e.end is not None]


def check_durability(events: Iterable[Event], final: dict[str, Hashable]) -> list[str]:
    """Every acknowledged write is still readable: a key's final value must come from its last
    acknowledged write or from a write that was not over before that one began."""
    writes: dict[tuple[str, Hashable], Event] = {}
    last_acked: dict[str, tuple[float, Event]] = {}
    for e in events:
        if e.kind != "write":
            continue
        writes[(e.key, e.value)] = e
        if e.end is not None and e.end > last_acked.get(e.key, (-math.inf, e))[0]:
            last_acked[e.key] = (e.end, e)
    problems = []
    for key, (_, acked) in last_acked.items():
        value = final.get(key, INITIAL)
        seen = writes.get((key, value))
        if seen is None:
            problems.append(f"{key}: acknowledged {acked.value!r} lost, final value {value!r}")
        elif seen.end is not None and seen.end < acked.start:
            problems.append(
                f"{key}: final value {value!r} predates acknowledged write {acked.value!r}"
            )
    return problems


def check_linearizable(events: Iterable[Event]) -> list[str]:
    """Per-key linearizability violations of a register history (empty list: linearizable)."""
    by_key: dict[str, list[Event]] = {}
    for e in events:
        by_key.setdefault(e.key, []).append(e)
    problems: list[str] = []
    for key, ops in sorted(by_key.items()):
        problems.extend(_check_key(key, ops))
    return problems


def _check_key(key: str, ops: list[Event]) -> list[str]:
    writes = {e.value: e for e in ops if e.kind == "write"}
    if len(writes) != sum(1 for e in ops if e.kind == "write"):
        return [f"{key}: written values are not unique; the checker needs unique values"]
    writes.setdefault(INITIAL, Event("write", key, INITIAL, -math.inf, -math.inf))
    reads: dict[Hashable, list[Event]] = {}
    problems = []
    for e in ops:
        if e.kind != "read":
            continue
        write = writes.get(e.value)
        if write is None:
            problems.append(f"{key}: read {e.value!r}, which was never written")
        elif e.end is not None and write.start >= e.end:
            problems.append(f"{key}: read {e.value!r} before its write began")
        else:
            reads.setdefault(e.value, []).append(e)
    return problems + _zone_conflicts(key, writes, reads)


def _zone_conflicts(
    key: str, writes: dict[Hashable, Event], reads: dict[Hashable, list[Event]]
) -> list[str]:
    """Gibbons-Korach: forward zones must not overlap, no backward zone inside a forward one."""
    forward: list[tuple[float, float, Hashable]] = []  # zones as (from, to, value)
    backward: list[tuple[float, float, Hashable]] = []
    for value, write in writes.items():
        cluster = [write, *reads.get(value, [])]
        if write.end is None and len(cluster) == 1:
            continue  # indeterminate and never observed: it may simply not have happened
        low = min(math.inf if e.end is None else e.end for e in cluster)
        high = max(e.start for e in cluster)
        if low < high:
            forward.append((low, high, value))
        else:
            backward.append((high, low, value))
    problems = []
    forward.sort(key=lambda zone: zone[0])
    reach, reach_value = -math.inf, INITIAL
    for start, end, value in forward:
        if start < reach:
            problems.append(
                f"{key}: values {reach_value!r} and {value!r} were both current at once"
            )
        if end > reach:
            reach, reach_value = end, value
    for b_start, b_end, b_value in backward:
        for f_start, f_end, f_value in forward:
            if f_start < b_start and b_end < f_end:
                problems.append(
                    f"{key}: {b_value!r} took effect while {f_value!r} had to be current"
                )
    return problems


class RegisterWorkload:
    """Concurrent writers of unique values and strong readers over a few keys, recorded into a
    History. `client` is anything with `aput`/`aget` (and `amset`/`amget` when `batched`).

    Every failure a caller could see is kept in `errors`; an operation that raised is recorded
    as indeterminate (writes) or dropped (reads), which is what the checkers expect.
    """

    def __init__(
        self,
        client: Any,
        keys: list[str],
        writers: int = 3,
        readers: int = 2,
        batched: bool = False,
        history: History | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.writers = writers
        self.readers = readers
        self.batched = batched
        self.history = history or History()
        self.errors: list[BaseException] = []
        self.acked = 0

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [self._writer(f"w{i}", stop) for i in range(self.writers)]
        tasks += [self._reader(f"r{i}", stop) for i in range(self.readers)]
        await asyncio.gather(*tasks)

    async def _writer(self, name: str, stop: asyncio.Event) -> None:
        rng, n, clock = random.Random(name), 0, self.history.clock
        while not stop.is_set():
            n += 1
            if self.batched and n % 3 == 0:
                batch = {k: f"{name}-{n}-{k}" for k in rng.sample(self.keys, 3)}
                call: Awaitable[Any] = self.client.amset(batch)
            else:
                batch = {rng.choice(self.keys): f"{name}-{n}"}
                key, value = next(iter(batch.items()))
                call = self.client.aput(key, value)
            start, end = clock(), None
            try:
                await call
                end = clock()
                self.acked += len(batch)
            except Exception as exc:
                self.errors.append(exc)
            for key, value in batch.items():
                self.history.add("write", key, value, start, end, name)

    async def _reader(self, name: str, stop: asyncio.Event) -> None:
        rng, clock = random.Random(name), self.history.clock
        while not stop.is_set():
            keys = rng.sample(self.keys, 4) if self.batched else [rng.choice(self.keys)]
            start = clock()
            try:
                values = (
                    await self.client.amget(keys)
                    if self.batched
                    else [await self.client.aget(keys[0])]
                )
            except Exception as exc:
                self.errors.append(exc)
                continue
            end = clock()
            for key, value in zip(keys, values, strict=True):
                self.history.add("read", key, value, start, end, name)

    async def final_values(self) -> dict[str, Hashable]:
        """Read every key once more (recorded too) once the writers have stopped."""
        out = {}
        for key in self.keys:
            start = self.history.clock()
            out[key] = await self.client.aget(key)
            self.history.add("read", key, out[key], start, self.history.clock(), "final")
        return out

    def check(self, final: dict[str, Hashable]) -> list[str]:
        return check_durability(self.history.events, final) + check_linearizable(
            self.history.events
        )
