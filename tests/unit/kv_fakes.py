"""In-memory stand-ins for the KV store client and the clock, shared by the unit tests of the
stores built on app.kv (jobs queue, event bus, workflows)."""

from __future__ import annotations

import pickle
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from app.kv import KVClient, ReadConcern, ScanPage, WriteConcern, key_slot


class FakeClock:
    """A clock that moves only when told; `sleep` advances it and records the delay."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


class FakeKV(KVClient):
    """The KVClient data methods over a dict, with the real client's contracts: values are
    pickled, versions grow across deletes (never reused), TTLs expire on `clock`, and `scan`
    returns keys in slot order, not key order. `calls` counts calls per method and
    `keys_touched` the keys they named, so tests can bound the work an operation does."""

    def __init__(self, clock: FakeClock | None = None) -> None:  # no coordinator: no Ray
        self.clock = clock or FakeClock()
        self.data: dict[str, tuple[bytes, int, float | None]] = {}
        self.vclock = 0
        self.calls: Counter[str] = Counter()
        self.keys_touched = 0
        self.lock = threading.Lock()

    # Helpers ---------------------------------------------------------------------------
    def _count(self, method: str, keys: int = 1) -> None:
        self.calls[method] += 1
        self.keys_touched += keys

    def _live(self, key: str) -> tuple[bytes, int, float | None] | None:
        entry = self.data.get(key)
        if entry is not None and entry[2] is not None and entry[2] <= self.clock():
            del self.data[key]
            return None
        return entry

    def _store(self, key: str, value: Any, ttl: float | None) -> int:
        self.vclock += 1
        expires = None if ttl is None else self.clock() + ttl
        self.data[key] = (pickle.dumps(value), self.vclock, expires)
        return self.vclock

    def value(self, key: str) -> Any:
        """What a key holds now (None if absent), without counting a call."""
        with self.lock:
            entry = self._live(key)
            return None if entry is None else pickle.loads(entry[0])

    def live_keys(self, prefix: str = "") -> list[str]:
        with self.lock:
            return sorted(k for k in list(self.data) if k.startswith(prefix) and self._live(k))

    def reset_counts(self) -> None:
        self.calls.clear()
        self.keys_touched = 0

    # KVClient --------------------------------------------------------------------------
    def get(
        self,
        key: str,
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> Any:
        with self.lock:
            self._count("get")
            entry = self._live(key)
            return default if entry is None else pickle.loads(entry[0])

    def get_versioned(self, key: str) -> tuple[Any, int] | None:
        with self.lock:
            self._count("get_versioned")
            entry = self._live(key)
            return None if entry is None else (pickle.loads(entry[0]), entry[1])

    def put(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> int:
        with self.lock:
            self._count("put")
            return self._store(key, value, ttl)

    def delete(
        self, key: str, *, write: WriteConcern | str | None = None, request_id: str | None = None
    ) -> bool:
        with self.lock:
            self._count("delete")
            existed = self._live(key) is not None
            self.data.pop(key, None)
            return existed

    def cas(
        self,
        key: str,
        expected_version: int | None,
        value: Any,
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> tuple[bool, int | None]:
        with self.lock:
            self._count("cas")
            entry = self._live(key)
            current = None if entry is None else entry[1]
            if current != expected_version:
                return False, current
            return True, self._store(key, value, ttl)

    def mget(
        self,
        keys: Iterable[str],
        default: Any = None,
        *,
        read: ReadConcern | str | None = None,
        max_lag_ms: float | None = None,
    ) -> list[Any]:
        keys = list(keys)
        with self.lock:
            self._count("mget", len(keys))
            entries = [self._live(key) for key in keys]
            return [default if e is None else pickle.loads(e[0]) for e in entries]

    def mset(
        self,
        mapping: Mapping[str, Any],
        *,
        ttl: float | None = None,
        write: WriteConcern | str | None = None,
        request_id: str | None = None,
    ) -> None:
        with self.lock:
            self._count("mset", len(mapping))
            for key, value in mapping.items():
                self._store(key, value, ttl)

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage:
        with self.lock:
            keys = sorted(
                (k for k in list(self.data) if k.startswith(prefix) and self._live(k)),
                key=lambda k: (key_slot(k), k),
            )
            if cursor is not None:  # keys after the cursor's, even if it has gone since
                keys = [k for k in keys if (key_slot(k), k) > (key_slot(cursor), cursor)]
            page = keys[:page_size]
            self._count("scan", len(page))
            more = len(keys) > page_size
            items = [(k, pickle.loads(self.data[k][0])) for k in page]
            return ScanPage(items, page[-1] if more else None)
