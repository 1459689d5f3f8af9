"""`app fleet ...`: the router actor's view of the fleet, and operator actions on it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import ray

from app.fleet.router_actor import ROUTER_NAME, FleetRouterUnavailableError, router_handle


def _router(address: str | None, name: str) -> Any:
    if not ray.is_initialized():
        ray.init(address=address or "auto", log_to_driver=False)
    return router_handle(name)


def format_fleet(view: dict[str, Any]) -> str:
    lines = [f"fleet view v{view['version']}, strategy {view['strategy']}", "nodes:"]
    for n in view["nodes"]:
        flags = ("" if n["alive"] else " DEAD") + (" DRAINED" if n["drained"] else "")
        lines.append(f"  {n['node_id'][:12]}  {n['region']:<16} {n['zone'] or '-':<14}{flags}")
    lines.append("replicas:")
    for r in view["replicas"]:
        perf = r["performance"]
        latency = perf.get("latency_ms")
        lines.append(
            f"  {r['model']:<18} {r['replica_id']:<10} {r['region']:<16} "
            f"{'healthy' if r['healthy'] else 'UNHEALTHY':<9} ongoing {r['ongoing']:>3}/"
            f"{r['capacity']:<4} weight {r['weight']:<5g} "
            f"latency {f'{latency:.1f}ms' if latency is not None else '-':>9} "
            f"success {perf.get('success_rate', 1.0):.3f}" + (" DRAINED" if r["drained"] else "")
        )
    if view.get("federation"):
        from app.regions.cli import format_federation

        lines.append(format_federation(view["federation"], view.get("region_drained", False)))
    return "\n".join(lines)


def cmd_fleet(args: argparse.Namespace) -> int:
    """Exit status 2 when the router actor refuses the action (an unknown node or replica, a
    weight out of range), 1 when there is no router actor."""
    try:
        return _fleet_action(args)
    except FleetRouterUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if not isinstance(cause, (KeyError, ValueError)):
            raise
        print(f"error: {cause.args[0] if cause.args else cause}", file=sys.stderr)
        return 2


def _fleet_action(args: argparse.Namespace) -> int:
    router = _router(args.address, args.router)
    action = args.fleet_command
    if action == "status":
        view = ray.get(router.fleet.remote())
        print(json.dumps(view, indent=2) if args.json else format_fleet(view))
    elif action in ("drain", "undrain"):
        method = router.drain_node if action == "drain" else router.undrain_node
        version = ray.get(method.remote(args.node))
        return _confirm(router, f"{action}ed node {args.node}", version, args.wait)
    elif action == "weight":
        ray.get(router.set_weight.remote(args.replica, args.weight))
        print(f"replica {args.replica}: weight {args.weight:g}")
    elif action == "fault":
        ray.get(router.inject_fault.remote(args.replica, args.latency_ms))
        print(f"replica {args.replica}: injected latency {args.latency_ms:g} ms")
    return 0


def _confirm(router: Any, done: str, version: int, wait_s: float) -> int:
    """Report an operator action once every router applies it (app.fleet.propagation); exit
    status 1 when some router still has not after `wait_s` (the action itself stands)."""
    if wait_s <= 0:
        print(done)
        return 0
    result = ray.get(router.propagated.remote(version, wait_s))
    if not result["behind"]:
        print(f"{done}: in force on all {result['routers']} routers")
        return 0
    behind = "\n  ".join(result["behind"])
    print(
        f"{done}, but after {wait_s:g}s {len(result['behind'])} of {result['routers']} "
        f"routers still route on an older fleet view:\n  {behind}",
        file=sys.stderr,
    )
    return 1


def add_fleet_commands(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="fleet routing: nodes, replicas, health, drains")
    fleet.add_argument("--address", help="Ray cluster address (default: auto)")
    fleet.add_argument(
        "--router",
        default=ROUTER_NAME,
        help=f"the router actor: the fleet spec's router_actor (default: {ROUTER_NAME})",
    )
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    status = fleet_sub.add_parser("status", help="nodes and replicas with health and scores")
    status.add_argument("--json", action="store_true")
    for name, text in (("drain", "stop routing to a node"), ("undrain", "route to it again")):
        p = fleet_sub.add_parser(name, help=text)
        p.add_argument("node", help="node id")
        p.add_argument(
            "--wait",
            type=float,
            default=10.0,
            metavar="S",
            help="wait up to S seconds until every router applies it (0: return at once)",
        )
    weight = fleet_sub.add_parser("weight", help="set a replica's manual weight (0 = none)")
    weight.add_argument("replica", help="replica id (see `app fleet status`)")
    weight.add_argument("weight", type=float)
    fault = fleet_sub.add_parser("fault", help="inject latency into a replica (chaos testing)")
    fault.add_argument("replica")
    fault.add_argument("latency_ms", type=float, help="0 clears it")
    fleet.set_defaults(func=cmd_fleet)
