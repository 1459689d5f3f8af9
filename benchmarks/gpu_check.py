"""The GPU check for the continuous engine, in one script for a borrowed GPU machine.

1. The engine's correctness tests (tests/unit/test_engines.py) on the GPU: greedy output equal
   to the static engine's, requests joining mid-flight, cancellation freeing the KV budget,
   stop sequences, max_tokens, 429s when the budget is full.
2. The throughput goals of issue 12 on the Llama-3.2-1B-shaped model (models/gpu/
   llama-1b-random.yaml, random bf16 weights built here): tokens/s at 1 and 512 concurrent
   streams (goals: >= 300 and >= 20,000 on an H200), static against continuous.
3. Poisson arrivals on the same model: p99 TTFT and throughput, continuous against static.

Everything it prints is also written under --out (default $OUT, else ./gpu-check). Run it on
the GPU machine as ../shared/gpu/README.md says (Ray from the bundle on PYTHONPATH):

    python3 benchmarks/gpu_check.py --out $OUT

On a CPU it runs as far as it goes with --cpu (tiny-llama only, short steps), to check the
script itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(step: str, command: list[str], out: Path, env: dict[str, str], timeout_s: float) -> int:
    print(f"\n=== {step}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    log = out / f"{step}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            if "Loading weights" not in line and "Writing model shards" not in line:
                print(line, end="", flush=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = 124
    print(f"=== {step}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    parser.add_argument("--cpu", action="store_true", help="a short dry run on the CPU")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per bench step")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    device = "cpu" if args.cpu else "cuda"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, GPU: {gpu}",
        flush=True,
    )
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --cpu for a dry run")
    path = f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, APP_TEST_DEVICE=device, PYTHONPATH=path)
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    codes = {"tests": run("tests", [*tests, "tests/unit/test_engines.py"], args.out, env, 300)}
    bench = [sys.executable, "benchmarks/generation_bench.py", "--device", device]
    if args.cpu:
        bench += ["--card", "tiny-llama", "--duration", "3"]
        streams, rates = ["--streams", "1", "8"], ["--rates", "4"]
    else:
        bench += ["--card", "models/gpu/llama-1b-random.yaml", "--weights", "/tmp/llama-1b-random"]
        bench += ["--duration", str(args.duration)]
        streams = ["--streams", "1", "64", "512", "--new-tokens", "128"]
        rates = ["--rates", "16", "64", "--max-new", "512"]
    for step, load in (("streams", streams), ("poisson", rates)):
        command = [*bench, *load, "--json", str(args.out / f"{step}.json")]
        codes[step] = run(step, command, args.out, env, 420)
    print(f"\nexit codes: {codes}", flush=True)
    raise SystemExit(max(codes.values()))


if __name__ == "__main__":
    main()
