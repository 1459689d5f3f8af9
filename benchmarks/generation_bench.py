"""Static against continuous batching under Poisson arrivals, same model, same run.

Each request rate gets one schedule of arrivals (exponential gaps), prompt lengths and output
lengths (log-uniform from 8 to 512 new tokens, so most are short and a few long, as in chat
traffic); both engines replay exactly that schedule on the same loaded model. Per engine and
rate it prints generated tokens per second, time to first token (TTFT) p50/p99, inter-token
latency (ITL) p50/p99 and end-to-end p50, and the continuous/static ratios the issue's goals
are stated in: p99 TTFT at most 0.3x static's with throughput at least 0.9x.

The engines run in this process as a replica runs them (SequenceDecoder over the engine the
card selects, LocalBatcher standing in for serve.batch), so the figures are the engines' own,
without HTTP or Serve in front. On a GPU machine `--device cuda --card <gpu card>` runs the
same comparison (benchmarks/gpu_check.py does, with the 1.24 B Llama-shaped model).

    python benchmarks/generation_bench.py                    # tiny-llama, CPU, rates 0.5 1 2
    python benchmarks/generation_bench.py --rates 1 --duration 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.catalog.cards import ModelCard, load_card, load_catalogue
from app.catalog.engine import EngineKind
from app.catalog.recipes import build_card
from app.serving.batching import LocalBatcher
from app.serving.decoding import SequenceDecoder
from app.serving.engines import make_engine
from app.serving.runners import GenerationRequest, TextGenerationRunner, runner_class
from benchmarks.common import WORDS, pct

MODELS = Path(__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    arrival: Arrival
    ttft_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)  # per token, between deltas
    error: str | None = None


def schedule(
    rate: float, duration_s: float, seed: int, max_new: int, max_prompt: int
) -> list[Arrival]:
    """Poisson arrivals over duration_s; prompt words uniform in 4..max_prompt, new tokens
    log-uniform in 8..max_new."""
    rng = random.Random(seed)
    arrivals, at = [], rng.expovariate(rate)
    while at < duration_s:
        words = rng.randint(4, max_prompt)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        new = round(math.exp(rng.uniform(math.log(8), math.log(max_new))))
        arrivals.append(Arrival(at, prompt, new))
        at += rng.expovariate(rate)
    return arrivals


async def timed(decoder: SequenceDecoder, arrival: Arrival) -> Outcome:
    """Send one request now; its first-token time, per-token gaps and end."""
    outcome = Outcome(arrival)
    sent = last = time.perf_counter()
    request = GenerationRequest(arrival.prompt, arrival.max_tokens, temperature=0.0)
    try:
        async for delta in decoder.deltas(request):
            now = time.perf_counter()
            if outcome.ttft_s is None:
                outcome.ttft_s = now - sent
            else:
                outcome.gaps_s.extend([(now - last) / delta.tokens] * delta.tokens)
            outcome.tokens += delta.tokens
            last = now
    except Exception as exc:  # a refusal or failure is counted, not fatal
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.end_s = time.perf_counter() - sent
    return outcome


async def replay(decoder: SequenceDecoder, arrivals: list[Arrival]) -> tuple[list[Outcome], float]:
    """Each arrival sent at its time (open loop)."""
    start = time.perf_counter()

    async def one(arrival: Arrival) -> Outcome:
        await asyncio.sleep(max(0.0, arrival.at_s - (time.perf_counter() - start)))
        return await timed(decoder, arrival)

    outcomes = await asyncio.gather(*(one(a) for a in arrivals))
    return list(outcomes), time.perf_counter() - start


async def closed_loop(
    decoder: SequenceDecoder, streams: int, prompt_words: int, new_tokens: int, duration_s: float
) -> tuple[list[Outcome], float]:
    """`streams` clients, each sending its next request as soon as its last one ends, for
    duration_s: the engine's throughput at that many concurrent streams."""
    rng = random.Random(streams)
    start = time.perf_counter()
    outcomes: list[Outcome] = []

    async def client() -> None:
        while time.perf_counter() - start < duration_s:
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
            arrival = Arrival(time.perf_counter() - start, prompt, new_tokens)
            outcomes.append(await timed(decoder, arrival))

    await asyncio.gather(*(client() for _ in range(streams)))
    return outcomes, time.perf_counter() - start


def summarise(outcomes: list[Outcome], elapsed_s: float) -> dict[str, Any]:
    done = [o for o in outcomes if o.error is None]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    gaps = [g for o in done for g in o.gaps_s]
    tokens = sum(o.tokens for o in done)
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(done),
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed_s if elapsed_s else 0.0,
        "ttft_p50_ms": 1000 * pct(ttft, 0.5),
        "ttft_p99_ms": 1000 * pct(ttft, 0.99),
        "itl_p50_ms": 1000 * pct(gaps, 0.5),
        "itl_p99_ms": 1000 * pct(gaps, 0.99),
        "e2e_p50_s": pct([o.end_s for o in done if o.end_s is not None], 0.5),
    }


def load_runner(
    card: ModelCard, device: str, workdir: Path, catalogue: Path
) -> TextGenerationRunner:
    """The card's runner, its weights built into workdir when the card has a recipe."""
    source = build_card(card, workdir) if card.build else card.resolve_source(catalogue)
    runner = runner_class(card.loader)(card, str(source) if source else None, device)
    runner.load()
    assert isinstance(runner, TextGenerationRunner)
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--card", default="tiny-llama", help="model id in models/ or a YAML path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument(
        "--streams",
        type=int,
        nargs="+",
        default=None,
        help="closed loop instead of arrivals: this many concurrent streams, each sending its "
        "next request when the last ends (--new-tokens each)",
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="per request, --streams")
    parser.add_argument("--engines", nargs="+", default=["static", "continuous"])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per step")
    parser.add_argument("--max-new", type=int, default=512)
    parser.add_argument("--max-prompt", type=int, default=128, help="most prompt words")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the card's)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: what a Serve replica of the card gets, as Ray sets "
        "OMP_NUM_THREADS from its num_cpus: the floor, at least 1)",
    )
    parser.add_argument(
        "--weights", type=Path, default=None, help="build a card's weights here (kept between runs)"
    )
    args = parser.parse_args()

    card = _card(args.card)
    threads = args.threads or max(1, math.floor(card.resources.num_cpus))
    torch.set_num_threads(threads)
    catalogue = Path(args.card).parent if args.card.endswith((".yaml", ".yml")) else MODELS
    batch = args.batch or card.engine_max_running
    # Room for the longest prompt plus the longest output.
    context = max(card.generation.max_context_tokens, args.max_new + 4 * args.max_prompt)
    card = card.model_copy(
        update={
            "generation": card.generation.model_copy(update={"max_context_tokens": context}),
            "batching": card.batching.model_copy(update={"max_batch_size": batch}),
            "max_ongoing_requests": 100_000,
        }
    )
    if args.streams:
        steps = [("streams", float(n)) for n in args.streams]
        what = f"{args.new_tokens} new tokens per request, closed loop"
    else:
        steps = [("rate/s", rate) for rate in args.rates]
        what = f"Poisson arrivals, new tokens 8..{args.max_new}"
    with tempfile.TemporaryDirectory() as workdir:
        runner = load_runner(card, args.device, args.weights or Path(workdir), catalogue)
        results: list[dict[str, Any]] = []
        print(
            f"# {card.id} on {args.device} ({platform.processor() or platform.machine()}), "
            f"batch {batch}, {threads} torch threads, {what}, {args.duration:.0f} s per step"
        )
        print(
            f"{'load':>10} {'engine':>10} {'req':>5} {'err':>4} {'tok/s':>8} {'ttft p50':>9} "
            f"{'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} {'e2e p50':>8}"
        )
        for label, load in steps:
            row: dict[str, Any] = {label: load}
            for kind in args.engines:
                engine_card = card.model_copy(
                    update={"engine": card.engine.model_copy(update={"kind": EngineKind(kind)})}
                )
                batcher = LocalBatcher(batch, card.batching.wait_timeout_s)
                decoder = SequenceDecoder(make_engine(engine_card, runner, batcher))
                if label == "streams":
                    words = max(4, args.max_prompt // 2)
                    run = closed_loop(decoder, int(load), words, args.new_tokens, args.duration)
                else:
                    arrivals = schedule(
                        load, args.duration, args.seed, args.max_new, args.max_prompt
                    )
                    run = replay(decoder, arrivals)
                outcomes, elapsed = asyncio.run(run)
                decoder.engine.close()
                row[kind] = f = summarise(outcomes, elapsed)
                print(
                    f"{label} {load:>g}".rjust(10) + f" {kind:>10} {f['requests']:>5} "
                    f"{f['errors']:>4} {f['tokens_per_s']:>8.1f} {f['ttft_p50_ms']:>7.0f}ms "
                    f"{f['ttft_p99_ms']:>7.0f}ms {f['itl_p50_ms']:>6.1f}ms "
                    f"{f['itl_p99_ms']:>6.1f}ms {f['e2e_p50_s']:>7.2f}s"
                )
            if "static" in row and "continuous" in row:
                static, continuous = row["static"], row["continuous"]
                row["ttft_p99_ratio"] = continuous["ttft_p99_ms"] / static["ttft_p99_ms"]
                row["throughput_ratio"] = continuous["tokens_per_s"] / static["tokens_per_s"]
                print(
                    f"{'':>10} continuous/static: p99 TTFT {row['ttft_p99_ratio']:.2f}x "
                    f"(goal <= 0.3x), throughput {row['throughput_ratio']:.2f}x (goal >= 0.9x)"
                )
            results.append(row)
        if args.json:
            summary = {
                "card": card.id,
                "device": args.device,
                "batch": batch,
                "threads": threads,
                "results": results,
            }
            args.json.write_text(json.dumps(summary, indent=2))


def _card(name: str) -> ModelCard:
    if name.endswith((".yaml", ".yml")):
        return load_card(Path(name))
    found = load_catalogue(MODELS).get(name)
    if found is None:
        raise SystemExit(f"no card {name!r} in {MODELS}")
    return found


if __name__ == "__main__":
    main()
