"""ShardState: load leases (single flight), stale loads dropped, invalidation ends leases."""

from __future__ import annotations

from app.cache.invalidation import invalidation
from app.cache.shard import ShardState


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_lease_per_key_until_set_or_expiry() -> None:
    clock = Clock()
    shard = ShardState(100, 10_000, lease_ttl_s=5, clock=clock)
    token = shard.lease("k")
    assert token is not None and shard.lease("k") is None
    clock.now += 5
    second = shard.lease("k")
    assert second is not None and second != token
    assert shard.set("k", b"old", None, token) is False  # the expired lease's write is stale
    assert shard.set("k", b"v", 60, second) is True
    assert shard.get("k") == (b"v", 60) and shard.lease("k") is not None


def test_invalidation_removes_keys_ends_leases_and_is_logged() -> None:
    shard = ShardState(100, 10_000)
    shard.set("user:1", b"a", None)
    shard.set("user:2", b"b", None)
    shard.set("item:1", b"c", None)
    token = shard.lease("user:3")
    assert token is not None
    seq, removed = shard.invalidate(invalidation("prefix", "user:"))
    assert seq == 1 and sorted(removed) == ["user:1", "user:2"]
    assert shard.set("user:3", b"stale", None, token) is False
    assert shard.get("user:1") is None and shard.get("item:1") == (b"c", None)
    assert [e.text for e in shard.poll(shard.log.cursor._replace(seq=0)).entries] == ["user:"]


def test_byte_bound_counts_value_bytes() -> None:
    shard = ShardState(100, 10)
    shard.set("a", b"12345", None)
    shard.set("b", b"123456", None)
    assert shard.stats()["entries"] == 1 and shard.stats()["evictions"] == 1
