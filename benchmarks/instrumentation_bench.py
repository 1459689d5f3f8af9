"""Instrumentation overhead (issue 14): echo req/s with metrics off, on, and on + 1 % traces.

Echo's throughput on its own URL with the request-path metrics off, on with tracing off, and on
with tracing sampled at 1 %: three copies of the echo card in one cluster, each built with its
own environment (replica_env() reads it when the application is built, and passes OTEL_* and
APP_METRICS to the replicas):
  (a) echo-metrics-off: APP_METRICS=off, no OTEL_* (the baseline);
  (b) echo-metrics-on: metrics on, tracing off (the default);
  (c) echo-traced: metrics on, OTEL_EXPORTER_OTLP_ENDPOINT at a stub OTLP/HTTP collector in this
      process (it answers 200 to every POST /v1/traces and counts them),
      OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.01.
Each is measured with a closed loop of --clients httpx clients posting chat bodies with fresh
prompts and cache_bypass to /models/<id>/v1/chat/completions, in --rounds interleaved rounds of
--seconds each (the order rotates every round, so drift on the shared machine hits all three
alike); a variant's figure is its best round. Goals: (b)/(a) >= 0.95, (c)/(a) >= 0.90.
Serve's own built-in metrics stay on in all three: the switch covers ours (app.observability).
It starts its own local Ray (never joins another), with its own HAProxy files and ports.

    python benchmarks/instrumentation_bench.py [--seconds 10] [--rounds 3] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import httpx
import ray
from ray import serve

from app.catalog.cards import load_catalogue
from app.fleet.spec import embedded_fleet
from app.observability.recorder import METRICS_ENV
from app.runtime import kill_stray_haproxy
from app.serving.builder import model_application
from app.serving.deploy import wait_running

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common
from benchmarks.common import environment, fresh_prompt, pct, start_cluster

ROOT = Path(__file__).resolve().parents[1]
# What the variants set; anything the invoking shell set under these names is dropped first.
SWITCHES = ("OTEL_", METRICS_ENV)


class TraceSink(ThreadingHTTPServer):
    """The smallest OTLP/HTTP collector: 200 to every POST, counting exports and bytes."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.posts = 0
        self.bytes = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _SinkHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        sink = cast(TraceSink, self.server)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        sink.posts += 1
        sink.bytes += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def variants(sink: TraceSink) -> dict[str, dict[str, str]]:
    """Model id of each copy -> the environment its application is built with."""
    return {
        "echo-metrics-off": {METRICS_ENV: "off"},
        "echo-metrics-on": {},
        "echo-traced": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        },
    }


def deploy_copies(envs: dict[str, dict[str, str]]) -> list[str]:
    """One single-replica copy of the echo card per variant, at /models/<id>; their ids."""
    catalogue = load_catalogue(ROOT / "models")
    echo = catalogue.cards["echo"]
    replicas = echo.replicas.model_copy(update={"min": 1, "max": 1, "initial": None})
    apps = []
    for model_id, env in envs.items():
        card = echo.model_copy(update={"id": model_id, "replicas": replicas})
        with environment(env, drop=SWITCHES):
            app = model_application(card, catalogue.directory, fleet=embedded_fleet())
        serve.run(
            app, name=card.deployment_name, route_prefix=f"/models/{model_id}", blocking=False
        )
        apps.append(card.deployment_name)
    wait_running(apps, timeout_s=300)
    return list(envs)


def chat(model_id: str, rng: random.Random) -> dict[str, Any]:
    """A chat body with a prompt no earlier request had, and the response cache bypassed."""
    prompt = fresh_prompt(rng)
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "cache_bypass": True,
    }


async def closed_loop(url: str, model_id: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients, each posting its next request as soon as the last is answered."""
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    rng = random.Random()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        end = time.monotonic() + seconds

        async def client() -> None:
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    response = await http.post(url, json=chat(model_id, rng))
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                    continue
                codes[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append(time.monotonic() - started)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.monotonic() - started
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * pct(latencies, 0.5),
        "p99_ms": 1000 * pct(latencies, 0.99),
        "codes": dict(codes),
    }


def check_ok(url: str, model_id: str) -> None:
    """One request first: a benchmark of error responses would measure the wrong thing."""
    response = httpx.post(url, json=chat(model_id, random.Random()), timeout=60)
    if response.status_code != 200:
        raise SystemExit(f"{url} answered {response.status_code}: {response.text[:300]}")


def measure(base: str, names: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    urls = {name: f"{base}/models/{name}/v1/chat/completions" for name in names}
    for name, url in urls.items():
        check_ok(url, name)
        asyncio.run(closed_loop(url, name, args.clients, args.warmup))
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = asyncio.run(closed_loop(urls[name], name, args.clients, args.seconds))
            runs[name].append(run)
            print(f"  round {r + 1} {name}: {run['rps']:.0f} req/s", file=sys.stderr, flush=True)
    return runs


def machine() -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.http_bench import machine_description

    return machine_description()


def report(runs: dict[str, list[dict]], sink: TraceSink, args: argparse.Namespace) -> None:
    best = {name: max(rounds, key=lambda run: run["rps"]) for name, rounds in runs.items()}
    base = best["echo-metrics-off"]["rps"]
    results = {
        "machine": machine(),
        "clients": args.clients,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "runs": runs,
        "best": best,
        "metrics_on_over_off": best["echo-metrics-on"]["rps"] / base,
        "traced_over_off": best["echo-traced"]["rps"] / base,
        "trace_sink": {"posts": sink.posts, "bytes": sink.bytes},
    }
    print(json.dumps(results, indent=2))
    print(f"\nmachine: {results['machine']}")
    print(f"closed loop, {args.clients} clients, best of {args.rounds} x {args.seconds:g} s\n")
    goals = {
        "echo-metrics-off": ("metrics off (baseline)", None),
        "echo-metrics-on": ("metrics on, tracing off", 0.95),
        "echo-traced": ("metrics on, tracing sampled 1 %", 0.90),
    }
    for name, (label, goal) in goals.items():
        run = best[name]
        line = f"{label}: {run['rps']:.0f} req/s, p50 {run['p50_ms']:.1f} ms, "
        line += f"p99 {run['p99_ms']:.1f} ms"
        if goal is not None:
            ratio = run["rps"] / base
            met = "met" if ratio >= goal else "NOT met"
            line += f" = {ratio:.3f}x baseline (goal >= {goal:.2f}: {met})"
        print(line)
    if sink.posts == 0:
        print("warning: the trace sink received no export: was tracing on in echo-traced?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="one round of one variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=2, help="seconds per variant, unmeasured")
    args = parser.parse_args()
    sink = TraceSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    base, haproxy_dir = start_cluster(drop=SWITCHES)
    try:
        runs = measure(base, deploy_copies(variants(sink)), args)
    finally:
        serve.shutdown()
        ray.shutdown()
        kill_stray_haproxy(haproxy_dir)
        shutil.rmtree(haproxy_dir, ignore_errors=True)
        sink.shutdown()
    report(runs, sink, args)


if __name__ == "__main__":
    main()
