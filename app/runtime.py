"""Process environment the Ray cluster must start with, shared by the CLI, tests and benchmarks,
and clean-up of what `ray stop` leaves behind."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
# Platform actors that hold state but no replica work (the fleet router, the cache shards) ask
# for a sliver of the resource every Ray head has, as Serve's controller does: on a worker node
# they would keep it busy, so the cluster autoscaler could never remove it when idle.
ON_HEAD_NODE = {"node:__internal_head__": 0.001}


def ray_executable() -> str:
    """The `ray` command of this interpreter's environment (the virtualenv's), else PATH's."""
    ray_bin = Path(sys.executable).with_name("ray")
    return str(ray_bin) if ray_bin.exists() else "ray"


def ingress_mode() -> str:
    """'haproxy' (default: Serve's HAProxy direct ingress) or 'proxy' (Serve's Python proxy)."""
    mode = os.environ.get("APP_INGRESS", "haproxy")
    if mode not in ("haproxy", "proxy"):
        raise ValueError(f"APP_INGRESS must be 'haproxy' or 'proxy', not {mode!r}")
    return mode


def cluster_env() -> dict[str, str]:
    """Environment variables a head node needs before it starts (workers inherit them)."""
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if ingress_mode() == "haproxy":
        # HAProxy forwards each request straight to a replica's own HTTP server: one hop, no
        # Python proxy (see BENCHMARKS.md for the measured difference).
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    return env


def driver_env() -> dict[str, str]:
    """Environment a driver that builds applications needs before it imports ray.serve: Serve
    reads RAY_SERVE_ENABLE_HA_PROXY at import, and only with it will it accept the HTTP ingress
    router that puts the fleet's RequestRouter on HAProxy's path."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1"} if ingress_mode() == "haproxy" else {}


def haproxy_ingress_enabled() -> bool:
    """Whether this process's Serve (as imported) routes HTTP through HAProxy."""
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_ENABLE_HA_PROXY)


DEFAULT_HAPROXY_DIR = "/tmp/haproxy-serve"


def haproxy_env(state_dir: str, stats_port: int, metrics_port: int) -> dict[str, str]:
    """Give one cluster's HAProxy its own files and ports, so that two clusters on one machine
    (a developer's `app up` and the test suite) do not overwrite each other's config."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state_dir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state_dir}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state_dir}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{state_dir}/metrics.sock",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
    }


def replica_env() -> dict[str, str]:
    """Environment for our own replicas only (set through their runtime_env).

    These are the knobs of Serve's throughput profile: user code and the handle router on the
    replica's event loop, handle calls over gRPC, buffered request logs (measured in
    BENCHMARKS.md). They are scoped to our replicas because a synchronous handle call outside an
    event loop fails with them, and jobs submitted to the cluster inherit the cluster's
    environment. RAY_SERVE_THROUGHPUT_OPTIMIZED itself is not used: it also switches on direct
    ingress inside the replica, which hangs the replica when the cluster runs Serve's proxy.
    """
    # Tracing (OTEL_*), log format (APP_LOG_*) and the metrics switch (APP_METRICS=off) reach
    # the replicas from the deploying process's environment: `OTEL_EXPORTER_OTLP_ENDPOINT=...
    # app up` traces the service.
    passed = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}
    buffer = os.environ.get("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1000")
    return {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": buffer,
        "RAY_SERVE_LOG_TO_STDERR": "0",
        "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
        **passed,
    }


PASSED_ENV_PREFIXES = ("OTEL_", "APP_LOG_", "APP_METRICS", "APP_FILES_URL")


def stray_haproxy_pids(state_dir: str = DEFAULT_HAPROXY_DIR) -> list[int]:
    """HAProxy processes Serve started with files in state_dir: `ray stop` leaves them running,
    holding the HTTP port."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "haproxy" in (proc.info.get("name") or "") and state_dir in cmdline:
            pids.append(proc.info["pid"])
    return pids


def kill_stray_haproxy(state_dir: str = DEFAULT_HAPROXY_DIR, *, wait_s: float = 5.0) -> int:
    """Stop those processes and wait until they have exited (SIGKILL after wait_s), so that a
    cluster started next finds their ports free rather than racing an HAProxy still exiting
    ("cannot bind socket (Address already in use)"). Returns how many there were."""
    import psutil

    procs = []
    for pid in stray_haproxy_pids(state_dir):
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=wait_s)
    return len(procs)


def lower_cpu_priority(steps: int) -> None:
    """Make the operating system schedule this whole process `steps` lower (as `nice`).
    On Linux nice() changes only the calling thread, and a replica's other threads (Ray's, its
    event loop's) are already running, so each thread is lowered; threads started later inherit
    it from their creator. Raises OSError when not permitted."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():  # not Linux: nice() applies to the process
        os.nice(steps)
        return
    for entry in tasks.iterdir():
        tid = int(entry.name)
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + steps))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
