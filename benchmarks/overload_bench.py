"""Overload (issue 15): 10x a model's measured capacity for a while, on its own URL through
Serve's HAProxy ingress, and what API keys cost.

Per model (echo, tiny-llama; one replica each):
1. unloaded latency: sequential requests, p50/p99;
2. capacity: closed loop with as many clients as the replica has slots, requests/s;
3. overload: open-loop Poisson arrivals at 10x that rate for --seconds. Reported: the status
   codes (goal: only 200/429/503), p99 of the admitted (200) requests against the unloaded p99
   (goal: within 2x), the replica's RSS growth (goal: under 10 %) and replica restarts (goal:
   none). The load comes from --procs processes (each an asyncio client with its own share of
   the Poisson arrivals); they run on the same cores as the server, so where they cannot send
   10x the rate the result says what they did send.
Requests do not repeat: each carries a fresh prompt and asks to bypass the response cache, so
capacity is the model's, not the cache's. --slots/--queue override the cards'
max_ongoing_requests/max_queued_requests, to show what sizing the slots to the replica's real
parallelism does to admitted latency.
Then the key check: echo's closed-loop throughput with keys off against the same deployment
with `auth: keys` and a key (goal: at most 5 % slower).

    python benchmarks/overload_bench.py [--seconds 60] [--models echo,tiny-llama]
        [--procs 2] [--slots N] [--queue N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import ray
from ray import serve

from app.catalog.cards import load_catalogue
from app.fleet.spec import FleetSpec, embedded_fleet
from app.runtime import cluster_env
from app.security.cli import create
from app.security.config import Auth, AuthMode
from app.security.keys import KeyLimits, Scope
from app.serving.builder import model_application
from app.serving.deploy import start_serve, wait_running

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common
from benchmarks.common import free_port, fresh_prompt, pct

BODIES: dict[str, dict[str, Any]] = {
    "echo": {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]},
    "tiny-llama": {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    },
}


MAX_IN_FLIGHT = 1000  # per generator process: beyond this it measures only itself


def fresh(body: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The body with a prompt no earlier request had, and the cache bypassed."""
    prompt = fresh_prompt(rng)
    return body | {"messages": [{"role": "user", "content": prompt}], "cache_bypass": True}


def deploy(
    model: str, name: str, fleet: FleetSpec, slots: int | None = None, queue: int | None = None
) -> str:
    catalogue = load_catalogue("models")
    card = catalogue.get(model)
    assert card is not None
    update: dict[str, Any] = {
        "id": name,
        "replicas": card.replicas.model_copy(update={"min": 1, "max": 1, "initial": None}),
    }
    if slots is not None:
        update["max_ongoing_requests"] = slots
    if queue is not None:
        update["max_queued_requests"] = queue
    card = card.model_copy(update=update)
    app = model_application(card, catalogue.directory, fleet=fleet)
    serve.run(app, name=f"model-{name}", route_prefix=f"/models/{name}", blocking=False)
    wait_running([f"model-{name}"], timeout_s=300)
    return f"model-{name}"


def replica_process(app: str) -> psutil.Process:
    """The replica's process, found by the title Ray gives it."""
    for proc in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{app}:" in part for part in proc.info["cmdline"] or []):
            return proc
    raise LookupError(f"no replica process for {app}")


async def closed_loop(
    url: str, body: dict[str, Any], clients: int, seconds: float, headers: dict[str, str]
) -> float:
    done = 0
    end = time.monotonic() + seconds
    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as c:

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                r = await c.post(url, json=fresh(body, rng), headers=headers)
                done += r.status_code == 200

        await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds


async def sequential(url: str, body: dict[str, Any], n: int) -> list[float]:
    out = []
    rng = random.Random(2)
    async with httpx.AsyncClient(timeout=60) as c:
        for _ in range(n):
            request = fresh(body, rng)
            start = time.monotonic()
            r = await c.post(url, json=request)
            r.raise_for_status()
            out.append(time.monotonic() - start)
    return out


async def open_loop(
    url: str, body: dict[str, Any], rate: float, seconds: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    codes: Counter[str] = Counter()
    admitted: list[float] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:

        async def one() -> None:
            request = fresh(body, rng)
            start = time.monotonic()
            try:
                r = await c.post(url, json=request)
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1
                return
            codes[str(r.status_code)] += 1
            if r.status_code == 200:
                admitted.append(time.monotonic() - start)

        tasks: list[asyncio.Task[None]] = []
        pending: set[asyncio.Task[None]] = set()
        start, at, skipped = time.monotonic(), 0.0, 0
        while at < seconds:
            at += rng.expovariate(rate)
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= MAX_IN_FLIGHT:
                skipped += 1  # the client itself is saturated: counted, not sent
                continue
            task = asyncio.create_task(one())
            tasks.append(task)
            pending.add(task)
            task.add_done_callback(pending.discard)
        sent_s = time.monotonic() - start
        await asyncio.gather(*tasks)
    return {
        "not_sent_client_saturated": skipped,
        "sent": len(tasks),
        "sent_s": sent_s,
        "codes": dict(codes),
        "admitted_s": admitted,
    }


def _generator(args: tuple[str, dict[str, Any], float, float, int]) -> dict[str, Any]:
    url, body, rate, seconds, seed = args
    return asyncio.run(open_loop(url, body, rate, seconds, seed))


def open_loop_procs(
    url: str, body: dict[str, Any], rate: float, seconds: float, procs: int
) -> dict[str, Any]:
    """Poisson arrivals at `rate` in all, split over `procs` processes (the sum of independent
    Poisson streams is one), merged."""
    jobs = [(url, body, rate / procs, seconds, 3 + i) for i in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_generator, jobs)
    codes: Counter[str] = Counter()
    admitted: list[float] = []
    for part in parts:
        codes.update(part["codes"])
        admitted.extend(part["admitted_s"])
    sent = sum(p["sent"] for p in parts)
    return {
        "procs": procs,
        "not_sent_client_saturated": sum(p["not_sent_client_saturated"] for p in parts),
        "sent": sent,
        "sent_rate": sent / max(p["sent_s"] for p in parts),
        "codes": dict(codes),
        "admitted_p50_ms": 1000 * pct(admitted, 0.5),
        "admitted_p99_ms": 1000 * pct(admitted, 0.99),
    }


def overload(
    base: str,
    model: str,
    seconds: float,
    max_wait_s: float,
    procs: int,
    slots: int | None,
    queue: int | None,
) -> dict[str, Any]:
    fleet = embedded_fleet()
    balancing = fleet.load_balancing.model_copy(update={"max_queue_wait_s": max_wait_s})
    fleet = fleet.model_copy(update={"load_balancing": balancing})
    app = deploy(model, f"{model}-ol", fleet, slots, queue)
    url = f"{base}/models/{model}-ol/v1/chat/completions"
    body = BODIES[model] | {"model": f"{model}-ol"}
    card = load_catalogue("models").cards[model]
    if queue is None:  # the card's rule: unset means as many as the slots
        queue = card.queue_limit if slots is None else slots
    slots = slots or card.max_ongoing_requests
    unloaded = asyncio.run(sequential(url, body, 100))
    capacity = asyncio.run(closed_loop(url, body, slots, 10, {}))
    proc = replica_process(app)
    rss_before, pid = proc.memory_info().rss, proc.pid
    result = open_loop_procs(url, body, 10 * capacity, seconds, procs)
    time.sleep(2)
    after = replica_process(app)
    result |= {
        "model": model,
        "slots": slots,
        "queue": queue,
        "unloaded_p50_ms": 1000 * pct(unloaded, 0.5),
        "unloaded_p99_ms": 1000 * pct(unloaded, 0.99),
        "capacity_rps": capacity,
        "target_rate": 10 * capacity,
        "rss_growth": after.memory_info().rss / rss_before - 1,
        "replica_restarted": after.pid != pid,
    }
    result["p99_ratio"] = result["admitted_p99_ms"] / result["unloaded_p99_ms"]
    result["only_200_429_503"] = set(result["codes"]) <= {"200", "429", "503"}
    serve.delete(app)
    return result


def key_cost(base: str, seconds: float) -> dict[str, Any]:
    from app.kv import KVClient, KVConfig, start_kv

    start_kv(KVConfig())
    key = create(KVClient.connect(), "bench", (Scope.INFERENCE,), KeyLimits())
    keyed = FleetSpec.model_validate(
        embedded_fleet().model_dump(mode="json") | {"auth": Auth(mode=AuthMode.KEYS).model_dump()}
    )
    apps = [deploy("echo", "echo-open", embedded_fleet()), deploy("echo", "echo-keyed", keyed)]
    slots = 16
    runs: dict[str, list[float]] = {"open": [], "keyed": []}
    for _ in range(3):  # interleaved, so drift on the shared machine hits both alike
        for name, headers in (("open", {}), ("keyed", {"Authorization": f"Bearer {key}"})):
            url = f"{base}/models/echo-{name}/v1/chat/completions"
            body = BODIES["echo"] | {"model": f"echo-{name}"}
            runs[name].append(asyncio.run(closed_loop(url, body, slots, seconds, headers)))
    for app in apps:
        serve.delete(app)
    best = {name: max(values) for name, values in runs.items()}
    return {"runs_rps": runs, "best_rps": best, "keyed_over_open": best["keyed"] / best["open"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--models", default="echo,tiny-llama")
    parser.add_argument("--key-seconds", type=float, default=10)
    parser.add_argument(
        "--max-queue-wait-s", type=float, default=0.5, help="load_balancing.max_queue_wait_s"
    )
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--slots", type=int, default=None, help="max_ongoing_requests")
    parser.add_argument("--queue", type=int, default=None, help="max_queued_requests")
    parser.add_argument("--skip-keys", action="store_true")
    args = parser.parse_args()
    ray.init(runtime_env={"env_vars": cluster_env()}, log_to_driver=False)
    port = free_port()
    start_serve("127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        for model in args.models.split(","):
            results[model] = overload(
                base,
                model,
                args.seconds,
                args.max_queue_wait_s,
                args.procs,
                args.slots,
                args.queue,
            )
            print(json.dumps(results[model], indent=2), flush=True)
        if not args.skip_keys:
            results["keys"] = key_cost(base, args.key_seconds)
            print(json.dumps(results["keys"], indent=2), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    for model in args.models.split(","):
        r = results[model]
        print(
            f"{model} (slots {r['slots']}, queue {r['queue']}): "
            f"sent {r['sent_rate']:.0f}/s of {r['target_rate']:.0f}/s "
            f"(10x capacity {r['capacity_rps']:.1f}/s); codes {r['codes']}; "
            f"admitted p99 {r['admitted_p99_ms']:.0f} ms = {r['p99_ratio']:.2f}x unloaded "
            f"(goal <= 2); RSS {r['rss_growth']:+.1%} (goal < 10 %); "
            f"restarted {r['replica_restarted']}"
        )
    if "keys" in results:
        ratio = results["keys"]["keyed_over_open"]
        print(f"keys on / off, echo per-model URL throughput: {ratio:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
