"""Where a DurableQueue keeps its items in the KV store: key names, record states, the meta
record's compare-and-set loop, and paging through or deleting every key of a queue."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from app.kv.client import ScanPage

PENDING, LEASED, DONE, DEAD = "pending", "leased", "done", "dead"
PAGE = 1000  # keys per scan page, mget or bulk delete
CAS_ATTEMPTS = 64
EXPIRE_S = 0.001  # deleting in bulk: overwrite a page of keys with a TTL this short
MAX_KEY_CHARS = 200  # longer idempotency keys are indexed by their hash

Meta = dict[str, Any]


class QueueKV(Protocol):
    """What the queue uses of app.kv's KVClient (which satisfies it)."""

    def get_versioned(self, key: str) -> tuple[Any, int] | None: ...

    def cas(
        self, key: str, expected_version: int | None, value: Any, *, ttl: float | None = None
    ) -> tuple[bool, int | None]: ...

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> int: ...

    def delete(self, key: str) -> bool: ...

    def mget(self, keys: Iterable[str], default: Any = None) -> list[Any]: ...

    def mset(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None: ...

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage: ...


class QueueBusyError(RuntimeError):
    """The queue's meta record kept changing under this caller (extreme contention)."""


class QueueKeys:
    """Key names of one queue, under `jobs:q:<name>:` (`%` and `:` escaped in the name, so no
    queue's keys start with another's prefix)."""

    def __init__(self, name: str) -> None:
        self.prefix = f"jobs:q:{name.replace('%', '%25').replace(':', '%3A')}:"
        self.meta = self.prefix + "meta"
        self.dead_prefix = self.prefix + "d:"

    def item(self, n: int) -> str:
        return f"{self.prefix}i:{n}"

    def index(self, key: str) -> str:
        if len(key) > MAX_KEY_CHARS or key.startswith("#"):
            key = "#" + hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}k:{key}"

    def dead(self, n: int) -> str:
        return f"{self.dead_prefix}{n}"


def empty_meta() -> Meta:
    return {"next": 0, "cursor": 0, "inflight": {}, "reserved": [], "dead": 0, "holes": 0}


def update_meta(kv: QueueKV, key: str, change: Callable[[Meta], bool]) -> Meta:
    """Apply `change` to a copy of the meta record and compare-and-set it, again on each
    conflict; `change` returns False when there is nothing to write."""
    for _ in range(CAS_ATTEMPTS):
        got = kv.get_versioned(key)
        if got is None:
            meta, version = empty_meta(), None
        else:
            meta, version = dict(got[0]), got[1]
            meta["inflight"] = dict(meta["inflight"])
        if not change(meta):
            return meta
        if kv.cas(key, version, meta)[0]:
            return meta
    raise QueueBusyError(f"{key}: contended {CAS_ATTEMPTS} times")


def scan_all(kv: QueueKV, prefix: str) -> Iterator[tuple[str, Any]]:
    """Every (key, value) under `prefix`, a page at a time, in no useful order."""
    cursor: str | None = None
    while True:
        page = kv.scan(prefix, page_size=PAGE, cursor=cursor)
        yield from page.items
        if page.cursor is None:
            return
        cursor = page.cursor


def delete_all(kv: QueueKV, prefix: str) -> None:
    """Delete every key under `prefix`: one write per page, not one per key."""
    page: list[str] = []
    for key, _ in scan_all(kv, prefix):
        page.append(key)
        if len(page) >= PAGE:
            kv.mset(dict.fromkeys(page), ttl=EXPIRE_S)
            page = []
    if page:
        kv.mset(dict.fromkeys(page), ttl=EXPIRE_S)


def first_delivery(record: Mapping[str, Any]) -> bool:
    return record.get("state") == PENDING and record.get("attempt") == 0


def dead_record(record: dict[str, Any], error: str) -> dict[str, Any]:
    return record | {"state": DEAD, "error": error, "lease_id": None}
