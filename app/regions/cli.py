"""`app cluster render|up|down REGION` and `app region drain|undrain|status`: regions as Ray
clusters, launched from the fleet spec, and the operator's view of their federation."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.fleet.spec import FleetSpec, FleetSpecError, load_fleet
from app.regions import local
from app.regions.spec import Cloud
from app.runtime import ray_executable

RENDERED_DIR = Path(os.environ.get("APP_RENDERED_DIR", ".app/clusters"))


def _spec(args: argparse.Namespace) -> FleetSpec:
    """--fleet, else $APP_FLEET, else deployments/fleet.yaml where it exists (the repository
    root), else the embedded single-region spec."""
    path = _spec_path(args)
    spec = load_fleet(
        path if args.fleet or os.environ.get("APP_FLEET") or Path(path).exists() else None
    )
    if args.region not in spec.regions:
        raise FleetSpecError(f"unknown region {args.region!r}; the spec has {sorted(spec.regions)}")
    return spec


def _spec_path(args: argparse.Namespace) -> str:
    return args.fleet or os.environ.get("APP_FLEET") or "deployments/fleet.yaml"


def cmd_render(args: argparse.Namespace) -> int:
    from app.regions.launcher import render_yaml

    text = render_yaml(_spec(args), args.region, spec_path=_spec_path(args))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _launcher(args: argparse.Namespace, verb: str) -> int:
    """`ray up` / `ray down` on the rendered launcher file (kubectl for a KubeRay region)."""
    from app.regions.launcher import render_yaml

    spec = _spec(args)
    RENDERED_DIR.mkdir(parents=True, exist_ok=True)
    path = RENDERED_DIR / f"{args.region}.yaml"
    path.write_text(render_yaml(spec, args.region, spec_path=_spec_path(args)))
    if spec.regions[args.region].cloud is Cloud.KUBERNETES:
        command = ["kubectl", "apply" if verb == "up" else "delete", "-f", str(path)]
    else:
        command = [ray_executable(), verb, "-y", str(path)]
    print(f"$ {' '.join(command)}", flush=True)
    return subprocess.run(command).returncode


def cmd_cluster_up(args: argparse.Namespace) -> int:
    spec = _spec(args)
    region = spec.regions[args.region]
    if region.cloud is not Cloud.LOCAL:
        return _launcher(args, "up")
    address = local.start(args.region, region)
    print(f"region {args.region}: Ray at {address}; HTTP will be on {region.base_url()}")
    print(f"deploy it with: app up --fleet {_spec_path(args)} --region {args.region}")
    return 0


def cmd_cluster_down(args: argparse.Namespace) -> int:
    spec = _spec(args)
    region = spec.regions[args.region]
    if region.cloud is not Cloud.LOCAL:
        return _launcher(args, "down")
    stopped = local.stop(args.region, region)
    print(f"region {args.region}: stopped {stopped} process(es)")
    return 0


def _router(args: argparse.Namespace) -> Any:
    import ray

    from app.fleet.router_actor import router_handle

    if not ray.is_initialized():
        ray.init(address=region_address(args), namespace="app", log_to_driver=False)
    return router_handle(_spec(args).router_actor)


def region_address(args: argparse.Namespace) -> str:
    """--address, else a local region's own address, else the local default."""
    if getattr(args, "address", None):
        return str(args.address)
    region = getattr(args, "region", None)
    if region:
        spec = _spec(args)
        if spec.regions[region].cloud is Cloud.LOCAL:
            return local.address(spec.regions[region])
    return os.environ.get("RAY_ADDRESS", "auto")


def cmd_region(args: argparse.Namespace) -> int:
    import ray

    router = _router(args)
    if args.region_command in ("drain", "undrain"):
        drained = ray.get(router.drain_region.remote(args.region_command == "drain"))
        print(f"region {args.region}: {'drained' if drained else 'in rotation'}")
        return 0
    view = ray.get(router.fleet.remote())
    federation = view.get("federation") or {}
    if args.json:
        print(json.dumps(federation, indent=2))
        return 0
    print(format_federation(federation, view.get("region_drained", False)))
    return 0


def format_federation(federation: dict[str, Any], drained: bool) -> str:
    if not federation:
        return "no federation view yet (a region's gateway reports it every summary interval)"
    lines = [
        f"region {federation['region']}{' DRAINED' if drained else ''}; "
        f"forwarding {'on' if federation['forwarding'] else 'OFF (no federation secret)'}",
        "peers:",
    ]
    for name, peer in federation["peers"].items():
        summary = peer.get("summary") or {}
        models = ",".join(sorted(summary.get("models", {}))) or "-"
        age = peer["summary_age_s"]
        lines.append(
            f"  {name:<16} {'in rotation' if peer['in_rotation'] else 'OUT':<12} "
            f"{peer['endpoint']:<32} summary {'-' if age is None else f'{age:.1f}s'} ago"
            f"{' DRAINED' if summary.get('drained') else ''}  models {models}"
            + (f"  last error: {peer['last_error']}" if peer.get("last_error") else "")
        )
    return "\n".join(lines)


def add_region_commands(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="a region's Ray cluster: render, up, down")
    cluster.add_argument("--fleet", help="fleet spec (default: $APP_FLEET)")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    render = cluster_sub.add_parser("render", help="write the region's launcher (or KubeRay) YAML")
    render.add_argument("region")
    render.add_argument("-o", "--output", help="file to write (default: stdout)")
    render.set_defaults(func=cmd_render)
    for verb, func, text in (
        ("up", cmd_cluster_up, "start the region's cluster (ray up; local: on this machine)"),
        ("down", cmd_cluster_down, "stop the region's cluster"),
    ):
        p = cluster_sub.add_parser(verb, help=text)
        p.add_argument("region")
        p.set_defaults(func=func)

    region = sub.add_parser("region", help="this region in the federation: drain, status")
    region.add_argument("--fleet", help="fleet spec (default: $APP_FLEET)")
    region.add_argument("--address", help="Ray address (default: the region's own if local)")
    region_sub = region.add_subparsers(dest="region_command", required=True)
    for verb, text in (
        ("drain", "send this region's traffic to its peers; peers stop forwarding here"),
        ("undrain", "take the region back into rotation"),
        ("status", "the region's peers: rotation, summaries, errors"),
    ):
        p = region_sub.add_parser(verb, help=text)
        p.add_argument("region")
        if verb == "status":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_region)
