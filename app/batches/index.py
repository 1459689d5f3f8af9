"""Per-owner listing order in the KV store: scans come back in slot order, not time order, so
each owner's ids are kept sorted by creation time in day buckets (bounded values), with a
directory of the days that have any."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Literal

from app.batches.records import RecordKV, update

Order = Literal["asc", "desc"]
Position = tuple[float, str]  # (created, id): an entry's place in the order
DAY_S = 86_400


class TimeIndex:
    """Ids of one kind of record (files, batches) per owner, in (created, id) order; a tag
    (a file's purpose) lets a page be filtered without reading the records."""

    def __init__(self, kv: RecordKV, prefix: str, *, bucket_s: int = DAY_S) -> None:
        self.kv = kv
        self.prefix = prefix
        self.bucket_s = bucket_s

    def _dir(self, owner: str) -> str:
        return f"{self.prefix}:idx:{owner}"

    def _bucket(self, owner: str, bucket: int) -> str:
        return f"{self.prefix}:idx:{owner}:{bucket}"

    def add(self, owner: str, created: float, item_id: str, tag: str = "") -> None:
        bucket = int(created // self.bucket_s)

        def add_day(days: list[int] | None) -> list[int]:
            days = days or []
            if bucket not in days:
                bisect.insort(days, bucket)
            return days

        def add_entry(entries: list[list[object]] | None) -> list[list[object]]:
            entries = [e for e in entries or [] if e[1] != item_id]
            bisect.insort(entries, [created, item_id, tag], key=lambda e: (e[0], e[1]))
            return entries

        # The day first: a listed day with no entry yet is harmless, an entry in an unlisted
        # day would be invisible. Days are never unlisted, so no add can race a removal.
        update(self.kv, self._dir(owner), add_day)
        update(self.kv, self._bucket(owner, bucket), add_entry)

    def remove(self, owner: str, created: float, item_id: str) -> None:
        key = self._bucket(owner, int(created // self.bucket_s))
        update(self.kv, key, lambda entries: [e for e in entries or [] if e[1] != item_id])

    def page(
        self,
        owner: str,
        *,
        limit: int,
        order: Order = "desc",
        after: Position | None = None,
        tag: str | None = None,
    ) -> tuple[list[str], bool]:
        """Up to `limit` ids past `after` in `order`, and whether more follow."""
        ids: list[str] = []
        for _, item_id, item_tag in self._entries(owner, order, after):
            if tag is not None and item_tag != tag:
                continue
            if len(ids) == limit:
                return ids, True
            ids.append(item_id)
        return ids, False

    def _entries(
        self, owner: str, order: Order, after: Position | None
    ) -> Iterator[tuple[float, str, str]]:
        days: list[int] = self.kv.get(self._dir(owner)) or []
        desc = order == "desc"
        if after is not None:
            first = int(after[0] // self.bucket_s)
            days = [d for d in days if (d <= first if desc else d >= first)]
        for day in reversed(days) if desc else days:
            entries = self.kv.get(self._bucket(owner, day)) or []
            for created, item_id, tag in reversed(entries) if desc else entries:
                if after is not None:
                    place = (created, item_id)
                    if (place >= after) if desc else (place <= after):
                        continue
                yield created, item_id, tag
