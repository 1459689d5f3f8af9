"""Durability on real Ray: a cluster restarted on the same directory gets its data back,
including writes made after a failover moved the write-ahead log to a new primary, and past a
corrupt snapshot; its files are private to the user running it."""

from __future__ import annotations

import shutil
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from app.kv import KVClient, KVConfig, WALSync, key_slot, shutdown_kv, start_kv

pytestmark = pytest.mark.integration

NAME, NAMESPACE = "kv-durable", "app-kv-tests"


def _config(directory: Path) -> KVConfig:
    return KVConfig(
        name=NAME,
        namespace=NAMESPACE,
        num_shards=2,
        replication_factor=2,
        allow_colocated_replicas=True,
        durable=True,
        data_dir=str(directory),
        snapshot_every_ops=50,
    )


def _restart(directory: Path) -> KVClient:
    shutdown_kv(NAME, NAMESPACE)
    return start_kv(_config(directory))


def test_restart_on_the_same_directory_recovers_data(ray_cluster: Any, tmp_path: Path) -> None:
    kv = start_kv(_config(tmp_path))
    try:
        data = {f"d:{i}": {"n": i} for i in range(300)}
        kv.mset(data)  # enough writes for several snapshots per group
        for i in range(0, 300, 10):
            kv.delete(f"d:{i}")
            del data[f"d:{i}"]
        kv.put("d:big", np.arange(50_000))
        kv.put("d:ttl", "kept", ttl=3600)
        versioned = kv.get_versioned("d:1")

        kv = _restart(tmp_path)
        assert kv.mget(list(data)) == list(data.values())
        assert kv.get("d:0") is None and kv.get("d:ttl") == "kept"
        assert np.array_equal(kv.get("d:big"), np.arange(50_000))
        assert kv.get_versioned("d:1") == versioned
        assert kv.put("d:1", "newer") > versioned[1]  # type: ignore[index]

        # Fail over group 0, write through the new primary, restart: nothing is lost.
        coordinator = ray.get_actor(NAME, namespace=NAMESPACE)
        ray.kill(ray.get(coordinator.get_map.remote()).groups[0].primary, no_restart=True)
        after = {k: f"after-{k}" for k in (f"f:{i}" for i in range(60))}
        kv.mset(after)
        assert {kv.group_of(k) for k in after} == {0, 1}

        kv = _restart(tmp_path)
        assert kv.mget(list(after)) == list(after.values())
        assert kv.get("d:1") == "newer" and kv.get("d:2") == {"n": 2}
        assert dict(kv.scan_iter("f:", page_size=25)) == after
    finally:
        shutdown_kv(NAME, NAMESPACE)


def test_a_fresh_directory_starts_empty(ray_cluster: Any, tmp_path: Path) -> None:
    kv = start_kv(_config(tmp_path))
    try:
        assert kv.get("d:1") is None
        started = time.monotonic()
        kv.put("x", 1)
        assert time.monotonic() - started < 30
        assert (tmp_path / NAME / "cluster.json").exists()
        # Every member logs, each in its own directory.
        logs = list((tmp_path / NAME).glob(f"group-{kv.group_of('x')}/*/wal-*.log"))
        assert len({log.parent for log in logs}) == 2
        assert key_slot("x") >= 0
    finally:
        shutdown_kv(NAME, NAMESPACE)


def test_replica_logs_stand_in_for_a_lost_primary_disk(ray_cluster: Any, tmp_path: Path) -> None:
    kv = start_kv(_config(tmp_path))
    try:
        data = {f"r:{i}": i for i in range(200)}
        kv.mset(data)
        kv.put("r:big", np.arange(50_000))
        for group in kv.status()["groups"]:
            primary = next(m for m in group["members"] if m["role"] == "primary")
            shutil.rmtree(tmp_path / NAME / f"group-{group['gid']}" / primary["member"])

        kv = _restart(tmp_path)  # every member is new: only the old replicas' logs are left
        assert kv.mget(list(data)) == list(data.values())
        assert np.array_equal(kv.get("r:big"), np.arange(50_000))
    finally:
        shutdown_kv(NAME, NAMESPACE)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_directories_are_private(ray_cluster: Any, tmp_path: Path) -> None:
    """0700 directories and 0600 files, whatever the members' umask."""
    kv = start_kv(_config(tmp_path / "data"))
    try:
        kv.mset({f"p:{i}": i for i in range(120)})  # past a snapshot in each group
        root = tmp_path / "data" / NAME
        directories = [root, *(p for p in root.rglob("*") if p.is_dir())]
        files = [p for p in root.rglob("*") if p.is_file()]
        assert len(directories) >= 1 + 2 + 4  # the cluster, its groups, their members
        assert {_mode(d) for d in [tmp_path / "data", *directories]} == {0o700}
        assert any(p.name == "cluster.json" for p in files)
        assert any(p.suffix == ".log" for p in files) and any(p.suffix == ".pkl" for p in files)
        assert {_mode(p) for p in files} == {0o600}
    finally:
        shutdown_kv(NAME, NAMESPACE)


def test_a_corrupt_newest_snapshot_falls_back_to_the_previous_one(
    ray_cluster: Any, tmp_path: Path
) -> None:
    kv = start_kv(_config(tmp_path))
    try:
        data = {f"c:{i}": i for i in range(400)}
        for i in range(0, 400, 40):  # several calls: several snapshots per member
            kv.mset({k: data[k] for k in list(data)[i : i + 40]})
        shutdown_kv(NAME, NAMESPACE)
        corrupted = 0
        for member in (tmp_path / NAME).glob("group-*/*"):
            snaps = sorted(member.glob("snap-*.pkl"))
            if len(snaps) >= 2:  # the newest, and the previous one kept as its fallback
                raw = bytearray(snaps[-1].read_bytes())
                raw[len(raw) // 2] ^= 0xFF
                snaps[-1].write_bytes(bytes(raw))
                corrupted += 1
        assert corrupted >= 2

        kv = start_kv(_config(tmp_path))
        assert kv.mget(list(data)) == list(data.values())
    finally:
        shutdown_kv(NAME, NAMESPACE)


def test_writes_are_fsynced_by_default(ray_cluster: Any, tmp_path: Path) -> None:
    """The cluster runs with the safe default; a restart sees every acknowledged write."""
    config = _config(tmp_path)
    assert config.wal_fsync == WALSync.COMMIT
    kv = start_kv(config)
    try:
        for i in range(30):
            kv.put(f"s:{i}", i)
        kv = _restart(tmp_path)
        assert kv.mget([f"s:{i}" for i in range(30)]) == list(range(30))
    finally:
        shutdown_kv(NAME, NAMESPACE)
