"""Cache tier benchmark, one run, baselines and ratios from the same run:
  * L1 hit latency (Cache.get served from process memory),
  * L2 hit through Cache.get (L1 too small to hold the value) against a bare Ray actor holding a
    dict, and against redis-py GET on a local redis-server this script starts,
  * hit ratio of the L1 on a Zipf(0.99) trace against an offline LRU simulation of the same size,
  * embeddings endpoint (per-model URL, HAProxy ingress) with the response cache against the same
    requests with `Cache-Control: no-cache`, under wrk.
It starts its own local Ray (never joins another), with its own HAProxy files and ports, and its
own redis-server, and stops them. Needs wrk and redis-server.

    python benchmarks/cache_bench.py [--seconds 2] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402

from app.cache import Cache, CacheConfig  # noqa: E402
from app.cache.actor_tier import shutdown_shards  # noqa: E402
from benchmarks.http_bench import _wrk_script, machine_description, run_wrk  # noqa: E402

EMBED = "all-minilm-l6-v2"
VALUE = b"x" * 100


def pct(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q))


async def timed(call: Callable[[], Awaitable[Any]], seconds: float) -> list[float]:
    """Per-call latencies (µs) of `call`, one at a time, for `seconds`."""
    for _ in range(50):
        await call()
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        await call()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


class BareActor:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def set(self, key: str, value: bytes) -> None:
        self.data[key] = value

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)


async def latency_cases(seconds: float, redis_port: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}
    l1 = Cache(CacheConfig(name="bench-l1"), tiers=[])
    await l1.set("k", VALUE)
    loops = 200_000
    start = time.perf_counter_ns()
    for _ in range(loops):
        await l1.get("k")
    results["L1 hit, Cache.get (mean of a tight loop)"] = [
        (time.perf_counter_ns() - start) / 1000 / loops
    ]
    results["L1 hit, Cache.get"] = await timed(lambda: l1.get("k"), seconds)

    l2 = Cache(CacheConfig(name="bench-l2", l1_max_bytes=1))  # values never fit in L1
    await l2.start()
    await l2.set("k", VALUE)
    results["L2 actor hit, Cache.get"] = await timed(lambda: l2.get("k"), seconds)
    bare = ray.remote(num_cpus=0)(BareActor).remote()
    await bare.set.remote("k", VALUE)
    results["bare actor call (dict get)"] = await timed(lambda: bare.get.remote("k"), seconds)

    sync_redis = redis.Redis(port=redis_port)
    sync_redis.set("k", VALUE)

    async def redis_sync_get() -> Any:
        return sync_redis.get("k")

    results["redis-py GET (sync client)"] = await timed(redis_sync_get, seconds)
    async_redis = aredis.Redis(port=redis_port)
    results["redis-py GET (asyncio client)"] = await timed(lambda: async_redis.get("k"), seconds)
    url = f"redis://127.0.0.1:{redis_port}/0"
    l2r = Cache(CacheConfig(name="bench-l2r", l1_max_bytes=1, tiers="redis", redis_url=url))
    await l2r.start()
    await l2r.set("k", VALUE)
    results["L2 Redis hit, Cache.get"] = await timed(lambda: l2r.get("k"), seconds)
    for cache in (l2, l2r):
        await cache.close()
    await async_redis.aclose()
    shutdown_shards(l2.config)
    return results


def zipf_trace(n_keys: int, length: int, s: float = 0.99, seed: int = 0) -> list[str]:
    ranks = np.arange(1, n_keys + 1, dtype=np.float64)
    weights = ranks**-s
    draws = np.random.default_rng(seed).choice(n_keys, size=length, p=weights / weights.sum())
    return [f"z:{i}" for i in draws]


def lru_simulation(trace: list[str], capacity: int) -> float:
    lru: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for key in trace:
        if key in lru:
            hits += 1
            lru.move_to_end(key)
        else:
            lru[key] = None
            if len(lru) > capacity:
                lru.popitem(last=False)
    return hits / len(trace)


async def hit_ratio(trace: list[str], capacity: int) -> float:
    cache = Cache(
        CacheConfig(name="bench-zipf", l1_max_entries=capacity, default_ttl_s=None), tiers=[]
    )

    async def load() -> bytes:
        return VALUE

    for key in trace:
        await cache.get_or_load(key, load)
    return cache.stats.get("l1", "hit") / len(trace)  # type: ignore[arg-type]


def embeddings_rps(duration: int, connections: int) -> dict[str, dict[str, Any]]:
    from app.catalog.cards import load_catalogue
    from app.catalog.recipes import build_catalogue
    from app.serving.builder import build_all
    from app.serving.deploy import deploy, start_serve
    from tests.integration.support import free_port

    catalogue = load_catalogue(ROOT / "models").select([EMBED])
    build_catalogue(catalogue)
    port = free_port()
    start_serve("127.0.0.1", port)
    deploy(build_all(catalogue), timeout_s=300)
    url = f"http://127.0.0.1:{port}/models/{EMBED}/v1/embeddings"
    body = {"model": EMBED, "input": ["the quick brown fox jumps over the lazy dog"]}
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cached = _wrk_script(body, Path(tmp), "cached")
        uncached = _wrk_script(body, Path(tmp), "uncached")
        uncached.write_text(uncached.read_text() + "wrk.headers['Cache-Control'] = 'no-cache'\n")
        for name, script in (("uncached (Cache-Control: no-cache)", uncached), ("cached", cached)):
            out[name] = run_wrk(url, script, duration, connections)
            print(f"  embeddings {name}: {out[name]['rps']:.0f} req/s", file=sys.stderr)
    return out


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    from tests.integration.support import free_port, wait_until

    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    wait_until(lambda: _pings(client), timeout=10, what="redis-server")
    return proc, port


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def start_ray() -> str:
    """A local Ray head with HAProxy direct ingress on its own files and ports."""
    from app.runtime import cluster_env, haproxy_env
    from tests.integration.support import free_port

    haproxy_dir = tempfile.mkdtemp(prefix="hcb-")
    os.environ.update(cluster_env() | haproxy_env(haproxy_dir, free_port(), free_port()))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return haproxy_dir


def report(lat: dict[str, list[float]], zipf: dict[str, float], rps: dict[str, Any]) -> None:
    print(f"\nmachine: {machine_description()}\n")
    print("| case | p50 µs | p99 µs | mean µs | calls |")
    print("|---|---:|---:|---:|---:|")
    for name, xs in lat.items():
        print(
            f"| {name} | {pct(xs, 50):.2f} | {pct(xs, 99):.2f} | {statistics.fmean(xs):.2f} "
            f"| {len(xs)} |"
        )
    bare = pct(lat["bare actor call (dict get)"], 50)
    l2 = pct(lat["L2 actor hit, Cache.get"], 50)
    sync_redis = pct(lat["redis-py GET (sync client)"], 50)
    print(f"\nL2 actor hit / bare actor call (p50): {l2 / bare:.2f}x")
    print(f"L2 actor hit / redis-py GET sync (p50): {l2 / sync_redis:.2f}x")
    print(f"\nZipf(0.99): {zipf}")
    print("\n| embeddings endpoint | req/s | p50 ms | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rps.items():
        print(
            f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} |"
        )
    speedup = rps["cached"]["rps"] / rps["uncached (Cache-Control: no-cache)"]["rps"]
    l1_mean = lat["L1 hit, Cache.get (mean of a tight loop)"][0]
    gap = abs(zipf["cache"] - zipf["offline LRU"]) * 100
    print(f"\ncached / uncached req/s: {speedup:.2f}x\n")
    print("| goal | measured | met |\n|---|---:|:-:|")
    for goal, measured, met in (
        ("L1 hit ≤ 2 µs (mean)", f"{l1_mean:.2f} µs", l1_mean <= 2),
        ("L2 actor hit ≤ 1.2x bare actor call (p50)", f"{l2 / bare:.2f}x", l2 / bare <= 1.2),
        ("Zipf hit ratio within 2 points of offline LRU", f"{gap:.2f} points", gap <= 2),
    ):
        print(f"| {goal} | {measured} | {'yes' if met else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per latency case")
    parser.add_argument("--duration", type=int, default=10, help="wrk seconds per case")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install -y {tool}")
    from app.runtime import kill_stray_haproxy

    redis_proc, redis_port = start_redis()
    haproxy_dir = start_ray()
    try:
        lat = asyncio.run(latency_cases(args.seconds, redis_port))
        trace, capacity = zipf_trace(100_000, 300_000), 5_000
        zipf = {
            "offline LRU": lru_simulation(trace, capacity),
            "cache": asyncio.run(hit_ratio(trace, capacity)),
        }
        rps = embeddings_rps(args.duration, args.connections)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        kill_stray_haproxy(haproxy_dir)
        redis_proc.terminate()
    report(lat, zipf, rps)


if __name__ == "__main__":
    main()
