"""How fast each candidate load generator drives the stub on this machine: the Locust engine
`app loadtest` uses, against plain asyncio loops on httpx and on aiohttp (the baseline).

`python -m app.loadtest.calibrate --seconds 8 --users 32` starts the stub, runs each for
`--seconds` (the three together stay under 30 s of load by default) and prints requests/s,
p50 and the ratio to the httpx loop. All share the machine's cores with the stub, as a load
test against a local service does.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

from app.loadtest.analysis import percentiles
from app.loadtest.config import RequestKind, build_config
from app.loadtest.engine import LocustEngine
from app.loadtest.records import RecordReader
from app.loadtest.stub import CHAT_MODEL
from app.loadtest.workload import body

Send = Callable[[], Awaitable[None]]


def start_stub(token_ms: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    """The stub in a subprocess on a free port; returns it and its base URL."""
    stub = subprocess.Popen(
        [sys.executable, "-m", "app.loadtest.stub", "--port", "0", "--token-ms", str(token_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stub.stdout is not None
    line = stub.stdout.readline()
    if not line.startswith("listening on"):
        stub.kill()
        raise RuntimeError(f"the stub did not start: {line!r}")
    return stub, f"http://127.0.0.1:{line.split()[-1]}/v1"


def measure_locust(base_url: str, users: int, seconds: float) -> tuple[float, float | None]:
    config = build_config(
        {
            "base_url": base_url,
            "stages": [{"duration_s": seconds, "users": users}],
            "mix": {"chat": 1, "stream": 0, "completion": 0, "embedding": 0},
            "output_tokens": {"kind": "fixed", "tokens": 4},
        }
    )
    with tempfile.TemporaryDirectory() as out:
        run = LocustEngine().run(config, {RequestKind.CHAT: CHAT_MODEL}, Path(out))
        reader = RecordReader(run.records)
        reader.read_new()
    ok = [r.latency_ms for r in reader.records if r.ok]
    return len(ok) / seconds, percentiles(ok).p50


async def _loop(send: Send, users: int, seconds: float) -> tuple[float, float | None]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def user() -> None:
        while time.perf_counter() < end:
            began = time.perf_counter()
            await send()
            latencies.append((time.perf_counter() - began) * 1000)

    await asyncio.gather(*(user() for _ in range(users)))
    return len(latencies) / seconds, percentiles(latencies).p50


async def measure_httpx(base_url: str, users: int, seconds: float) -> tuple[float, float | None]:
    payload = body(RequestKind.CHAT, CHAT_MODEL, "hello there", 4)
    limits = httpx.Limits(max_connections=users)
    async with httpx.AsyncClient(base_url=base_url, limits=limits) as client:

        async def send() -> None:
            (await client.post("/chat/completions", json=payload)).raise_for_status()

        return await _loop(send, users, seconds)


async def measure_aiohttp(base_url: str, users: int, seconds: float) -> tuple[float, float | None]:
    payload = body(RequestKind.CHAT, CHAT_MODEL, "hello there", 4)
    connector = aiohttp.TCPConnector(limit=users)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send() -> None:
            async with session.post(f"{base_url}/chat/completions", json=payload) as response:
                await response.read()
                response.raise_for_status()

        return await _loop(send, users, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--users", type=int, default=32)
    args = parser.parse_args(argv)
    stub, base_url = start_stub()
    try:
        results = {
            "asyncio + httpx (baseline)": asyncio.run(
                measure_httpx(base_url, args.users, args.seconds)
            ),
            "asyncio + aiohttp": asyncio.run(measure_aiohttp(base_url, args.users, args.seconds)),
            "locust FastHttpUser (engine)": measure_locust(base_url, args.users, args.seconds),
        }
    finally:
        stub.kill()
    baseline = next(iter(results.values()))[0] or 1.0
    print(f"{args.users} users, {args.seconds:g} s each, against the stub at {base_url}")
    for name, (rps, p50) in results.items():
        shown = "-" if p50 is None else f"{p50:.1f}"
        print(f"{name:30} {rps:9.0f} req/s  p50 {shown:>6} ms  x{rps / baseline:.2f}")


if __name__ == "__main__":
    main()
