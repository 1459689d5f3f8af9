"""KV store benchmark: app.kv against a bare Ray actor holding a dict and a local redis-server.

One run, one machine, same process for every client:
  * single-key synchronous get and put,
  * mget of 100 keys (redis-py: a pipeline of 100 GETs), synchronous and with 8 batches in flight,
  * 1 MiB numpy arrays: put and get (value deserialised by the reader), single and 8 per batch,
  * failover: from ray.kill of a shard primary to the first acknowledged majority write,
  * coordinator restart: from ray.kill of the coordinator (Ray restarts it) to its first answer,
    the slot map it rebuilt from the members.
It starts its own local Ray (never joins another) and its own redis-server on a free port, and
stops both. The KV cluster is 2 shard groups x 3 members (majority writes, strong reads).

    python benchmarks/kv_bench.py [--seconds 1.5] [--out benchmarks/results/kv.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402

from app.kv import KVClient, KVConfig, key_slot, shutdown_kv, start_kv  # noqa: E402

MIB_ARRAY = np.random.default_rng(0).random(131072)  # 1 MiB of float64
KEYS = [f"bench:{i}" for i in range(100)]
INFLIGHT = 8


@dataclass
class Result:
    name: str
    system: str
    unit: str  # what one "op" is: "op", "key", "value"
    per_op: int  # units per timed call
    rate: float  # units per second
    p50_ms: float
    p99_ms: float


def measure(call: Callable[[], Any], seconds: float, warmup: int = 20) -> tuple[float, list[float]]:
    """Calls per second of `call` (synchronous, one at a time) and each call's latency."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 30:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return len(latencies) / (time.perf_counter() - start), latencies


async def inflight(call: Callable[[], Awaitable[Any]], seconds: float) -> tuple[float, list[float]]:
    """Calls per second with INFLIGHT calls outstanding at all times, and their latencies."""
    latencies: list[float] = []
    await asyncio.gather(*[call() for _ in range(INFLIGHT)])  # warm-up
    start = time.perf_counter()

    async def worker() -> None:
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*[worker() for _ in range(INFLIGHT)])
    return len(latencies) / (time.perf_counter() - start), latencies


def measure_async(call: Callable[[], Awaitable[Any]], seconds: float) -> tuple[float, list[float]]:
    return asyncio.run(inflight(call, seconds))


def result(
    name: str, system: str, unit: str, per_op: int, rate_lat: tuple[float, list[float]]
) -> Result:
    rate, lat = rate_lat
    lat_ms = sorted(x * 1000 for x in lat)
    p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))]
    return Result(name, system, unit, per_op, rate * per_op, statistics.median(lat_ms), p99)


def compare(
    name: str,
    unit: str,
    per_op: int,
    calls: dict[str, Callable[[], Any]],
    seconds: float,
    rounds: int = 3,
    inflight_mode: bool = False,
) -> list[Result]:
    """Measure every system in `calls`, interleaved over `rounds` rounds, so a change in
    background load during the run affects all of them alike."""
    runs: dict[str, list[tuple[float, list[float]]]] = {system: [] for system in calls}
    for _ in range(rounds):
        for system, call in calls.items():
            rate_lat = (
                measure_async(call, seconds / rounds)
                if inflight_mode
                else measure(call, seconds / rounds, warmup=3)
            )
            runs[system].append(rate_lat)
    out = []
    for system, parts in runs.items():
        latencies = [x for _, lat in parts for x in lat]
        total_time = sum(len(lat) / rate for rate, lat in parts)
        out.append(result(name, system, unit, per_op, (len(latencies) / total_time, latencies)))
    return out


@ray.remote(num_cpus=0)
class BareDict:
    """The baseline: a plain (synchronous) Ray actor holding a dict."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value

    def mget(self, keys: list[str]) -> list[Any]:
        return [self.data.get(k) for k in keys]

    def mset(self, items: dict[str, Any]) -> None:
        self.data.update(items)


# Redis ---------------------------------------------------------------------------------------
def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not found (apt-get install -y redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


def redis_pipeline_get(client: redis.Redis, keys: list[str]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    return pipe.execute()


def redis_mget_arrays(client: redis.Redis, keys: list[str]) -> list[Any]:
    return [pickle.loads(v) for v in client.mget(keys)]  # type: ignore[arg-type]


def redis_put_array(client: redis.Redis, key: str, value: Any) -> None:
    client.set(key, pickle.dumps(value, protocol=5))


def redis_get_array(client: redis.Redis, key: str) -> Any:
    return pickle.loads(client.get(key))  # type: ignore[arg-type]


# Workloads -----------------------------------------------------------------------------------
def small_ops(
    kv: KVClient, kv_ray: KVClient, bare: Any, rds: redis.Redis, seconds: float
) -> list[Result]:
    small = b"x" * 64
    rds.mset({k: small for k in KEYS})
    ray.get(bare.mset.remote({k: small for k in KEYS}))
    kv.mset({k: small for k in KEYS})
    gets = {
        "bare actor": lambda: ray.get(bare.get.remote("bench:1")),
        "redis-py": lambda: rds.get("bench:1"),
        "app.kv": lambda: kv.get("bench:1"),
        "app.kv, Ray calls": lambda: kv_ray.get("bench:1"),
    }
    puts = {
        "bare actor": lambda: ray.get(bare.put.remote("bench:1", small)),
        "redis-py": lambda: rds.set("bench:1", small),
        "app.kv": lambda: kv.put("bench:1", small),
        "app.kv, Ray calls": lambda: kv_ray.put("bench:1", small),
    }
    return compare("get (sync)", "op", 1, gets, seconds) + compare(
        "put (sync)", "op", 1, puts, seconds
    )


def batch_ops(kv: KVClient, kv_ray: KVClient, bare: Any, port: int, seconds: float) -> list[Result]:
    rds = redis.Redis(port=port)
    sync = {
        "bare actor": lambda: ray.get(bare.mget.remote(KEYS)),
        "redis-py": lambda: redis_pipeline_get(rds, KEYS),
        "app.kv": lambda: kv.mget(KEYS),
        "app.kv, Ray calls": lambda: kv_ray.mget(KEYS),
    }
    out = compare("mget 100 (sync)", "key", 100, sync, seconds)
    inflight = {
        "bare actor": lambda: bare.mget.remote(KEYS),
        "app.kv": lambda: kv.amget(KEYS),
        "app.kv, Ray calls": lambda: kv_ray.amget(KEYS),
    }
    name = f"mget 100 ({INFLIGHT} in flight)"
    out += compare(name, "key", 100, inflight, seconds, inflight_mode=True)
    out.append(result(name, "redis-py", "key", 100, _redis_async_pipelines(port, seconds)))
    return out


def _redis_async_pipelines(port: int, seconds: float) -> tuple[float, list[float]]:
    async def run() -> tuple[float, list[float]]:
        client = aredis.Redis(port=port, max_connections=INFLIGHT)

        async def call() -> Any:
            pipe = client.pipeline(transaction=False)
            for key in KEYS:
                pipe.get(key)
            return await pipe.execute()

        try:
            return await inflight(call, seconds)
        finally:
            await client.aclose()

    return asyncio.run(run())


def large_ops(kv: KVClient, bare: Any, rds: redis.Redis, seconds: float) -> list[Result]:
    arr = MIB_ARRAY
    batch = {f"big:{i}": arr for i in range(8)}
    keys = list(batch)
    kv.put("big", arr)
    kv.mset(batch)
    ray.get(bare.put.remote("big", arr))
    ray.get(bare.mset.remote(batch))
    redis_put_array(rds, "big", arr)
    rds.mset({k: pickle.dumps(v, protocol=5) for k, v in batch.items()})
    workloads: list[tuple[str, int, dict[str, Callable[[], Any]]]] = [
        (
            "1 MiB put (sync)",
            1,
            {
                "bare actor": lambda: ray.get(bare.put.remote("big", arr)),
                "redis-py": lambda: redis_put_array(rds, "big", arr),
                "app.kv": lambda: kv.put("big", arr),
            },
        ),
        (
            "1 MiB get (sync)",
            1,
            {
                "bare actor": lambda: ray.get(bare.get.remote("big")),
                "redis-py": lambda: redis_get_array(rds, "big"),
                "app.kv": lambda: kv.get("big"),
            },
        ),
        (
            "1 MiB put, 8 per batch",
            8,
            {
                "bare actor": lambda: ray.get(bare.mset.remote(batch)),
                "redis-py": lambda: rds.mset(
                    {k: pickle.dumps(v, protocol=5) for k, v in batch.items()}
                ),
                "app.kv": lambda: kv.mset(batch),
            },
        ),
        (
            "1 MiB get, 8 per batch",
            8,
            {
                "bare actor": lambda: ray.get(bare.mget.remote(keys)),
                "redis-py": lambda: redis_mget_arrays(rds, keys),
                "app.kv": lambda: kv.mget(keys),
            },
        ),
    ]
    out = []
    for name, per_op, calls in workloads:
        out += compare(name, "value", per_op, calls, seconds)
    return out


def failover_times(kv: KVClient, trials: int) -> list[float]:
    """Seconds from ray.kill of a primary to the first acknowledged majority write on its group."""
    coordinator = ray.get_actor(kv.config.name, namespace=kv.config.namespace)
    times: list[float] = []
    for trial in range(trials):
        _wait_fully_replicated(kv)
        kv.refresh()
        gid = trial % 2
        probe = next(k for k in (f"probe:{i}" for i in range(10_000)) if kv.group_of(k) == gid)
        kv.put(probe, "before")
        view: Any = ray.get(coordinator.get_map.remote())
        victim = view.groups[gid].primary
        start = time.perf_counter()
        ray.kill(victim, no_restart=True)
        # ray.kill returns before the process is gone, and a direct-transport write could
        # still be acknowledged by the old primary (and its replicas) meanwhile: wait for the
        # death, so the write below measures a failover.
        while not _dead(victim):
            pass
        kv.put(probe, trial)  # the client retries through the failover on its own
        times.append(time.perf_counter() - start)
        assert kv.get(probe) == trial and key_slot(probe) >= 0
    return times


def _dead(handle: Any) -> bool:
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=1)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


def coordinator_restart_times(kv: KVClient, trials: int) -> list[float]:
    """Seconds from ray.kill of the coordinator (restarted by Ray, no data directory) to the
    map it rebuilt from the members; each must equal the map before the kill."""
    coordinator = ray.get_actor(kv.config.name, namespace=kv.config.namespace)
    times: list[float] = []
    for _ in range(trials):
        _wait_fully_replicated(kv)
        before: Any = ray.get(coordinator.get_map.remote())
        start = time.perf_counter()
        ray.kill(coordinator, no_restart=False)
        # Calls are retried until it is back; the old process may still answer the first.
        after: Any = before
        while after.epoch == before.epoch:
            after = ray.get(coordinator.get_map.remote())
        times.append(time.perf_counter() - start)
        assert after.owners == before.owners and after.epoch > before.epoch
    return times


def _wait_fully_replicated(kv: KVClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = kv.status()["groups"]
        if all(
            len(g["members"]) == g["size"] and all("error" not in m for m in g["members"])
            for g in groups
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("replicas were not restored in time")


# Report --------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next(
        (int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal")), 0
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True
    ).stdout.split()[2]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "ray": ray.__version__,
        "redis-server": redis_version.removeprefix("v="),
        "redis-py": redis.__version__,
    }


def _ratio(results: list[Result], name: str, baseline: str) -> float:
    rates = {r.system: r.rate for r in results if r.name == name}
    return rates["app.kv"] / rates[baseline]


def report(
    results: list[Result],
    failover: list[float],
    restarts: list[float],
    info: dict[str, str],
    load: tuple[str, str],
) -> str:
    lines = ["# KV store benchmark (benchmarks/kv_bench.py)", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- load average before / after: {load[0]} / {load[1]}", ""]
    lines += [
        "| workload | system | rate | p50 ms | p99 ms | app.kv ÷ this |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        mine = next(x.rate for x in results if x.name == r.name and x.system == "app.kv")
        ratio = "" if r.system == "app.kv" else f"{mine / r.rate:.2f}x"
        lines.append(
            f"| {r.name} | {r.system} | {r.rate:,.0f} {r.unit}/s | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {ratio} |"
        )
    lines += [
        "",
        f"Failover (kill → first acknowledged majority write), {len(failover)} trials: "
        + ", ".join(f"{t:.2f} s" for t in failover),
        "",
        f"Coordinator restart (kill → rebuilt slot map served), {len(restarts)} trials: "
        + ", ".join(f"{t:.2f} s" for t in restarts),
        "",
    ]
    lines += goal_table(results, failover)
    return "\n".join(lines) + "\n"


def goal_table(results: list[Result], failover: list[float]) -> list[str]:
    goals = [
        ("single get ≥ 0.8x bare actor", _ratio(results, "get (sync)", "bare actor"), 0.8),
        (
            "mget 100 ≥ 1.5x redis-py pipelined (sync)",
            _ratio(results, "mget 100 (sync)", "redis-py"),
            1.5,
        ),
        (
            f"mget 100 ≥ 1.5x redis-py pipelined ({INFLIGHT} in flight)",
            _ratio(results, f"mget 100 ({INFLIGHT} in flight)", "redis-py"),
            1.5,
        ),
    ]
    for name in (
        "1 MiB put (sync)",
        "1 MiB get (sync)",
        "1 MiB put, 8 per batch",
        "1 MiB get, 8 per batch",
    ):
        goals.append((f"{name} ≥ 2x redis-py", _ratio(results, name, "redis-py"), 2.0))
    lines = ["| goal | measured | met |", "|---|---:|:-:|"]
    for name, value, target in goals:
        lines.append(f"| {name} | {value:.2f}x | {'yes' if value >= target else 'no'} |")
    worst = max(failover) if failover else float("nan")
    lines.append(f"| failover < 2 s | max {worst:.2f} s | {'yes' if worst < 2 else 'no'} |")
    return lines


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=1.5, help="Time per system and workload (3 rounds)."
    )
    parser.add_argument("--failovers", type=int, default=3, help="Failover trials.")
    parser.add_argument("--restarts", type=int, default=2, help="Coordinator restart trials.")
    parser.add_argument("--verbose", action="store_true", help="Show the actors' logs.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args()

    load_before = _load()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # address="local": always a fresh cluster of our own, never someone else's running one.
    ray.init(
        address="local", include_dashboard=False, log_to_driver=args.verbose, namespace="kv-bench"
    )
    redis_proc, port = start_redis()
    try:
        kv = start_kv(
            KVConfig(
                name="kv-bench",
                namespace="kv-bench",
                num_shards=2,
                replication_factor=3,
                allow_colocated_replicas=True,
            )
        )
        bare = BareDict.remote()  # type: ignore[attr-defined]
        rds = redis.Redis(port=port)
        # The same store through Ray actor calls only (no direct transport), for comparison.
        kv_ray = KVClient.connect("kv-bench", "kv-bench", direct=False)
        results = small_ops(kv, kv_ray, bare, rds, args.seconds)
        results += batch_ops(kv, kv_ray, bare, port, args.seconds)
        results += large_ops(kv, bare, rds, args.seconds)
        failover = failover_times(kv, args.failovers)
        restarts = coordinator_restart_times(kv, args.restarts)
        text = report(results, failover, restarts, machine(), (load_before, _load()))
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutdown_kv("kv-bench", "kv-bench")
        ray.shutdown()
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
