"""The `local` cloud: a region's Ray cluster on this machine, with every port derived from its
`port_base` and its own temp dir and HAProxy files, so that two or three regions run side by side
(development, tests, demos). Stopping one ends only that cluster's processes; `ray stop` would
end every cluster on the machine."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from app.fleet.spec import REGION_LABEL, ZONE_LABEL
from app.regions.spec import Cloud, Region, local_ports
from app.runtime import cluster_env, haproxy_env, kill_stray_haproxy, ray_executable

MARKER = "APP_LOCAL_REGION"  # set in every process of a local region's cluster
HAPROXY_FILE = "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"  # also set in each, under haproxy_dir()


class LocalRegionError(RuntimeError):
    """A local region's cluster could not be started or stopped."""


def region_dir(name: str) -> Path:
    """The region's Ray temp dir lives under here ($APP_LOCAL_REGIONS_DIR, kept short: Ray's
    unix socket paths under it may not exceed 107 characters)."""
    return Path(os.environ.get("APP_LOCAL_REGIONS_DIR", "/tmp/app-regions")) / name


def haproxy_dir(name: str) -> Path:
    """HAProxy's files: under a short path, because HAProxy refuses unix socket paths over 97
    characters and Serve adds a 56-character directory of its own."""
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return Path(os.environ.get("APP_LOCAL_HAPROXY_DIR", "/tmp/appr")) / digest


def address(region: Region) -> str:
    return f"127.0.0.1:{local_ports(region.local)['gcs']}"


def environment(name: str, region: Region) -> dict[str, str]:
    """What the region's head starts with (its processes inherit it): the cluster environment
    `app up` uses, HAProxy files and ports of its own, replica port ranges of its own."""
    ports = local_ports(region.local)
    state = haproxy_dir(name)
    state.mkdir(parents=True, exist_ok=True)
    return (
        cluster_env()
        | {MARKER: _marker(name)}
        # Ray turns token auth on by itself when ~/.ray/auth_token exists; a region on this
        # machine listens on loopback only, so it says what it wants rather than inherit that
        # (RAY_AUTH_MODE=token in the environment still turns it on).
        | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        | haproxy_env(str(state), ports["haproxy_stats"], ports["haproxy_metrics"])
        | {
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ports["direct_ingress_http_min"]),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ports["direct_ingress_http_max"]),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(ports["direct_ingress_grpc_min"]),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(ports["direct_ingress_grpc_max"]),
        }
    )


def start_command(name: str, region: Region) -> list[str]:
    ports = local_ports(region.local)
    zone = region.zones[0] if region.zones else f"{name}-a"
    command = [
        ray_executable(),
        "start",
        "--head",
        "--disable-usage-stats",
        "--include-dashboard=false",
        f"--temp-dir={region_dir(name) / 'ray'}",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['ray_client']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--min-worker-port={ports['min_worker']}",
        f"--max-worker-port={ports['max_worker']}",
        f"--labels={REGION_LABEL}={name},{ZONE_LABEL}={zone}",
    ]
    if region.local.autoscaler:
        from app.regions.fake import head_cpus

        command.append(f"--num-cpus={head_cpus(region)}")
        command.append(f"--autoscaling-config={autoscaler_config_path(name)}")
    elif region.local.num_cpus is not None:
        command.append(f"--num-cpus={region.local.num_cpus}")
    return command


def autoscaler_config_path(name: str) -> Path:
    return region_dir(name) / "autoscaler.yaml"


def _write_autoscaler_config(name: str, region: Region) -> dict[str, str]:
    """With local.autoscaler: the fake provider's config next to the region's temp dir, and the
    environment variable the provider insists on (app.regions.fake)."""
    if not region.local.autoscaler:
        return {}
    import yaml

    from app.regions.fake import FAKE_CLUSTER_ENV, render_fake

    path = autoscaler_config_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(render_fake(name, region), sort_keys=False))
    return FAKE_CLUSTER_ENV


def running(name: str, region: Region) -> bool:
    return bool(_pids(name, region))


def start(name: str, region: Region, extra_env: dict[str, str] | None = None) -> str:
    """Start the region's head node unless it runs; returns its address."""
    if region.cloud is not Cloud.LOCAL:
        raise LocalRegionError(f"region {name!r} is on {region.cloud}, not local")
    if not running(name, region):
        _wait_ports_free(name, region)
        fake = _write_autoscaler_config(name, region)
        env = os.environ | environment(name, region) | fake | (extra_env or {})
        result = subprocess.run(
            start_command(name, region), capture_output=True, text=True, env=env
        )
        if result.returncode != 0:
            raise LocalRegionError(
                f"`ray start` for region {name} failed:\n{result.stdout[-2000:]}"
                f"\n{result.stderr[-2000:]}"
            )
    return address(region)


def stop(name: str, region: Region, grace_s: float = 5.0) -> int:
    """End every process of the region's cluster (found by its temp dir), then its HAProxy."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in _pids(name, region):
        # Children too: Ray's agents retitle themselves over their command line and
        # environment, so only their parent (the raylet) says whose they are.
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
    # HAProxy first: clients and peers then see the region gone at once, not after the grace.
    killed = kill_stray_haproxy(str(haproxy_dir(name)))
    for proc in procs.values():
        _signal(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for proc in alive:
        _signal(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
    killed += kill_stray_haproxy(str(haproxy_dir(name)))
    deadline = time.monotonic() + grace_s
    while _pids(name, region) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(procs) + killed


def _wait_ports_free(name: str, region: Region, timeout_s: float = 30.0) -> None:
    """The fixed ports a head binds must be free: a cluster just stopped may still be letting
    go of them (an agent exits after its raylet), and a head that loses that race dies
    seconds after `ray start` reported success."""
    import psutil

    wanted = {
        port
        for key, port in local_ports(region.local).items()
        if not key.startswith(("min_", "max_", "direct_ingress"))
    }
    deadline = time.monotonic() + timeout_s
    while True:
        busy = {
            c.laddr.port: c.pid
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in wanted
        }
        if not busy:
            return
        if time.monotonic() > deadline:
            taken = ", ".join(f"{port} (pid {pid})" for port, pid in sorted(busy.items()))
            raise LocalRegionError(
                f"region {name}: ports in use after {timeout_s:.0f}s: {taken}; another "
                "cluster or region uses this port_base"
            )
        time.sleep(0.2)


def _marker(name: str) -> str:
    return f"{name}@{region_dir(name)}"


def _pids(name: str, region: Region) -> list[int]:
    """The cluster's processes: every one inherits the marker variable from `ray start` (the
    agents rename their command line, so that alone would miss them); the GCS address in a
    command line catches any started otherwise."""
    import psutil

    marker, state = _marker(name), f"{haproxy_dir(name)}/"
    gcs = re.compile(rf"--(gcs[-_])?address=\S+:{local_ports(region.local)['gcs']}\b")
    own = os.getpid()
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] == own:
            continue
        try:
            env = proc.environ()
            ours = env.get(MARKER) == marker or env.get(HAPROXY_FILE, "").startswith(state)
            cmdline = " ".join(proc.info.get("cmdline") or [])
        except (psutil.Error, TypeError):
            continue
        if ours or gcs.search(cmdline):
            pids.append(proc.info["pid"])
    return pids


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
