"""Batch API (issue 13): batch against synchronous throughput; interactive p99 under a batch.

Batch throughput against the same requests sent synchronously, and interactive latency while a
large batch runs.

Part 1, throughput. --lines chat lines for --batch-model (distinct prompts, cache bypassed) as
one batch through the Files and Batch APIs at the gateway's /v1 (the official openai client):
lines/s from batches.create until the batch reads `completed`. Baseline, same run: the same
request bodies sent synchronously to the gateway's /v1/chat/completions (the path batch lines
take too) by --concurrency clients, by default as many as the batch workers may have in flight
(BatchSettings.concurrency.ceiling x batch worker replicas): requests/s, and the ratio.
A batch's time includes what it costs beyond its lines: validation and enqueueing, the
workers' concurrency growing from `initial` to `ceiling` (AIMD: about ceiling²/2 lines), the
workflow noticing the end (it looks every BatchSettings.poll_s, --poll-s) and the output file.
The "running" rate, from the batch's request_counts while it runs, leaves most of that out.
A small batch runs first, unmeasured: a worker's first batch connects it to the KV store and
the gateway.

Part 2, interactive latency. Chat requests to --interactive-model (max_tokens 16, distinct
prompts, cache bypassed) at a fixed --rate for --seconds with no batch; then at the same rate
while a batch of --load-lines lines for that model (max_tokens 32) runs, from when it reads
in_progress until it ends or --seconds pass. p50/p99 of each; goal: p99 with the batch within
1.2x of p99 without.

Part 3, isolation between models. A batch of --isolation-lines echo lines alone, then the
same batch while another batch of --slow-lines lines runs for --interactive-model, made slow
(every request --fault-ms longer, the router actor's model fault) so that its lines hold
their places and draw 429s. The echo batch's time with the slow one over its time alone; goal
about 1: a busy model must not hold back another model's lines (each model has its own AIMD
limit in the worker, app.batches.concurrency.ModelLimits).

Deployed: the models named (at --replicas replicas each, 0: the card's own), the gateway and
the batch worker, over the region's KV store. It starts its own local Ray (never joins
another), with its own HAProxy files and ports and a temporary file store, and stops them.

    python benchmarks/batch_bench.py [--lines 500] [--concurrency N] [--rate 4] [--seconds 60]
        [--load-lines 300] [--batch-model echo] [--interactive-model tiny-llama]
        [--isolation-lines 300] [--slow-lines 400] [--fault-ms 2000] [--skip-isolation]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from app.runtime import driver_env, kill_stray_haproxy

# Serve reads this when it is imported: a card of more than one replica (--replicas 0) then
# gets the fleet's HTTP ingress router, as under `app up`.
os.environ.update(driver_env())

import httpx
import openai
import ray
from ray import serve

from app.batches.settings import BatchSettings
from app.catalog.cards import Catalogue, load_catalogue
from app.catalog.recipes import build_catalogue
from app.fleet.spec import FleetSpec, embedded_fleet
from app.kv import KVConfig, shutdown_kv, start_kv
from app.serving.builder import build_all
from app.serving.deploy import deploy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common
from benchmarks.common import fresh_prompt, pct, start_cluster

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def chat(model: str, rng: random.Random, max_tokens: int | None = None) -> dict[str, Any]:
    """A chat body with a prompt no earlier request had, and the response cache bypassed."""
    prompt = fresh_prompt(rng)
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body | {"cache_bypass": True}


# ---- the cluster ------------------------------------------------------------------------------


def bench_fleet(files_dir: str, poll_s: float | None) -> FleetSpec:
    """The embedded fleet, with the Files API's store in a temporary directory."""
    fleet = embedded_fleet()
    update: dict[str, Any] = {"files_url": files_dir}
    if poll_s is not None:
        update["poll_s"] = poll_s
    batches = BatchSettings.model_validate(fleet.batches.model_dump() | update)
    return fleet.model_copy(update={"batches": batches})


def bench_catalogue(models: list[str], replicas: int) -> Catalogue:
    """The named cards, each at `replicas` replicas (0: as its card says), built if need be."""
    full = load_catalogue(ROOT / "models")
    cards = {}
    for model in models:
        card = full.get(model)
        if card is None:
            raise SystemExit(f"no model {model!r} in the catalogue; it has {sorted(full.cards)}")
        if replicas:
            fixed = {"min": replicas, "max": replicas, "initial": None}
            card = card.model_copy(update={"replicas": card.replicas.model_copy(update=fixed)})
        cards[model] = card
    catalogue = Catalogue(directory=full.directory, cards=cards)
    build_catalogue(catalogue)  # tiny-llama's weights, when `app models build` has not run
    return catalogue


# ---- batches through the openai client --------------------------------------------------------


def run_batch(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Upload the bodies as batch lines, create the batch and wait until it ends."""
    batch_id = create_batch(client, bodies)
    started = time.monotonic()
    changes: list[tuple[float, int]] = []  # (when first seen, completed) for each new count
    while True:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        completed = counts.completed if counts else 0
        if not changes or changes[-1][1] != completed:
            changes.append((time.monotonic() - started, completed))
        if batch.status in TERMINAL:
            break
        time.sleep(0.25)
    seconds = time.monotonic() - started
    running = [(t, c) for t, c in changes if 0 < c < len(bodies)]
    running_rate = None
    if len(running) >= 2 and running[-1][0] > running[0][0]:
        running_rate = (running[-1][1] - running[0][1]) / (running[-1][0] - running[0][0])
    return {
        "batch_id": batch_id,
        "status": batch.status,
        "lines": len(bodies),
        "completed": completed,
        "failed": counts.failed if counts else None,
        "seconds": seconds,
        "lines_per_s": completed / seconds,
        "running_lines_per_s": running_rate,
        "server_timestamps": {
            name: getattr(batch, name)
            for name in ("created_at", "in_progress_at", "finalizing_at", "completed_at")
        },
    }


def create_batch(client: openai.OpenAI, bodies: list[dict[str, Any]]) -> str:
    lines = [
        {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for n, body in enumerate(bodies)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("input.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def wait_status(client: openai.OpenAI, batch_id: str, wanted: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := client.batches.retrieve(batch_id).status) not in wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch_id} still {status} after {timeout_s:g} s")
        time.sleep(0.25)
    return status


# ---- synchronous requests ---------------------------------------------------------------------


async def synchronous(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Every body once, by `concurrency` clients that each post the next as soon as they can."""
    pending = iter(bodies)
    codes: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:

        async def client() -> None:
            for body in pending:  # one shared iterator: each body goes to one client
                try:
                    response = await http.post(url, json=body)
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                    continue
                codes[str(response.status_code)] += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.monotonic() - started
    return {
        "requests": len(bodies),
        "concurrency": concurrency,
        "codes": dict(codes),
        "seconds": seconds,
        "requests_per_s": codes["200"] / seconds,
    }


async def paced(
    url: str,
    model: str,
    rate: float,
    seconds: float,
    stop: asyncio.Event | None = None,
) -> dict[str, Any]:
    """Requests at fixed intervals (an open loop: a slow answer does not delay the next
    request) for `seconds`, or until `stop` is set."""
    rng = random.Random()
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as http:

        async def one(body: dict[str, Any]) -> None:
            started = time.monotonic()
            try:
                response = await http.post(url, json=body)
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1
                return
            codes[str(response.status_code)] += 1
            if response.status_code == 200:
                latencies.append(time.monotonic() - started)

        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds and not (stop and stop.is_set()):
            tasks.append(asyncio.create_task(one(chat(model, rng, max_tokens=16))))
            await asyncio.sleep(max(0.0, started + len(tasks) / rate - time.monotonic()))
        sent_s = time.monotonic() - started
        await asyncio.gather(*tasks)
    return {
        "sent": len(tasks),
        "sent_s": sent_s,
        "codes": dict(codes),
        "p50_ms": 1000 * pct(latencies, 0.5),
        "p99_ms": 1000 * pct(latencies, 0.99),
    }


async def paced_during_batch(
    client: openai.OpenAI, batch_id: str, url: str, model: str, rate: float, seconds: float
) -> dict[str, Any]:
    """paced() until the batch ends (seen every 0.5 s) or `seconds` pass."""
    ended = asyncio.Event()

    async def watch() -> None:
        while not ended.is_set():
            batch = await asyncio.to_thread(client.batches.retrieve, batch_id)
            if batch.status in TERMINAL:
                ended.set()
                return
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    result = await paced(url, model, rate, seconds, ended)
    result["batch_ended_first"] = ended.is_set()
    ended.set()
    await watcher
    return result


# ---- the two parts ----------------------------------------------------------------------------


def throughput(
    base: str, client: openai.OpenAI, args: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    rng = random.Random(1)
    url = f"{base}/v1/chat/completions"
    asyncio.run(synchronous(url, [chat(args.batch_model, rng) for _ in range(64)], concurrency))
    warm = run_batch(client, [chat(args.batch_model, rng) for _ in range(args.warmup_lines)])
    if warm["status"] != "completed":
        raise SystemExit(f"the warm-up batch ended {warm['status']}: {warm}")
    bodies = [chat(args.batch_model, rng) for _ in range(args.lines)]
    sync = asyncio.run(synchronous(url, bodies, concurrency))
    print(f"  synchronous: {sync['requests_per_s']:.1f} req/s", file=sys.stderr, flush=True)
    batch = run_batch(client, bodies)
    print(f"  batch: {batch['lines_per_s']:.1f} lines/s", file=sys.stderr, flush=True)
    return {
        "model": args.batch_model,
        "synchronous": sync,
        "batch": batch,
        "batch_over_sync": batch["lines_per_s"] / sync["requests_per_s"],
    }


def interactive(base: str, client: openai.OpenAI, args: argparse.Namespace) -> dict[str, Any]:
    model = args.interactive_model
    if args.interactive_via == "model":
        url = f"{base}/models/{model}/v1/chat/completions"
    else:
        url = f"{base}/v1/chat/completions"
    asyncio.run(paced(url, model, args.rate, 5))  # warm-up
    quiet = asyncio.run(paced(url, model, args.rate, args.seconds))
    print(f"  no batch: p99 {quiet['p99_ms']:.0f} ms", file=sys.stderr, flush=True)
    rng = random.Random(2)
    load = [chat(model, rng, max_tokens=32) for _ in range(args.load_lines)]
    batch_id = create_batch(client, load)
    wait_status(client, batch_id, {"in_progress"} | TERMINAL, timeout_s=300)
    loaded = asyncio.run(paced_during_batch(client, batch_id, url, model, args.rate, args.seconds))
    print(f"  with batch: p99 {loaded['p99_ms']:.0f} ms", file=sys.stderr, flush=True)
    if not loaded["batch_ended_first"]:  # the window is over: the rest of the batch is not
        client.batches.cancel(batch_id)
    wait_status(client, batch_id, TERMINAL, timeout_s=600)
    final = client.batches.retrieve(batch_id)
    return {
        "model": model,
        "via": args.interactive_via,
        "rate": args.rate,
        "no_batch": quiet,
        "with_batch": loaded,
        "load_batch": {
            "lines": args.load_lines,
            "completed_in_window": final.request_counts.completed if final.request_counts else 0,
        },
        "p99_ratio": loaded["p99_ms"] / quiet["p99_ms"],
    }


def isolation(client: openai.OpenAI, args: argparse.Namespace) -> dict[str, Any]:
    from app.fleet.router_actor import router_handle

    rng = random.Random(3)
    run_batch(client, [chat("echo", rng) for _ in range(args.warmup_lines)])  # unmeasured
    alone = run_batch(client, [chat("echo", rng) for _ in range(args.isolation_lines)])
    print(f"  echo batch alone: {alone['seconds']:.1f} s", file=sys.stderr, flush=True)
    router = router_handle(embedded_fleet().router_actor)
    slow_model = args.interactive_model
    ray.get(router.inject_model_fault.remote(slow_model, args.fault_ms))
    try:
        slow_id = create_batch(client, [chat(slow_model, rng, 8) for _ in range(args.slow_lines)])
        wait_status(client, slow_id, {"in_progress"} | TERMINAL, timeout_s=300)
        time.sleep(3)  # its lines fill their places
        beside = run_batch(client, [chat("echo", rng) for _ in range(args.isolation_lines)])
        slow = client.batches.retrieve(slow_id)
        slow_open = slow.status not in TERMINAL
        if slow_open:
            client.batches.cancel(slow_id)
    finally:
        ray.get(router.inject_model_fault.remote(slow_model, 0))
    wait_status(client, slow_id, TERMINAL, timeout_s=600)
    print(f"  echo batch beside it: {beside['seconds']:.1f} s", file=sys.stderr, flush=True)
    counts = slow.request_counts
    return {
        "echo_lines": args.isolation_lines,
        "alone": alone,
        "beside_slow": beside,
        "slow_batch": {
            "model": slow_model,
            "fault_ms": args.fault_ms,
            "lines": args.slow_lines,
            "completed_meanwhile": counts.completed if counts else 0,
            "still_running_at_end": slow_open,
        },
        "ratio": beside["seconds"] / alone["seconds"],
    }


# ---- main -------------------------------------------------------------------------------------


def machine() -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.http_bench import machine_description

    return machine_description()


def report(results: dict[str, Any]) -> None:
    print(json.dumps(results, indent=2))
    print(f"\nmachine: {results['machine']}")
    if "throughput" in results:
        t = results["throughput"]
        sync, batch = t["synchronous"], t["batch"]
        running = batch["running_lines_per_s"]
        print(
            f"batch throughput ({t['model']}, {batch['lines']} lines): "
            f"{batch['lines_per_s']:.1f} lines/s ({batch['seconds']:.1f} s, "
            f"running {'n/a' if running is None else f'{running:.1f}'} lines/s) against "
            f"synchronous at concurrency {sync['concurrency']}: "
            f"{sync['requests_per_s']:.1f} req/s = {t['batch_over_sync']:.2f}x"
        )
    if "interactive" in results:
        i = results["interactive"]
        quiet, loaded = i["no_batch"], i["with_batch"]
        met = "met" if i["p99_ratio"] <= 1.2 else "NOT met"
        print(
            f"interactive {i['model']} via {i['via']} at {i['rate']:g} req/s: "
            f"p50/p99 {quiet['p50_ms']:.0f}/{quiet['p99_ms']:.0f} ms without a batch, "
            f"{loaded['p50_ms']:.0f}/{loaded['p99_ms']:.0f} ms with one "
            f"({loaded['sent_s']:.0f} s) = {i['p99_ratio']:.2f}x p99 (goal <= 1.2: {met}); "
            f"codes {quiet['codes']} / {loaded['codes']}"
        )
        if loaded["batch_ended_first"] and loaded["sent_s"] < 0.5 * results["settings"]["seconds"]:
            print("warning: the batch ended early in the window; raise --load-lines")
    if "isolation" in results:
        iso = results["isolation"]
        slow = iso["slow_batch"]
        print(
            f"isolation: {iso['echo_lines']} echo lines in {iso['alone']['seconds']:.1f} s alone, "
            f"{iso['beside_slow']['seconds']:.1f} s beside a batch of {slow['lines']} "
            f"{slow['model']} lines {slow['fault_ms']:g} ms slower each "
            f"({slow['completed_meanwhile']} of them done meanwhile) = {iso['ratio']:.2f}x"
        )
        if not slow["still_running_at_end"]:
            print("warning: the slow batch ended before the echo batch; raise --slow-lines")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=500, help="part 1: lines in the batch")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="part 1: synchronous clients (default: the batch workers' ceiling x replicas)",
    )
    parser.add_argument("--batch-model", default="echo", help="part 1's model")
    parser.add_argument("--warmup-lines", type=int, default=20, help="part 1: unmeasured batch")
    parser.add_argument("--poll-s", type=float, default=None, help="BatchSettings.poll_s")
    parser.add_argument("--interactive-model", default="tiny-llama", help="part 2's model")
    parser.add_argument("--interactive-via", choices=["gateway", "model"], default="gateway")
    parser.add_argument("--rate", type=float, default=4, help="part 2: interactive req/s")
    parser.add_argument("--seconds", type=float, default=60, help="part 2: each phase")
    parser.add_argument("--load-lines", type=int, default=300, help="part 2: the batch's lines")
    parser.add_argument("--replicas", type=int, default=1, help="per model (0: the card's)")
    parser.add_argument("--isolation-lines", type=int, default=300, help="part 3: echo lines")
    parser.add_argument("--slow-lines", type=int, default=400, help="part 3: the slow batch")
    parser.add_argument("--fault-ms", type=float, default=2000, help="part 3: added latency")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-interactive", action="store_true")
    parser.add_argument("--skip-isolation", action="store_true")
    args = parser.parse_args()
    files_dir = tempfile.mkdtemp(prefix="batch-bench-files-")
    fleet = bench_fleet(files_dir, args.poll_s)
    settings = fleet.batches
    concurrency = args.concurrency or int(settings.concurrency.ceiling) * settings.replicas
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(args) | {"concurrency": concurrency, "poll_s": settings.poll_s},
    }
    base, haproxy_dir = start_cluster()
    try:
        start_kv(KVConfig())
        models = list(dict.fromkeys([args.batch_model, args.interactive_model, "echo"]))
        deploy(build_all(bench_catalogue(models, args.replicas), fleet=fleet), fleet=fleet)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        if not args.skip_throughput:
            results["throughput"] = throughput(base, client, args, concurrency)
        if not args.skip_interactive:
            results["interactive"] = interactive(base, client, args)
        if not args.skip_isolation:
            results["isolation"] = isolation(client, args)
    finally:
        serve.shutdown()
        shutdown_kv()
        ray.shutdown()
        kill_stray_haproxy(haproxy_dir)
        shutil.rmtree(haproxy_dir, ignore_errors=True)
        shutil.rmtree(files_dir, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
