"""What the load benchmarks share (overload, instrumentation, batch): free ports, nearest-rank
percentiles, a scoped environment, prompts no earlier request had, and a local Ray + Serve of
the benchmark's own."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
from collections.abc import Iterator

WORDS = (
    "alpha", "beta", "gamma", "delta", "river", "stone",
    "cloud", "paper", "light", "green", "quiet", "north",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile `q` (0..1) of `values`; NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def fresh_prompt(rng: random.Random) -> str:
    """A prompt no earlier request had (so neither the response cache nor a prefix helps)."""
    return " ".join(rng.choice(WORDS) for _ in range(6)) + f" {rng.getrandbits(48):x}"


@contextlib.contextmanager
def environment(values: dict[str, str], drop: tuple[str, ...] = ()) -> Iterator[None]:
    """os.environ with the variables named by `drop` (prefixes) removed and `values` set;
    restored afterwards."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if drop and k.startswith(drop)]:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_cluster(drop: tuple[str, ...] = ()) -> tuple[str, str]:
    """A fresh local Ray of our own with Serve on a free port; HAProxy gets its own files and
    ports, so a cluster already running on this machine keeps its own. `drop`: environment
    prefixes the cluster must not inherit. Returns the base URL and HAProxy's state
    directory (for app.runtime.kill_stray_haproxy afterwards)."""
    import ray

    from app.runtime import cluster_env, haproxy_env
    from app.serving.deploy import start_serve

    haproxy_dir = tempfile.mkdtemp(prefix="hx", dir="/tmp")  # HAProxy socket paths: <= 97 chars
    env = cluster_env() | haproxy_env(haproxy_dir, free_port(), free_port())
    with environment(env, drop=drop):  # the head and every process it starts inherit it
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    start_serve("127.0.0.1", port)
    return f"http://127.0.0.1:{port}", haproxy_dir
