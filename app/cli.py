"""The `app` command line: up, down, status and models build for the serving platform."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from typing import Any

from app.autoscaling.cli import add_autoscale_commands
from app.cache.cli import add_cache_commands
from app.catalog.cards import Catalogue, CatalogueError, load_catalogue
from app.events.cli import add_events_commands
from app.fleet.cli import add_fleet_commands
from app.fleet.router_actor import stop_router
from app.fleet.spec import FleetSpec, FleetSpecError, load_fleet
from app.kv.cli import add_kv_commands
from app.loadtest.cli import add_loadtest_commands
from app.regions import local as local_region
from app.regions.auth import FederationSecretError
from app.regions.cli import add_region_commands
from app.regions.launcher import LauncherError
from app.regions.local import LocalRegionError
from app.regions.spec import Cloud, local_ports
from app.runtime import (
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    cluster_env,
    driver_env,
    kill_stray_haproxy,
    ray_executable,
)
from app.security.cli import add_keys_commands
from app.security.config import AuthMode


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _catalogue(args: argparse.Namespace) -> Catalogue:
    from app.serving.builder import catalogue_path

    catalogue = load_catalogue(args.catalogue or catalogue_path())
    models = [m for m in (args.models or "").split(",") if m]
    return catalogue.select(models or None)


def _ray(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [ray_executable(), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=os.environ | cluster_env())


def connect(address: str | None, *, start: bool, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or the local one); start a local head if none runs."""
    import ray

    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, namespace="app", log_to_driver=False)
        return
    except ConnectionError:
        if not start or target != "auto":
            raise
    say("no Ray cluster running: starting a local head node")
    arguments = ["start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
    if num_cpus is not None:
        arguments.append(f"--num-cpus={num_cpus}")
    result = _ray(*arguments)
    if result.returncode != 0:
        raise SystemExit(f"`ray start --head` failed:\n{result.stdout}\n{result.stderr}")
    ray.init(address="auto", namespace="app", log_to_driver=False)


def cmd_models_build(args: argparse.Namespace) -> int:
    from app.catalog.recipes import build_catalogue

    catalogue = _catalogue(args)
    built = build_catalogue(catalogue, force=args.force, progress=say)
    for model_id, path in built.items():
        say(f"{model_id}: {path}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    catalogue = _catalogue(args)
    for card in catalogue:
        source = card.resolve_source(catalogue.directory) or "-"
        print(f"{card.id:20} {card.task.value:16} {card.loader:28} {source}")
    return 0


class InsecureBindError(RuntimeError):
    """`app up` asked to serve a public address without API keys."""


def _with_auth(args: argparse.Namespace, fleet: FleetSpec) -> FleetSpec:
    """The spec with `--auth` applied; refuses a non-loopback host without keys unless the
    operator says --insecure-no-auth (another gateway in front authenticates)."""
    if args.auth:
        auth = fleet.auth.model_copy(update={"mode": AuthMode(args.auth)})
        fleet = fleet.model_copy(update={"auth": auth})
    if fleet.auth.mode is AuthMode.OFF and not _loopback(args.host):
        if not args.insecure_no_auth:
            raise InsecureBindError(
                f"--host {args.host} serves every network this machine is on, and API keys "
                "are off: add --auth keys (then `app keys create NAME`), or --insecure-no-auth "
                "if a gateway of your own authenticates in front"
            )
        say(f"warning: serving {args.host} without API keys (--insecure-no-auth)")
    return fleet


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _region_target(args: argparse.Namespace, fleet: FleetSpec) -> FleetSpec:
    """With --region: this cluster is that region alone. A local region's cluster is started
    if needed, and its address and HTTP port come from the spec unless given."""
    if not args.region:
        args.port = args.port or DEFAULT_HTTP_PORT
        return fleet
    fleet = fleet.for_region(args.region)
    region = fleet.regions[args.region]
    if region.cloud is Cloud.LOCAL:
        if not args.address:
            say(f"region {args.region}: local Ray cluster at {local_region.address(region)}")
            args.address = local_region.start(args.region, region)
        args.port = args.port or local_ports(region.local)["http"]
    args.port = args.port or DEFAULT_HTTP_PORT
    return fleet


def cmd_up(args: argparse.Namespace) -> int:
    from app.catalog.recipes import build_catalogue

    catalogue = _catalogue(args)
    fleet = _with_auth(args, load_fleet(args.fleet))
    fleet = _region_target(args, fleet)
    say(f"catalogue {catalogue.directory}: {', '.join(card.id for card in catalogue)}")
    where = f"region {fleet.own_region} of " if fleet.own_region else ""
    say(
        f"fleet: {where}regions {', '.join(fleet.regions)}; routing {fleet.load_balancing.strategy}"
    )
    build_catalogue(catalogue, progress=say)
    connect(args.address, start=True, num_cpus=args.num_cpus)

    import ray

    from app.serving.builder import build_all
    from app.serving.deploy import deploy, start_serve

    own = fleet.regions.get(fleet.own_region or "")
    one_machine = own is not None and own.cloud is Cloud.LOCAL and own.local.autoscaler
    start_serve(
        args.host, args.port, args.request_timeout, "HeadOnly" if one_machine else "EveryNode"
    )
    if args.kv:
        from app.kv import KVConfig, start_kv

        # The region's own state store: autoscaling history and decisions live here, so they
        # survive a Serve controller restart (app.autoscaling.store).
        kv = start_kv(KVConfig(detached=True))
        say(f"KV store {kv.config.name!r} in namespace {kv.config.namespace!r} is running")
    gpus = float(ray.cluster_resources().get("GPU", 0))
    specs = build_all(catalogue, cluster_gpus=gpus, force_cpu=args.cpu, fleet=fleet)
    deploy(specs, timeout_s=args.timeout, progress=say, fleet=fleet)
    base = f"http://{args.host}:{args.port}"
    say(f"ready: OpenAI base URL {base}/v1 (all models)")
    for card in catalogue:
        if fleet.serves_here(card.id):
            say(f"  {card.id:20} {base}/models/{card.id}/v1 (direct to its replicas)")
        else:
            regions = ", ".join(fleet.serving_regions(card.id))
            say(f"  {card.id:20} served by {regions}: forwarded there through {base}/v1")
    say(f"API description: {base}/docs ({base}/openapi.json)")
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            address, port = node["NodeManagerAddress"], node["MetricsExportPort"]
            say(f"metrics: http://{address}:{port}/metrics (Prometheus scrape target)")
    say("dashboard and alerts: deployments/grafana/, deployments/prometheus/")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    import ray

    if args.region:
        return _down_region(args)
    try:
        ray.init(address=args.address or "auto", namespace="app", log_to_driver=False)
    except ConnectionError:
        say("no Ray cluster running")
    else:
        from ray import serve

        say("shutting down Serve applications")
        serve.shutdown()
        stop_router()
        from app.kv import shutdown_kv

        if shutdown_kv():
            say("stopped the KV store")
        ray.shutdown()
    if not args.keep_ray:
        say("stopping the local Ray node")
        _ray("stop", "--force")
    killed = kill_stray_haproxy()
    if killed:
        say(f"stopped {killed} HAProxy process(es) left holding the HTTP port")
    return 0


def _down_region(args: argparse.Namespace) -> int:
    """Shut down one region's applications and, for a local region, its cluster only."""
    import ray

    fleet = load_fleet(args.fleet)
    region = fleet.for_region(args.region).regions[args.region]
    is_local = region.cloud is Cloud.LOCAL
    address = args.address or (local_region.address(region) if is_local else "auto")
    if not is_local or local_region.running(args.region, region):
        try:
            ray.init(address=address, namespace="app", log_to_driver=False)
        except ConnectionError as exc:
            if not is_local:
                raise
            say(f"region {args.region}: its cluster does not answer ({exc}); stopping it")
        else:
            from ray import serve

            from app.kv import shutdown_kv

            say(f"region {args.region}: shutting down Serve applications")
            serve.shutdown()
            stop_router(fleet.router_actor)
            shutdown_kv()
            ray.shutdown()
    if is_local and not args.keep_ray:
        stopped = local_region.stop(args.region, region)
        say(f"region {args.region}: stopped its Ray cluster ({stopped} processes)")
    return 0


def status_report() -> dict[str, Any]:
    """Per model application: status, replicas by state, resources asked per replica."""
    from ray import serve

    report: dict[str, Any] = {}
    for name, app in serve.status().applications.items():
        deployments = {}
        for dep_name, dep in app.deployments.items():
            deployments[dep_name] = {
                "status": _text(dep.status),
                "replicas": {_text(k): v for k, v in dep.replica_states.items()},
                "message": dep.message,
            }
        report[name] = {
            "status": _text(app.status),
            "route_prefix": getattr(app, "route_prefix", None),
            "deployments": deployments,
            "message": app.message,
        }
    return report


def _text(value: Any) -> str:
    """Serve's status enums are str enums in some places and plain strings in others."""
    return str(getattr(value, "value", value))


def cmd_status(args: argparse.Namespace) -> int:
    connect(args.address, start=False)
    report = status_report()
    catalogue = _catalogue(args)
    for card in catalogue:
        entry = report.get(card.deployment_name)
        if entry is not None:
            entry["resources"] = card.resources.model_dump()
            entry["model"] = card.id
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report:
        print("no Serve applications are running (run `app up`)")
        return 1
    for name, entry in sorted(report.items()):
        replicas = {
            state: count
            for dep in entry["deployments"].values()
            for state, count in dep["replicas"].items()
        }
        resources = entry.get("resources", {})
        print(
            f"{name:24} {entry['status']:14} replicas={replicas} "
            f"cpus={resources.get('num_cpus', '-')} gpus={resources.get('num_gpus', '-')}"
        )
        if entry["message"]:
            print(f"  {entry['message']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app", description=__doc__)
    parser.add_argument("--catalogue", help="directory of model cards (default: models/)")
    parser.add_argument("--models", help="comma-separated model ids (default: all)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Ray if needed, build tiny models, deploy, wait")
    up.add_argument("--address", help="Ray cluster address (default: local, started if absent)")
    up.add_argument("--host", default=DEFAULT_HTTP_HOST)
    up.add_argument(
        "--port", type=int, help=f"HTTP port (default {DEFAULT_HTTP_PORT}; a local region's own)"
    )
    up.add_argument("--region", help="deploy this region of the fleet spec as its own cluster")
    up.add_argument(
        "--no-kv",
        dest="kv",
        action="store_false",
        help="do not start the region's KV store (autoscaling history then stays in memory)",
    )
    up.add_argument("--num-cpus", type=int, help="logical CPUs for a new local head node")
    up.add_argument("--cpu", action="store_true", help="run GPU cards on CPU (APP_FORCE_CPU=1)")
    up.add_argument("--timeout", type=float, default=600, help="seconds to wait until healthy")
    up.add_argument("--fleet", help="fleet spec YAML (default: $APP_FLEET, else one local region)")
    up.add_argument(
        "--request-timeout", type=float, help="seconds before Serve ends an HTTP request"
    )
    up.add_argument(
        "--auth",
        choices=[m.value for m in AuthMode],
        help="API keys: `keys` (create them with `app keys create`) or `off` (default: the "
        "fleet spec's auth.mode; off is refused on a non-loopback --host)",
    )
    up.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --host without API keys (only behind your own gateway)",
    )
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="shut down Serve, stop local Ray and stray HAProxy")
    down.add_argument("--address")
    down.add_argument("--keep-ray", action="store_true", help="only shut down Serve")
    down.add_argument("--region", help="a region of the fleet spec (a local one: its cluster)")
    down.add_argument("--fleet", help="fleet spec YAML (default: $APP_FLEET)")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="per model: replicas, health, resources")
    status.add_argument("--address")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    models = sub.add_parser("models", help="the model catalogue")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="generate the offline tiny models if missing")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=cmd_models_build)
    models_sub.add_parser("list", help="list model cards").set_defaults(func=cmd_models_list)
    add_kv_commands(sub)
    add_autoscale_commands(sub)
    add_cache_commands(sub)
    add_fleet_commands(sub)
    add_region_commands(sub)
    add_keys_commands(sub)
    add_events_commands(sub)
    add_loadtest_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in driver_env().items():  # before anything imports ray.serve
        os.environ.setdefault(key, value)
    if args.command == "up" and args.cpu:
        os.environ["APP_FORCE_CPU"] = "1"
    from app.serving.builder import ResourceUnavailableError
    from app.serving.deploy import DeployError

    try:
        return int(args.func(args) or 0)
    except (
        CatalogueError,
        FleetSpecError,
        LauncherError,
        FederationSecretError,
        InsecureBindError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ResourceUnavailableError, DeployError, ConnectionError, LocalRegionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
