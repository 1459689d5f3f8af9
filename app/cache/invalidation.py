"""Invalidations: what one names (a key, a prefix or a glob), how it matches keys, and the
bounded, sequenced log a shard keeps so every process's L1 can replay what it missed."""

from __future__ import annotations

import uuid
from collections import deque
from enum import StrEnum
from fnmatch import fnmatchcase
from itertools import islice
from typing import NamedTuple

from app.cache.lru import CacheArgumentError


class Scope(StrEnum):
    KEY = "key"
    PREFIX = "prefix"
    GLOB = "glob"
    ALL = "all"


class Invalidation(NamedTuple):
    """One invalidation: `text` is a key, a prefix or a glob (fnmatch syntax: *, ?, [...]).
    `origin` names the process that issued it, which has applied it to its own L1 already."""

    scope: Scope
    text: str
    origin: str = ""

    def matches(self, key: str) -> bool:
        if self.scope is Scope.KEY:
            return key == self.text
        if self.scope is Scope.PREFIX:
            return key.startswith(self.text)
        if self.scope is Scope.GLOB:
            return fnmatchcase(key, self.text)
        return True


def invalidation(scope: str | Scope, text: str, origin: str = "") -> Invalidation:
    """A validated Invalidation; bad scopes and empty patterns fail with the reason."""
    try:
        kind = Scope(scope)
    except ValueError:
        raise CacheArgumentError(
            f"unknown invalidation scope {scope!r}; use one of {[s.value for s in Scope]}"
        ) from None
    if kind is not Scope.ALL and not isinstance(text, str):
        raise CacheArgumentError(f"{kind.value} must be a str, not {type(text).__name__}")
    if kind in (Scope.PREFIX, Scope.GLOB) and not text:
        raise CacheArgumentError(f"an empty {kind.value} would match every key; use clear()")
    return Invalidation(kind, text, origin)


class Cursor(NamedTuple):
    """Where a reader stands in one shard's log: the shard's epoch and the last seq applied."""

    epoch: str
    seq: int


class PollResult(NamedTuple):
    """Entries after the reader's cursor, the new cursor, and whether the reader must flush its
    L1 (the shard restarted, so its epoch changed, or the entries it missed were trimmed)."""

    cursor: Cursor
    entries: list[Invalidation]
    flush: bool


class InvalidationLog:
    """Sequenced invalidations of one shard, keeping the last `capacity` of them."""

    def __init__(self, capacity: int = 10_000, epoch: str | None = None) -> None:
        if capacity < 1:
            raise CacheArgumentError(f"log capacity must be at least 1, not {capacity}")
        self.epoch = epoch or uuid.uuid4().hex
        self.seq = 0
        self._entries: deque[tuple[int, Invalidation]] = deque(maxlen=capacity)

    def append(self, entry: Invalidation) -> int:
        self.seq += 1
        self._entries.append((self.seq, entry))
        return self.seq

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.epoch, self.seq)

    def since(self, cursor: Cursor | None) -> PollResult:
        """What a reader at `cursor` has not applied. A reader with no cursor (just started, its
        L1 is empty) only learns the current position."""
        if cursor is None:
            return PollResult(self.cursor, [], False)
        if cursor.epoch != self.epoch or cursor.seq > self.seq:
            return PollResult(self.cursor, [], True)
        if cursor.seq == self.seq:
            return PollResult(cursor, [], False)
        oldest = self._entries[0][0] if self._entries else self.seq + 1
        if cursor.seq + 1 < oldest:
            return PollResult(self.cursor, [], True)
        # Seqs in the log are contiguous, so the reader's position is an index.
        start = cursor.seq + 1 - oldest
        entries = [entry for _, entry in islice(self._entries, start, None)]
        return PollResult(self.cursor, entries, False)
