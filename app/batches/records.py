"""The KV store as the Files and Batch APIs use it: a client Protocol, read-modify-write under
CAS, owner names, and the HTTP errors app.api.errors does not have."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from app.api.errors import APIError

# Records of callers when auth is off share one owner; a key id never contains "-".
ANONYMOUS = "-"
CAS_ATTEMPTS = 64


class RecordKV(Protocol):
    """What the package uses of app.kv's KVClient (which satisfies it)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def get_versioned(self, key: str) -> tuple[Any, int] | None: ...

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> int: ...

    def cas(
        self, key: str, expected_version: int | None, value: Any, *, ttl: float | None = None
    ) -> tuple[bool, int | None]: ...

    def delete(self, key: str) -> bool: ...

    def mget(self, keys: Iterable[str], default: Any = None) -> list[Any]: ...


class ConflictError(APIError):
    """The object's state forbids the operation (409), e.g. cancelling a completed batch."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ContentionError(RuntimeError):
    """A record changed under every one of CAS_ATTEMPTS read-modify-write tries."""


def owner_of(key_id: str | None) -> str:
    return key_id or ANONYMOUS


def update(
    kv: RecordKV, key: str, change: Callable[[Any], Any], *, ttl: float | None = None
) -> Any:
    """`change(current)` (None when absent) written back only if nobody wrote in between; it
    may raise to refuse. Returns the value now stored (unchanged: nothing is written)."""
    for _ in range(CAS_ATTEMPTS):
        got = kv.get_versioned(key)
        current, version = got if got is not None else (None, None)
        new = change(copy.deepcopy(current))
        if new == current:
            return current
        ok, _ = kv.cas(key, version, new, ttl=ttl)
        if ok:
            return new
    raise ContentionError(f"{key!r} kept changing under {CAS_ATTEMPTS} updates")


def put_if_absent(kv: RecordKV, key: str, value: Any, *, ttl: float | None = None) -> bool:
    """Store `value` unless `key` exists; True if this call stored it."""
    ok, _ = kv.cas(key, None, value, ttl=ttl)
    return ok
