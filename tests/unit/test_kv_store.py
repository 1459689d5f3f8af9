"""The shard state machine: versions, TTL on an injected clock, request ids, scans, snapshots."""

from __future__ import annotations

import pytest

from app.kv.slots import key_slot
from app.kv.store import OP_DELETE, OP_PUT, OP_REQUESTS, OP_SLOTS, SLOT_OWNED, Op, ShardStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _put(
    store: ShardStore, key: str, value: bytes, ttl: float | None = None, rid: str | None = None
) -> int:
    version = store.next_version()
    store.apply(
        Op(
            store.seq + 1,
            OP_PUT,
            key,
            key_slot(key),
            value,
            version,
            store.expires_at(ttl),
            rid,
            version,
        )
    )
    return version


def test_put_get_delete_and_sizes() -> None:
    store = ShardStore()
    _put(store, "a", b"12345")
    _put(store, "b", b"xy")
    assert store.get("a").payload == b"12345"  # type: ignore[union-attr]
    assert len(store) == 2 and store.bytes == 7
    removed = store.apply(Op(store.seq + 1, OP_DELETE, "a"))
    assert removed is not None and store.get("a") is None
    assert store.bytes == 2 and store.seq == 3


def test_versions_never_repeat_across_delete_and_recreate() -> None:
    store = ShardStore()
    v1 = _put(store, "k", b"1")
    store.apply(Op(store.seq + 1, OP_DELETE, "k"))
    v2 = _put(store, "k", b"2")
    assert v2 > v1  # a CAS holding v1 cannot succeed against the new key (no ABA)
    # Imported entries raise the counter too.
    store.apply(Op(store.seq + 1, OP_PUT, "m", key_slot("m"), b"x", 500))
    assert _put(store, "n", b"y") == 501


def test_log_must_be_applied_in_order() -> None:
    store = ShardStore()
    with pytest.raises(ValueError, match="log gap"):
        store.apply(Op(2, OP_PUT, "k", 0, b"", 1))


def test_ttl_uses_the_injected_clock() -> None:
    clock = Clock()
    store = ShardStore(clock)
    _put(store, "short", b"1", ttl=5)
    _put(store, "long", b"2", ttl=50)
    _put(store, "forever", b"3")
    clock.now += 10
    assert store.get("short") is None  # hidden at once, before any sweep
    assert store.raw("short") is not None
    dropped = store.expire()
    assert [e.payload for e in dropped] == [b"1"]
    assert store.get("long") is not None and store.get("forever") is not None
    clock.now += 100
    assert len(store.expire()) == 1 and len(store) == 1


def test_rewriting_a_key_cancels_its_old_expiry() -> None:
    clock = Clock()
    store = ShardStore(clock)
    _put(store, "k", b"1", ttl=5)
    _put(store, "k", b"2")
    clock.now += 10
    assert store.expire() == [] and store.get("k") is not None


def test_request_ids_are_remembered_within_the_window() -> None:
    store = ShardStore(dedupe_window=2)
    _put(store, "a", b"1", rid="r1")
    assert store.seen("r1") == (1, 1)
    _put(store, "b", b"1", rid="r2")
    _put(store, "c", b"1", rid="r3")
    assert store.seen("r1") is None and store.seen("r3") == (3, 3)


def test_scan_pages_in_slot_then_key_order() -> None:
    clock = Clock()
    store = ShardStore(clock)
    keys = [f"user:{i}" for i in range(30)] + ["other"]
    for key in keys:
        _put(store, key, key.encode())
    _put(store, "user:expiring", b"x", ttl=1)
    clock.now += 2
    seen: list[str] = []
    first, after = 0, None
    while True:
        items, nxt = store.scan("user:", first, 16383, after, 7)
        seen.extend(k for k, _ in items)
        assert len(items) <= 7
        if nxt is None:
            break
        first, after = nxt
    assert sorted(seen) == sorted(k for k in keys if k.startswith("user:"))
    assert seen == sorted(seen, key=lambda k: (key_slot(k), k))


def test_slot_states_and_keys_by_slot() -> None:
    store = ShardStore()
    store.apply(Op(1, OP_SLOTS, payload=([1, 2, 3], SLOT_OWNED, None)))
    assert store.slot_state[2] == SLOT_OWNED and store.slot_state[4] == 0
    for i in range(20):
        _put(store, f"{{t}}{i}", b"v")
    slot = key_slot("{t}")
    assert len(store.keys_in_slot(slot)) == 20
    assert len(store.keys_in_slots({slot}, 5)) == 5
    assert store.slot_keys() == {slot: 20}


def test_request_ids_move_with_their_slots() -> None:
    src, dst = ShardStore(), ShardStore()
    _put(src, "{a}1", b"1", rid="r1")
    _put(src, "{b}1", b"1", rid="r2")
    moving = src.requests_in_slots({key_slot("{a}")})
    assert moving == [("r1", 1, key_slot("{a}"))]
    _put(dst, "x", b"1", rid="r1-other")
    dst.apply(Op(dst.seq + 1, OP_REQUESTS, payload=tuple(moving)))
    assert dst.seen("r1") == (dst.seq, 1)  # answered at the seq that brought it in
    assert dst.seen("r2") is None
    dst.apply(Op(dst.seq + 1, OP_REQUESTS, payload=(("r1", 99, 0),)))
    assert dst.seen("r1") == (2, 1)  # a replayed import keeps the first answer


def test_snapshot_install_round_trip() -> None:
    clock = Clock()
    src = ShardStore(clock)
    src.apply(Op(1, OP_SLOTS, payload=([5], SLOT_OWNED, None)))
    for i in range(10):
        _put(src, f"k{i}", str(i).encode(), ttl=100 if i % 2 else None, rid=f"r{i}")
    snap = src.snapshot()
    dst = ShardStore(clock)
    _put(dst, "stale", b"gone")
    dropped = dst.install(snap)
    assert [e.payload for e in dropped] == [b"gone"]
    assert dst.seq == src.seq and dst.vclock == src.vclock
    assert {k: dst.get(k).payload for k in (f"k{i}" for i in range(10))} == {  # type: ignore[union-attr]
        f"k{i}": str(i).encode() for i in range(10)
    }
    assert dst.slot_state[5] == SLOT_OWNED and dst.seen("r3") == src.seen("r3")
    clock.now += 200
    assert len(dst.expire()) == 5
