"""The KV store's operations on a real Ray cluster: values, versions, TTL, scans, consistency
levels, large values (whole on the direct transport, refs on Ray calls), bad input, and clients
in other processes."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray

from app.kv import (
    InvalidArgumentError,
    InvalidKeyError,
    KeyTooLargeError,
    KVClient,
    UnknownConsistencyError,
    ValueNotSerializableError,
    key_slot,
)
from app.kv.cli import format_status, kv_status
from tests.integration.support import running_kv, wait_until

pytestmark = pytest.mark.integration

NAME, NAMESPACE = "kv-ops", "app-kv-tests"


@pytest.fixture(scope="module")
def kv(ray_cluster: Any) -> Iterator[KVClient]:
    with running_kv(NAME, expiry_sweep_interval_s=0.1, heartbeat_interval_ms=50) as client:
        yield client


def test_put_get_delete_and_versions(kv: KVClient) -> None:
    v1 = kv.put("ops:a", {"x": 1})
    assert kv.get("ops:a") == {"x": 1}
    assert kv.get("ops:missing") is None and kv.get("ops:missing", 7) == 7
    v2 = kv.put("ops:a", [1, 2, 3])
    assert v2 > v1 and kv.get_versioned("ops:a") == ([1, 2, 3], v2)
    assert kv.delete("ops:a") is True and kv.delete("ops:a") is False
    assert kv.get_versioned("ops:a") is None
    kv.put("ops:none", None)
    assert kv.get("ops:none", "default") is None  # a stored None is not a missing key


def test_compare_and_set(kv: KVClient) -> None:
    assert kv.cas("ops:cas", None, "first") == (True, kv.get_versioned("ops:cas")[1])  # type: ignore[index]
    _, version = kv.get_versioned("ops:cas")  # type: ignore[misc]
    assert kv.cas("ops:cas", None, "again") == (False, version)
    assert kv.cas("ops:cas", version + 100, "stale") == (False, version)
    ok, new = kv.cas("ops:cas", version, "second")
    assert ok and new > version and kv.get("ops:cas") == "second"
    kv.delete("ops:cas")
    assert kv.cas("ops:cas", new, "after delete") == (False, None)  # no ABA


def test_mget_mset_span_both_groups(kv: KVClient) -> None:
    items = {f"ops:m{i}": i * i for i in range(200)}
    kv.mset(items)
    assert {key_slot(k) < 8192 for k in items} == {True, False}
    keys = [*items, "ops:nope"]
    assert kv.mget(keys, default=-1) == [*items.values(), -1]


def test_retried_request_id_applies_once(kv: KVClient) -> None:
    first = kv.put("ops:rid", "one", request_id="fixed-id-1")
    again = kv.put("ops:rid", "two", request_id="fixed-id-1")
    assert again == first and kv.get("ops:rid") == "one"
    assert kv.delete("ops:rid", request_id="fixed-id-2") is True
    assert kv.delete("ops:rid", request_id="fixed-id-2") is True  # same answer, not re-run


def test_ttl_expiry(kv: KVClient) -> None:
    kv.put("ops:ttl", "soon gone", ttl=0.3)
    kv.mset({"ops:ttl2": 1, "ops:ttl3": 2}, ttl=0.3)
    kv.put("ops:keep", "stays")
    assert kv.get("ops:ttl") == "soon gone"
    wait_until(lambda: kv.mget(["ops:ttl", "ops:ttl2", "ops:ttl3"]) == [None, None, None])
    assert kv.get("ops:keep") == "stays"
    kv.put("ops:ttl", "renewed")  # a write without ttl makes the key permanent again
    time.sleep(0.4)
    assert kv.get("ops:ttl") == "renewed"


def test_prefix_scan_is_paged_and_complete(kv: KVClient) -> None:
    keys = {f"scan:{i:03d}": i for i in range(250)}
    kv.mset(keys)
    kv.put("other:1", 1)
    seen: dict[str, Any] = {}
    cursor = None
    pages = 0
    while True:
        page = kv.scan("scan:", page_size=40, cursor=cursor)
        assert len(page.items) <= 40
        for key, value in page.items:
            assert key not in seen
            seen[key] = value
        pages += 1
        cursor = page.cursor
        if cursor is None:
            break
    assert seen == keys and pages >= 7
    assert dict(kv.scan_iter("scan:", page_size=100)) == keys
    tagged = {f"{{user9}}:{i}": i for i in range(30)}
    kv.mset(tagged)
    assert dict(kv.scan_iter("{user9}:", page_size=7)) == tagged


def test_consistency_levels(kv: KVClient) -> None:
    for write in ("one", "majority", "all"):
        kv.put(f"ops:w-{write}", write, write=write)
        assert kv.get(f"ops:w-{write}") == write
    kv.put("ops:repl", "r", write="all")  # every replica has it now
    assert kv.get("ops:repl", read="eventual") == "r"
    assert kv.mget(["ops:repl", "ops:w-one"], read="eventual") == ["r", "one"]
    # Bounded staleness: a replica that heard from its primary within the bound may answer.
    assert kv.get("ops:repl", max_lag_ms=5000) == "r"
    assert kv.get("ops:repl", read="bounded", max_lag_ms=0.001) == "r"  # falls back to primary
    kv.put("ops:async", "later", write="one")
    wait_until(lambda: kv.get("ops:async", read="eventual") == "later")
    status = kv_status(None, NAME, NAMESPACE)
    lags = [m["lag_ms"] for g in status["groups"] for m in g["members"]]
    assert all(lag >= 0 for lag in lags) and status["keys"] > 0
    assert "primary" in format_status(status)


def test_large_values_round_trip_whole_and_in_batches(kv: KVClient) -> None:
    array = np.random.default_rng(0).random(131072)  # 1 MiB
    kv.put("ops:big", array)
    got = kv.get("ops:big")
    assert isinstance(got, np.ndarray) and np.array_equal(got, array)
    kv.mset({"ops:big2": array * 2, "ops:small": 1})
    big2, small = kv.mget(["ops:big2", "ops:small"])
    assert np.array_equal(big2, array * 2) and small == 1
    assert kv.get("ops:big2", read="eventual") is not None
    blob = b"x" * 200_000
    kv.put("ops:bytes", blob)
    assert kv.get("ops:bytes") == blob


def test_large_value_outlives_its_writer(kv: KVClient) -> None:
    """Members keep the writer's ref (no copy per put); once the writer is gone, readers get
    the value through a ref the primary re-owns, by every read path."""

    @ray.remote(num_cpus=0)
    class Writer:
        def write(self, client: KVClient) -> int:
            client.mset({f"ops:orphan{i}": np.arange(100_000) + i for i in range(4)})
            return client.put("ops:orphan", np.arange(100_000))

    writer = Writer.remote()  # type: ignore[attr-defined]
    ray.get(writer.write.remote(kv))  # the client pickles by name and reconnects there
    ray.kill(writer)  # the process that called ray.put on the values is gone now
    wait_until(lambda: _dead(writer))
    assert np.array_equal(kv.get("ops:orphan", read="eventual"), np.arange(100_000))
    assert np.array_equal(kv.get("ops:orphan"), np.arange(100_000))
    versioned = kv.get_versioned("ops:orphan")
    assert versioned is not None and np.array_equal(versioned[0], np.arange(100_000))
    values = kv.mget([f"ops:orphan{i}" for i in range(4)])
    assert all(np.array_equal(v, np.arange(100_000) + i) for i, v in enumerate(values))
    scanned = dict(kv.scan_iter("ops:orphan"))
    assert len(scanned) == 5 and np.array_equal(scanned["ops:orphan3"], np.arange(100_000) + 3)


def _dead(handle: Any) -> bool:
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=1)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_bad_input_raises_specific_errors(kv: KVClient) -> None:
    with pytest.raises(ValueNotSerializableError):
        kv.put("ops:bad", threading.Lock())
    with pytest.raises(KeyTooLargeError):
        kv.put("k" * 5000, 1)
    with pytest.raises(InvalidKeyError):
        kv.get(123)  # type: ignore[arg-type]
    with pytest.raises(UnknownConsistencyError):
        kv.get("ops:a", read="sequential")
    with pytest.raises(UnknownConsistencyError):
        kv.put("ops:a", 1, write="two")
    with pytest.raises(InvalidArgumentError):
        kv.put("ops:a", 1, ttl=-1)
    assert kv.get("ops:bad") is None


def test_async_client_inside_an_actor(kv: KVClient) -> None:
    @ray.remote(num_cpus=0)
    class Service:
        async def run(self, name: str, namespace: str) -> list[Any]:
            from app.kv import KVClient

            client = await KVClient.aconnect(name, namespace)
            await client.aput("ops:actor", "hello")
            await client.amset({"ops:actor2": 2, "ops:actor3": 3})
            page = await client.ascan("ops:actor", page_size=10)
            return [
                await client.aget("ops:actor"),
                await client.amget(["ops:actor2", "ops:actor3"]),
                await client.acas("ops:actor", None, "x"),
                await client.adelete("ops:actor3"),
                sorted(k for k, _ in page.items),
                client.transport_stats(),
            ]

    service = Service.remote()  # type: ignore[attr-defined]
    try:
        result = ray.get(service.run.remote(NAME, NAMESPACE), timeout=60)
    finally:
        ray.kill(service)
    assert result[0] == "hello" and result[1] == [2, 3]
    assert result[2][0] is False and result[3] is True
    assert result[4] == ["ops:actor", "ops:actor2", "ops:actor3"]
    assert result[5]["direct_calls"] >= 6 and result[5]["fallbacks"] == 0  # asyncio goes direct
    assert kv.get("ops:actor3") is None


def test_direct_transport_and_ray_calls_answer_alike(kv: KVClient) -> None:
    """The synchronous client's calls go over the direct transport; a client configured
    without it makes Ray actor calls. Both see the same data, small and large, and the same
    redirects and errors."""
    ray_only = KVClient.connect(NAME, NAMESPACE, direct=False)
    before = kv.transport_stats()["direct_calls"]
    array = np.arange(150_000, dtype=np.int64)  # large: stored as a ref, read back by value
    small = {f"parity:{i}": {"i": i} for i in range(40)}
    kv.mset(small | {"parity:big": array})
    version = kv.put("parity:one", "x")
    for client in (kv, ray_only):
        values = client.mget([*small, "parity:big", "parity:none"], default="-")
        assert values[:40] == list(small.values()) and values[-1] == "-"
        assert np.array_equal(values[40], array)
        assert np.array_equal(client.get("parity:big"), array)
        assert client.get_versioned("parity:one") == ("x", version)
        assert client.get("parity:3", read="eventual") in ({"i": 3}, None)
        with pytest.raises(InvalidArgumentError):
            client.put("parity:one", 1, ttl=0)
    ok, new = kv.cas("parity:one", version, "y")
    assert ok and ray_only.cas("parity:one", version, "z") == (False, new)
    assert ray_only.transport_stats()["direct_calls"] == 0
    assert kv.transport_stats()["direct_calls"] - before >= 8
    assert kv.transport_stats()["fallbacks"] == 0


def test_large_values_written_whole_serve_every_reader_and_move_with_their_slot(
    kv: KVClient,
) -> None:
    """The direct client writes large values whole (no ray.put): the primary holds them and
    replicates them whole. A Ray-only reader then needs a ref, which the member makes on that
    first read; values written as refs by a Ray-only writer read back whole on the direct path;
    a slot migration moves both kinds."""
    ray_only = KVClient.connect(NAME, NAMESPACE, direct=False)
    whole, as_ref = np.arange(40_000) * 3, np.arange(40_000) * 5  # 320 KB each: large
    key_a = next(k for k in (f"whole:{i}" for i in range(1000)) if kv.group_of(k) == 0)
    key_b = next(k for k in (f"ref:{i}" for i in range(1000)) if kv.group_of(k) == 0)
    kv.put(key_a, whole)
    ray_only.put(key_b, as_ref)
    for client in (kv, ray_only):
        assert np.array_equal(client.get(key_a), whole)
        assert np.array_equal(client.get(key_b), as_ref)
        wait_until(lambda c=client: c.get(key_a, read="eventual") is not None)  # type: ignore[misc]
        for _ in range(8):  # a random member each time: replicas answer too
            assert np.array_equal(client.get(key_a, read="eventual"), whole)
    ok, version = kv.cas(key_a, kv.get_versioned(key_a)[1], whole + 1)  # type: ignore[index]
    assert ok and np.array_equal(ray_only.get(key_a), whole + 1)
    slots = sorted({key_slot(key_a), key_slot(key_b)})
    assert kv.move_slots(slots, 1) == len(slots)
    kv.refresh()
    ray_only.refresh()
    assert kv.group_of(key_a) == kv.group_of(key_b) == 1
    for client in (kv, ray_only):
        assert np.array_equal(client.get(key_a), whole + 1)
        assert np.array_equal(client.get(key_b), as_ref)
    assert kv.get_versioned(key_a)[1] == version  # type: ignore[index]


class _Reading:
    """Stands for a class defined in a user's script: made to look like `__main__.Reading`,
    which the shard processes (whose __main__ is Ray's worker) cannot import."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values


def test_large_value_of_a_class_only_the_writer_can_import(kv: KVClient) -> None:
    """Plain pickle cannot carry it to a member, so each such call goes through Ray, whose
    cloudpickle sends __main__ classes by value: writes, replication and reads still work,
    and the transport is not marked as failing."""
    main = sys.modules["__main__"]
    _Reading.__module__, _Reading.__qualname__ = "__main__", "Reading"
    main.Reading = _Reading  # type: ignore[attr-defined]
    try:
        client = KVClient.connect(NAME, NAMESPACE)
        value = _Reading(np.arange(30_000, dtype=np.float64))  # 240 KB: a large value
        client.put("main:reading", value)
        client.mset({"main:r2": _Reading(np.ones(30_000))})
        got = client.get("main:reading")
        assert type(got) is _Reading and np.array_equal(got.values, value.values)
        both = client.mget(["main:reading", "main:r2"])
        assert np.array_equal(both[1].values, np.ones(30_000))
        for _ in range(6):  # any member, replicas included
            eventual = client.get("main:reading", read="eventual")
            assert eventual is None or np.array_equal(eventual.values, value.values)
        assert client.transport_stats()["fallbacks"] == 0
    finally:
        del main.Reading  # type: ignore[attr-defined]
        _Reading.__module__, _Reading.__qualname__ = __name__, "_Reading"


def test_asyncio_run_per_call_does_not_pile_up_connections(kv: KVClient) -> None:
    """Each asyncio.run makes a loop and closes it: the direct clients of closed loops are
    closed and dropped when the next loop comes, so members do not keep their connections."""
    kv.put("loops:k", "v")
    for _ in range(4):
        assert asyncio.run(kv.aget("loops:k")) == "v"
    assert len(kv._adirect) == 1  # only the last loop's client is left
    kv.close()  # its loop is closed as well: ends the connections without raising
    assert kv.get("loops:k") == "v"  # the synchronous pool refills on demand
