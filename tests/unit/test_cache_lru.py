"""LRUStore: entry and byte bounds, recency, TTL on an injected clock, bad arguments."""

from __future__ import annotations

import threading

import pytest

from app.cache.lru import CacheArgumentError, LRUStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entry_bound_evicts_least_recently_used() -> None:
    store = LRUStore(max_entries=2, max_bytes=1000)
    store.set("a", 1, 1)
    store.set("b", 2, 1)
    assert store.get("a") == 1  # a is now the most recent
    store.set("c", 3, 1)
    assert "b" not in store and store.get("a") == 1 and store.get("c") == 3
    assert store.evictions == 1


def test_byte_bound_evicts_until_it_fits() -> None:
    store = LRUStore(max_entries=100, max_bytes=10)
    for key in "abcd":
        store.set(key, key, 3)
    assert store.lru_order() == ["b", "c", "d"] and store.bytes == 9
    store.set("big", "x", 9)
    assert store.lru_order() == ["big"] and store.bytes == 9 and store.evictions == 4


def test_value_larger_than_the_bound_is_not_stored_and_replaces_nothing() -> None:
    store = LRUStore(max_entries=10, max_bytes=10)
    store.set("a", 1, 5)
    assert store.set("huge", 2, 11) is False
    assert store.get("huge") is None and store.get("a") == 1 and store.bytes == 5


def test_overwrite_updates_size() -> None:
    store = LRUStore(max_entries=10, max_bytes=100)
    store.set("a", 1, 40)
    store.set("a", 2, 10)
    assert store.bytes == 10 and store.get("a") == 2


def test_ttl_expires_exactly_on_time() -> None:
    clock = Clock()
    store = LRUStore(10, 100, clock=clock)
    store.set("k", "v", 1, ttl_s=5)
    store.set("forever", "v", 1)
    clock.now += 4.999
    assert store.entry("k") == ("v", pytest.approx(0.001))
    clock.now += 0.001
    assert store.get("k", "gone") == "gone"
    assert store.expirations == 1 and len(store) == 1 and store.bytes == 1
    clock.now += 1e9
    assert store.entry("forever") == ("v", None)


def test_sweep_drops_expired_entries() -> None:
    clock = Clock()
    store = LRUStore(10, 100, clock=clock)
    store.set("a", 1, 1, ttl_s=1)
    store.set("b", 1, 1, ttl_s=10)
    clock.now += 2
    assert store.sweep() == 1 and store.lru_order() == ["b"]


def test_delete_where_and_clear() -> None:
    store = LRUStore(10, 100)
    for key in ("user:1", "user:2", "item:1"):
        store.set(key, key, 2)
    assert store.delete_where(lambda k: k.startswith("user:")) == 2
    assert store.lru_order() == ["item:1"] and store.bytes == 2
    assert store.clear() == 1 and store.bytes == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_entries": 0, "max_bytes": 1}, "max_entries"),
        ({"max_entries": 1, "max_bytes": 0}, "max_bytes"),
    ],
)
def test_bad_bounds_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(CacheArgumentError, match=message):
        LRUStore(**kwargs)


def test_bad_ttl_and_size_are_rejected() -> None:
    store = LRUStore(10, 100)
    with pytest.raises(CacheArgumentError, match="ttl_s"):
        store.set("k", 1, 1, ttl_s=0)
    with pytest.raises(CacheArgumentError, match="size"):
        store.set("k", 1, -1)


def test_concurrent_threads_keep_the_bounds() -> None:
    store = LRUStore(max_entries=50, max_bytes=10_000)

    def work(offset: int) -> None:
        for i in range(2000):
            store.set(f"{offset}:{i % 80}", i, 7)
            store.get(f"{offset}:{(i * 7) % 80}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store) == 50 and store.bytes == 50 * 7
