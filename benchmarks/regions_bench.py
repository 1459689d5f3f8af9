"""Federated regions: what a cross-region forward costs, and what losing a region under load
does, on two `cloud: local` regions (each its own Ray cluster on this machine, loopback HTTP).

  (a) one forward: p50/p99 latency and CPU per request for the same echo request served by the
      entry region's own replica (baseline) and forwarded to the peer region's gateway; the
      peer's own local figure is printed too, so the forward's share can be read off;
  (b) region loss under load: the entry region is saturated (a slow replica), so its load spills
      to the peer; the peer's cluster is then stopped. Counts failed requests and the time
      until the entry gateway takes the peer out of rotation, in summary intervals.

    python benchmarks/regions_bench.py [--requests 400] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from app.regions.local import MARKER  # noqa: E402
from tests.integration.regions_support import Regions, local_regions  # noqa: E402

EAST, WEST = "bench-east", "bench-west"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def cluster_cpu_s() -> float:
    """CPU seconds so far of every process of both regions' clusters."""
    total = 0.0
    for proc in psutil.process_iter():
        try:
            if MARKER in proc.environ():
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def timed(url: str, model: str, n: int) -> tuple[list[float], float]:
    """n sequential chat requests: latencies (ms) and cluster CPU ms per request."""
    body = {"model": model, "messages": [{"role": "user", "content": "one two three"}]}
    latencies = []
    with httpx.Client(timeout=30) as client:
        for _ in range(20):  # warm connections and the peer's pool
            client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
        cpu = cluster_cpu_s()
        for _ in range(n):
            started = time.perf_counter()
            client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
        cpu = cluster_cpu_s() - cpu
    return latencies, cpu * 1000 / n


def forward_cost(regions: Regions, n: int) -> dict[str, Any]:
    rows = {
        f"{EAST} -> own replica (baseline)": timed(regions.urls[EAST], "echo", n),
        f"{EAST} -> forwarded to {WEST}": timed(regions.urls[EAST], "echo-west", n),
        f"{WEST} -> own replica": timed(regions.urls[WEST], "echo-west", n),
    }
    print(f"\n(a) one forward, {n} sequential requests each (echo, loopback)")
    for name, (latencies, cpu_ms) in rows.items():
        print(
            f"  {name:<34} p50 {pct(latencies, 50):6.2f} ms  p99 {pct(latencies, 99):6.2f} ms  "
            f"cluster CPU {cpu_ms:5.2f} ms/request"
        )
    base, fwd = rows[f"{EAST} -> own replica (baseline)"], rows[f"{EAST} -> forwarded to {WEST}"]
    added50 = pct(fwd[0], 50) - pct(base[0], 50)
    added99 = pct(fwd[0], 99) - pct(base[0], 99)
    print(
        f"  added by forwarding: p50 {added50:+.2f} ms, p99 {added99:+.2f} ms, "
        f"CPU {fwd[1] - base[1]:+.2f} ms/request; "
        f"ratio p50 {pct(fwd[0], 50) / pct(base[0], 50):.2f}x"
    )
    return {"added_p50_ms": added50, "added_p99_ms": added99}


def region_loss(regions: Regions, interval: float, clients: int = 6) -> None:
    replica = regions.replica_of(EAST, "echo")
    regions.fleet_cli(EAST, "fault", replica, "150")
    time.sleep(2 * interval + 1)
    results: list[tuple[float, int, str, float]] = []
    stop = threading.Event()

    def client() -> None:
        body = {"model": "echo", "messages": [{"role": "user", "content": "load"}]}
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                started = time.perf_counter()
                r = http.post(f"{regions.urls[EAST]}/v1/chat/completions", json=body)
                region = (
                    r.json().get("system_fingerprint", "").split("/")[0]
                    if r.status_code == 200
                    else ""
                )
                results.append(
                    (
                        time.monotonic(),
                        r.status_code,
                        region,
                        (time.perf_counter() - started) * 1000,
                    )
                )

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(5)
    killed_at = time.monotonic()
    # Stopped from another thread: the stop command itself runs for seconds (agents get a
    # grace period), and rotation is watched from the moment it starts.
    stopper = threading.Thread(target=regions.down, args=(WEST,))
    stopper.start()
    out_at = None
    while time.monotonic() - killed_at < 30:
        peer = regions.fleet(EAST)["federation"]["peers"][WEST]
        if not peer["in_rotation"]:
            out_at = time.monotonic()
            break
        time.sleep(0.05)
    stopper.join()
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    regions.fleet_cli(EAST, "fault", replica, "0")
    before = [r for r in results if r[0] < killed_at]
    after = [r for r in results if r[0] >= killed_at]
    last_west = max((r[0] for r in after if r[2] == WEST), default=killed_at)
    failed = [r for r in results if r[1] != 200]
    print(
        f"\n(b) region loss under load: {clients} clients on {EAST} (saturated, spilling to {WEST})"
    )
    print(
        f"  requests: {len(results)} ({len(before)} before the loss, {len(after)} after); "
        f"failed: {len(failed)}"
    )
    print(
        f"  before: {sum(r[2] == WEST for r in before) / max(1, len(before)):.0%} served by {WEST}"
    )
    rerouted = (out_at - killed_at) if out_at else float("nan")
    print(
        f"  {WEST} out of rotation {rerouted:.2f} s after its cluster was stopped "
        f"(= {rerouted / interval:.2f} summary intervals of {interval:g} s)"
    )
    print(f"  last response served by {WEST}: {last_west - killed_at:+.2f} s after the stop began")
    if out_at:
        print(
            f"  out of rotation {out_at - last_west:.2f} s after {WEST}'s last response "
            f"(= {(out_at - last_west) / interval:.2f} intervals)"
        )
    lat_after = [r[3] for r in after if r[1] == 200]
    if lat_after:
        print(
            f"  latency after the loss: p50 {pct(lat_after, 50):.1f} ms  "
            f"p99 {pct(lat_after, 99):.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--interval", type=float, default=1.0, help="federation summary interval")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    regions = {
        EAST: {
            "latitude": 40.7,
            "longitude": -74.0,
            "local": {"port_base": 24000, "num_cpus": 4},
            "models": {"echo": 1},
        },
        WEST: {
            "latitude": 37.8,
            "longitude": -122.4,
            "local": {"port_base": 26000, "num_cpus": 4},
            "models": {"echo": 1, "echo-west": 1},
        },
    }
    cards = {"echo": {"max_ongoing_requests": 2}, "echo-west": {"max_ongoing_requests": 64}}
    directory = Path(tempfile.mkdtemp(prefix="fedb", dir="/tmp"))
    try:
        with local_regions(directory, regions, cards, summary_interval_s=args.interval) as running:
            forward_cost(running, args.requests)
            region_loss(running, args.interval)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
