"""`app loadtest`: staged load against an OpenAI-compatible base URL; HTML and JSON report."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from app.loadtest.config import (
    LoadTestConfig,
    LoadTestConfigError,
    build_config,
    load_config,
    parse_lengths,
    parse_mix,
    stages_from,
)
from app.loadtest.result import LoadTestResult
from app.runtime import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT

DEFAULT_USERS = "1,2,4,8,16"
DEFAULT_BASE_URL = f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}/v1"
EXIT_BROKE = 3


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    """The config file (if any) with every flag given laid over it."""
    overrides: dict[str, Any] = {
        "base_url": args.base_url,
        "stages": stages_from(args.users, args.rps, args.stage_duration, args.spawn_rate) or None,
        "mix": parse_mix(args.mix).model_dump() if args.mix else None,
        "prompt_tokens": parse_lengths(args.prompt_tokens).model_dump()
        if args.prompt_tokens
        else None,
        "output_tokens": parse_lengths(args.output_tokens).model_dump()
        if args.output_tokens
        else None,
        "models": _given(generation=args.model, embedding=args.embedding_model),
        "thresholds": _given(
            p95_ms=args.p95_ms, error_rate=args.max_error_rate, ttft_p95_ms=args.ttft_p95_ms
        ),
        "api_key": args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        "max_duration_s": args.max_duration,
        "request_timeout_s": args.request_timeout,
        "think_time_s": args.think_time,
        "allow_hosts": args.allow_host,
        "metrics_urls": args.metrics_url,
        "seed": args.seed,
    }
    if args.config:
        return load_config(args.config, **_without_none(overrides))
    overrides["base_url"] = args.base_url or DEFAULT_BASE_URL
    if overrides["stages"] is None:
        overrides["stages"] = stages_from(DEFAULT_USERS, None, args.stage_duration)
    return build_config(_without_none(overrides), source="app loadtest")


def _given(**values: Any) -> dict[str, Any] | None:
    given = {key: value for key, value in values.items() if value is not None}
    return given or None


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def format_summary(result: LoadTestResult, out_dir: Path) -> str:
    lines = [
        f"{'stage':<14} {'req/s':>8} {'goodput':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'TTFT95':>8} {'ITL95':>7} {'errors':>7}"
    ]
    for s in result.stages:
        if not s.ran:
            lines.append(f"{s.label:<14} not run")
            continue
        lines.append(
            f"{s.label:<14} {s.achieved_rps:>8.2f} {s.ok_rps:>8.2f} {_n(s.latency_ms.p50):>8} "
            f"{_n(s.latency_ms.p95):>8} {_n(s.latency_ms.p99):>8} {_n(s.ttft_ms.p95):>8} "
            f"{_n(s.itl_ms.p95):>7} {100 * s.error_rate:>6.1f}%"
            + (" <- broke" if s.breaches else "")
            + (" (cut short)" if s.cut_short else "")
        )
    bp = result.breaking_point
    lines.append(
        "breaking point: none"
        if bp is None
        else f"breaking point: stage {bp.stage + 1} ({bp.label}): {'; '.join(bp.reasons)}"
    )
    index = result.scalability.index
    lines.append(f"scalability index: {'-' if index is None else f'{index:.2f}'} (1 = linear)")
    lines += [f"- {text}" for text in result.recommendations]
    lines.append(f"report: {out_dir / 'report.html'}  result: {out_dir / 'result.json'}")
    return "\n".join(lines)


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def cmd_loadtest(args: argparse.Namespace) -> int:
    from app.loadtest.models import ModelSelectionError
    from app.loadtest.run import run_loadtest

    try:
        config = config_from_args(args)
    except LoadTestConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        result = run_loadtest(config, out_dir, progress_every_s=args.progress_every)
    except ModelSelectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result, out_dir))
    if result.stopped == "interrupted":
        return 130
    if args.fail_on_break and result.breaking_point is not None:
        return EXIT_BROKE
    return 0


def add_loadtest_commands(sub: Any) -> argparse.ArgumentParser:
    """Add `loadtest` to an argparse subparsers object."""
    p = sub.add_parser(
        "loadtest",
        help="staged load against an OpenAI base URL: throughput, latency, breaking point",
        description=__doc__,
    )
    p.add_argument(
        "base_url",
        nargs="?",
        help=f"OpenAI base URL (default: the config file's, else {DEFAULT_BASE_URL}); "
        "/v1 is added when missing",
    )
    p.add_argument("--config", help="YAML load-test config (the flags below override it)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--users", help=f"concurrent users per stage (default {DEFAULT_USERS})")
    load.add_argument("--rps", help="target requests/s per stage, e.g. 5,10,20,40")
    p.add_argument("--stage-duration", type=float, default=30.0, help="seconds per stage")
    p.add_argument("--spawn-rate", type=float, help="users started per second")
    p.add_argument("--mix", help="weights, e.g. chat=4,stream=4,completion=1,embedding=1")
    p.add_argument("--prompt-tokens", help="fixed:N, uniform:A:B, normal:M:SD, lognormal:MED:S")
    p.add_argument("--output-tokens", help="max_tokens distribution, same forms")
    p.add_argument("--model", help="model for chat/stream/completion (default: from /v1/models)")
    p.add_argument("--embedding-model", help="model for embeddings (default: from /v1/models)")
    p.add_argument("--p95-ms", type=float, help="p95 latency threshold (default 2000)")
    p.add_argument("--max-error-rate", type=float, help="error-rate threshold (default 0.01)")
    p.add_argument("--ttft-p95-ms", type=float, help="p95 time-to-first-token threshold")
    p.add_argument(
        "--api-key",
        help="bearer key (default: $OPENAI_API_KEY, which other users cannot see in ps)",
    )
    p.add_argument(
        "--max-duration", type=float, help="hard cap in seconds (default: stages + 30 s)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        help="allow this non-loopback host as the target (repeat for more)",
    )
    p.add_argument(
        "--metrics-url",
        action="append",
        help="Ray metrics endpoint, http://node:port/metrics (default: found from /tmp/ray)",
    )
    p.add_argument("--request-timeout", type=float, help="per read, seconds (default 60)")
    p.add_argument("--think-time", type=float, help="seconds a user waits between requests")
    p.add_argument("--seed", type=int, help="seed of the request mix and lengths")
    p.add_argument("--out", help="output directory (default ./loadtest-TIMESTAMP)")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between lines")
    p.add_argument(
        "--fail-on-break",
        action="store_true",
        help=f"exit {EXIT_BROKE} when a stage crosses a threshold (for CI)",
    )
    p.set_defaults(func=cmd_loadtest)
    return p
