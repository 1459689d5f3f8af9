"""What running batches hold in the KV store: quota reservations (concurrent batches per
owner and overall) and the active set the line workers lease from."""

from __future__ import annotations

from typing import Any

from app.batches.records import RecordKV, update

ACTIVE_KEY = "batch:active"


class _Full(Exception):
    pass


def _adder(batch_id: str, limit: int | None) -> Any:
    def add(held: list[str] | None) -> list[str]:
        held = held or []
        if batch_id in held:
            return held
        if limit is not None and len(held) >= limit:
            raise _Full
        return [*held, batch_id]

    return add


def _remover(batch_id: str) -> Any:
    def remove(held: list[str] | None) -> list[str] | None:
        return None if held is None else [b for b in held if b != batch_id]

    return remove


class BatchQuota:
    """A reservation is the batch id in a set per owner and one overall; reserving twice or
    releasing twice is harmless (steps are retried and compensations repeated)."""

    def __init__(
        self, kv: RecordKV, *, per_owner: int | None = None, total: int | None = None
    ) -> None:
        self.kv = kv
        self.per_owner = per_owner
        self.total = total

    def _owner_key(self, owner: str) -> str:
        return f"batchquota:owner:{owner}"

    def reserve(self, owner: str, batch_id: str) -> bool:
        """True if the batch now holds a place under both limits."""
        try:
            update(self.kv, self._owner_key(owner), _adder(batch_id, self.per_owner))
        except _Full:
            return False
        try:
            update(self.kv, "batchquota:total", _adder(batch_id, self.total))
        except _Full:
            update(self.kv, self._owner_key(owner), _remover(batch_id))
            return False
        return True

    def release(self, owner: str, batch_id: str) -> None:
        update(self.kv, "batchquota:total", _remover(batch_id))
        update(self.kv, self._owner_key(owner), _remover(batch_id))

    def held(self, owner: str | None = None) -> list[str]:
        key = "batchquota:total" if owner is None else self._owner_key(owner)
        return list(self.kv.get(key) or [])


class ActiveBatches:
    """Batches whose lines are queued: the line workers lease from each one's queue."""

    def __init__(self, kv: RecordKV) -> None:
        self.kv = kv

    def add(self, batch_id: str) -> None:
        update(self.kv, ACTIVE_KEY, _adder(batch_id, None))

    def remove(self, batch_id: str) -> None:
        update(self.kv, ACTIVE_KEY, _remover(batch_id))

    def ids(self) -> list[str]:
        return list(self.kv.get(ACTIVE_KEY) or [])
