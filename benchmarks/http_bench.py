"""HTTP throughput: our chat-completions path with the echo model against plain Serve hello world.

One run measures, under the same load generator (wrk, same connections and duration):
  * plain Serve hello world behind Serve's default Python proxy (the baseline),
  * the same hello world behind Serve's HAProxy direct ingress,
  * our chat completions with the echo model, non-streaming and streaming, on the per-model URL
    (HAProxy → model replica) and through the gateway (HAProxy → gateway → handle → replica),
  * with --rejected, also our paths behind the default Python proxy (the designs we rejected).
Each ingress mode needs its own Ray cluster (the mode is fixed when the head starts), so every
phase runs in a fresh subprocess. Needs `wrk` (Debian package wrk).

    python benchmarks/http_bench.py --duration 10 --connections 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "the quick brown fox jumps"}]}


def _wrk_script(body: dict[str, object], directory: Path, name: str) -> Path:
    path = directory / f"{name}.lua"
    payload = json.dumps(body).replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(
        "wrk.method = 'POST'\n"
        f"wrk.body = '{payload}'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
    )
    return path


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, script: Path | None, duration: int, connections: int) -> dict[str, float]:
    base = ["wrk", "-t2", f"-c{connections}", "--latency"]
    extra = ["-s", str(script)] if script else []
    subprocess.run([*base, "-d2s", *extra, url], capture_output=True, check=True)  # warm-up
    out = subprocess.run(
        [*base, f"-d{duration}s", *extra, url], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(0) if socket_errors else "",  # type: ignore[dict-item]
    }


def fastapi_echo() -> object:
    """The rejected design: the same echo ModelService behind `serve.ingress(FastAPI)`."""
    from fastapi import FastAPI
    from ray import serve

    from app.api.schemas import ChatCompletionRequest
    from app.catalog.cards import load_catalogue
    from app.runtime import replica_env
    from app.serving.runners.echo import EchoRunner
    from app.serving.service import ModelService

    api = FastAPI()

    @serve.deployment(
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": replica_env()}},
    )
    @serve.ingress(api)
    class FastAPIEcho:
        def __init__(self) -> None:
            card = load_catalogue(ROOT / "models").cards["echo"]
            self.service = ModelService(card, EchoRunner(card, None))

        async def chat(self, body: ChatCompletionRequest) -> dict:
            return await self.service.chat(body)

        # Real classes, not the strings `from __future__ import annotations` leaves: the class
        # travels to the replica by value, where FastAPI could not resolve a string.
        chat.__annotations__ = {"body": ChatCompletionRequest, "return": dict}
        chat = api.post("/v1/chat/completions")(chat)

    return FastAPIEcho


def _check_ok(url: str, body: dict[str, object] | None) -> None:
    """One request first: a benchmark of error responses would measure the wrong thing."""
    import httpx

    if body is None:
        response = httpx.get(url, timeout=30)
    else:
        response = httpx.post(url, json=body, timeout=30)
    if response.status_code != 200:
        raise SystemExit(f"{url} answered {response.status_code}: {response.text[:300]}")


ROUTED = "echo-routed"


def echo_catalogue(catalogue: Any) -> Any:
    """Echo as the catalogue has it (one replica at most: Serve's default router, no routing
    hop), plus a copy with two replicas, which the fleet's router places (on the per-model URL
    through HAProxy's ingress-request-router hop)."""
    from app.catalog.cards import Catalogue, ModelCard

    echo = catalogue.cards["echo"]
    routed = ModelCard.model_validate(
        echo.model_dump() | {"id": ROUTED, "replicas": {"min": 2, "max": 2}}
    )
    return Catalogue(directory=catalogue.directory, cards={"echo": echo, ROUTED: routed})


def phase(mode: str, duration: int, connections: int, rejected: bool) -> dict[str, dict]:
    """Runs inside a subprocess whose environment already selects the ingress mode."""
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT))
    from app.catalog.cards import load_catalogue
    from app.serving.builder import build_all
    from app.serving.deploy import deploy, start_serve

    # Zero-CPU baseline deployments, so they never keep our replicas from being scheduled.
    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class Hello:
        async def __call__(self, request: object) -> str:
            return "hello world"

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    start_serve("127.0.0.1", 8000)
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    if rejected:
        serve.run(fastapi_echo().bind(), name="fastapi-echo", route_prefix="/fastapi-echo")
    deploy(build_all(echo_catalogue(load_catalogue(ROOT / "models"))))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bodies: dict[Path, dict[str, object]] = {}
        for name, body in (
            ("chat", CHAT),
            ("routed", CHAT | {"model": ROUTED}),
            ("stream", CHAT | {"stream": True}),
        ):
            bodies[_wrk_script(body, Path(tmp), name)] = body
        chat, routed_chat, stream = bodies
        cases: list[tuple[str, str, Path | None]] = [(f"hello world ({mode})", "/hello", None)]
        if mode == "haproxy" or rejected:
            cases += [
                (f"chat, per-model URL ({mode})", "/models/echo/v1/chat/completions", chat),
                (
                    f"chat stream, per-model URL ({mode})",
                    "/models/echo/v1/chat/completions",
                    stream,
                ),
                (f"chat, gateway /v1 ({mode})", "/v1/chat/completions", chat),
                (f"chat stream, gateway /v1 ({mode})", "/v1/chat/completions", stream),
                (
                    f"chat, per-model URL, fleet-routed, 2 replicas ({mode})",
                    f"/models/{ROUTED}/v1/chat/completions",
                    routed_chat,
                ),
            ]
        if rejected:
            cases.append(
                (
                    f"chat, FastAPI ingress, rejected ({mode})",
                    "/fastapi-echo/v1/chat/completions",
                    chat,
                )
            )
        for name, path, script in cases:
            url = "http://127.0.0.1:8000" + path
            _check_ok(url, None if script is None else bodies[script])
            results[name] = run_wrk(url, script, duration, connections)
            print(f"  {name}: {results[name]['rps']:.0f} req/s", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()
    return results


def _run_phase(mode: str, args: argparse.Namespace) -> dict[str, dict]:
    sys.path.insert(0, str(ROOT))
    from app.runtime import cluster_env

    os.environ["APP_INGRESS"] = mode  # cluster_env() reads it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS"))}
    env.update(cluster_env())
    cmd = [sys.executable, __file__, "--phase", mode, "--duration", str(args.duration)]
    cmd += ["--connections", str(args.connections)] + (["--rejected"] if args.rejected else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    sys.stderr.write(out.stderr[-3000:] if out.returncode else "")
    if out.returncode:
        raise SystemExit(f"phase {mode} failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_description() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB, "
        f"Python {platform.python_version()}, Ray {_ray_version()}"
    )


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per case")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rejected", action="store_true", help="also measure rejected designs")
    parser.add_argument("--phase", choices=["proxy", "haproxy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.duration, args.connections, args.rejected)))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    results = _run_phase("proxy", args) | _run_phase("haproxy", args)
    baseline = results["hello world (proxy)"]["rps"]
    print(f"\nmachine: {machine_description()}")
    print(f"wrk -t2 -c{args.connections} -d{args.duration}s, baseline = plain Serve hello world\n")
    print("| case | req/s | p50 ms | p99 ms | non-2xx | x baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = r["rps"] / baseline
        print(
            f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['non_2xx']} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
