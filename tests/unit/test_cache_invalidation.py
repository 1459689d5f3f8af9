"""Invalidation matching and the sequenced log: replay, trimming and epochs force a flush."""

from __future__ import annotations

import pytest

from app.cache.invalidation import Cursor, InvalidationLog, Scope, invalidation
from app.cache.lru import CacheArgumentError


@pytest.mark.parametrize(
    ("scope", "text", "key", "hit"),
    [
        ("key", "a:1", "a:1", True),
        ("key", "a:1", "a:10", False),
        ("prefix", "a:", "a:10", True),
        ("prefix", "a:", "b:a:", False),
        ("glob", "user:*:name", "user:7:name", True),
        ("glob", "user:?", "user:10", False),
        ("all", "", "anything", True),
    ],
)
def test_matching(scope: str, text: str, key: str, hit: bool) -> None:
    assert invalidation(scope, text).matches(key) is hit


def test_bad_invalidations_are_rejected() -> None:
    with pytest.raises(CacheArgumentError, match="unknown invalidation scope"):
        invalidation("regex", "a.*")
    with pytest.raises(CacheArgumentError, match="empty prefix"):
        invalidation("prefix", "")


def test_reader_replays_what_it_missed() -> None:
    log = InvalidationLog(capacity=10, epoch="e1")
    start = log.since(None)
    assert start.cursor == Cursor("e1", 0) and start.entries == [] and not start.flush
    log.append(invalidation("key", "a"))
    log.append(invalidation("prefix", "b:"))
    result = log.since(start.cursor)
    assert [e.text for e in result.entries] == ["a", "b:"] and result.cursor.seq == 2
    assert log.since(result.cursor).entries == []


def test_trimmed_entries_and_new_epochs_force_a_flush() -> None:
    log = InvalidationLog(capacity=2, epoch="e1")
    for key in "abc":
        log.append(invalidation(Scope.KEY, key))
    assert log.since(Cursor("e1", 0)).flush  # entry 1 was trimmed
    ok = log.since(Cursor("e1", 1))
    assert not ok.flush and [e.text for e in ok.entries] == ["b", "c"]
    assert log.since(Cursor("old-epoch", 3)).flush
