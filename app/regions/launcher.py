"""Renders one region of the fleet spec as the file that starts its Ray cluster: a Ray cluster
launcher config (`ray up`) on aws, gcp or azure, a KubeRay RayService (app.regions.kuberay) on
kubernetes. `app cluster render REGION` prints it. What every cluster shares (Ray 2.60 sources):

- The head takes no model replicas: `resources: {CPU: 0}`. Every card asks for some CPU (echo
  0.1), so one whole CPU would take replicas; what runs on the head asks for none (Serve's
  controller and proxies with HAProxy, the models' ingress routers, the fleet router actor, the
  app build task: serve/_private/application_state.py:1686). The gateway (0.1 CPU) runs on a
  worker. `ray up` hands `resources` and `labels` to `ray start` as RAY_OVERRIDE_RESOURCES /
  RAY_OVERRIDE_LABELS (autoscaler/_private/updater.py:526-531), head included.
- Token authentication: RAY_AUTH_MODE=token (_private/authentication/authentication_token_
  setup.py: AUTH_MODE_ENV_VAR) and app.runtime.cluster_env() are in every node's container
  environment, so `ray start`, the `app up` driver and `ray exec` sessions all carry them. The
  token is Ray's default file ~/.ray/auth_token, written once by `ray get-auth-token
  --generate` and copied to every node by file_mounts: it is never in the rendered file.
- The dashboard listens on 127.0.0.1 only (`ray dashboard cluster.yaml` reaches it).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from app.fleet.spec import REGION_LABEL, ZONE_LABEL, FleetSpec
from app.regions.clouds import CLOUDS, LauncherError, Machine, NodeConfigFn, head_zone
from app.regions.spec import Cloud, Market, NodeType, Region
from app.runtime import cluster_env

DEFAULT_SPEC_PATH = "deployments/fleet.yaml"
RAY_VERSION = "2.60.0"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-cpu"
RAY_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
HEAD_NODE_TYPE = "head"
GCS_PORT = 6379
SERVE_PORT = 8000
IDLE_TIMEOUT_MINUTES = 10
UPSCALING_SPEED = 1.0
TORCH = "'torch>=2.4,<3'"  # the range pyproject.toml allows
TOKEN_FILE = "~/.ray/auth_token"  # where `ray get-auth-token` writes it and Ray looks for it
AUTH_ENV = {"RAY_AUTH_MODE": "token"}


@dataclass(frozen=True)
class NodeGroup:
    """One launcher node type: a spec NodeType in one zone (None where the region has none)."""

    name: str
    type_name: str
    node_type: NodeType
    zone: str | None


def region_of(spec: FleetSpec, region: str) -> Region:
    if region not in spec.regions:
        raise LauncherError(f"unknown region {region!r}; the spec has {sorted(spec.regions)}")
    return spec.regions[region]


def node_groups(
    name: str, region: Region, default_zones: tuple[str, ...] | None = None
) -> list[NodeGroup]:
    """Each node type once per zone it runs in (its own zones, else the region's), so the
    autoscaler adds nodes in the zone whose labels the waiting replicas select."""
    if region.models and not region.node_types:
        raise LauncherError(
            f"region {name!r} serves models but has no node_types; the head takes no replicas"
        )
    groups: list[NodeGroup] = []
    for type_name, node_type in region.node_types.items():
        zones = node_type.zones or default_zones or region.zones
        for zone in zones or (None,):
            group = f"{type_name}-{zone}" if zone else type_name
            groups.append(NodeGroup(group, type_name, node_type, zone))
    taken = [HEAD_NODE_TYPE, *(group.name for group in groups)]
    clashes = sorted({group for group in taken if taken.count(group) > 1})
    if clashes:
        raise LauncherError(f"region {name!r}: node type names {clashes} clash once zoned")
    return groups


def locality_labels(region: str, zone: str | None) -> dict[str, str]:
    labels = {REGION_LABEL: region}
    if zone:
        labels[ZONE_LABEL] = zone
    return labels


def whole_cpus(region: str, field: str, cpus: float) -> int:
    """Launcher and KubeRay resources count whole CPUs."""
    if not float(cpus).is_integer():
        raise LauncherError(f"region {region!r}: {field}.cpus is {cpus:g}; use whole CPUs")
    return int(cpus)


def node_env() -> dict[str, str]:
    """Environment of every Ray process on a node: what `app up` needs, and token auth."""
    return {**cluster_env(), **AUTH_ENV}


# --- providers and node configs, one per cloud -------------------------------------------------


def _zones_for(name: str, region: Region) -> tuple[str, ...] | None:
    """GCP's launcher creates every node in provider.availability_zone (autoscaler/_private/gcp/
    node.py: zone=self.availability_zone), so a GCP region's node types run in that zone only."""
    if region.cloud is not Cloud.GCP:
        return None
    zone = head_zone(region)
    for type_name, node_type in region.node_types.items():
        if node_type.zones and set(node_type.zones) != {zone}:
            raise LauncherError(
                f"region {name!r}: node_types.{type_name}.zones {list(node_type.zones)}: Ray's "
                f"GCP launcher puts every node in one zone ({zone}); render another region "
                "per zone instead"
            )
    return (zone,) if zone else None


def _node_types(name: str, region: Region, node_config: NodeConfigFn) -> dict[str, Any]:
    zone = head_zone(region)
    whole_cpus(name, "head", region.head.cpus)  # an impossible head fails here, not at `ray up`
    types: dict[str, Any] = {
        HEAD_NODE_TYPE: {
            "resources": {"CPU": 0},  # no replicas on the head: see the module docstring
            "labels": locality_labels(name, zone),
            "node_config": node_config(Machine(region.head.instance_type, zone)),
        }
    }
    for group in node_groups(name, region, _zones_for(name, region)):
        node_type = group.node_type
        resources = {"CPU": whole_cpus(name, f"node_types.{group.type_name}", node_type.cpus)}
        if node_type.gpus:
            resources["GPU"] = node_type.gpus
        machine = Machine(
            node_type.instance_type,
            group.zone,
            node_type.gpus,
            node_type.accelerator,
            node_type.market is Market.SPOT,
        )
        types[group.name] = {
            "min_workers": node_type.min_nodes,
            "max_workers": node_type.max_nodes,
            "resources": resources,
            "labels": locality_labels(name, group.zone),
            "node_config": node_config(machine),
        }
        if node_type.gpus:
            types[group.name]["docker"] = {"worker_image": RAY_GPU_IMAGE}
            types[group.name]["worker_setup_commands"] = [_install(cuda=True)]
    return types


def _install(*, cuda: bool) -> str:
    """Install the project into the image's Python, the one `ray start` runs its workers with
    (a separate venv would leave Ray's workers unable to import `app`), CPU nodes with torch's
    CPU build. Then build the catalogue's offline models on every node: replicas load them from
    ~/app/models/weights, which the sync leaves out (.gitignore), and the recipes are seeded."""
    index = "" if cuda else " --index-url https://download.pytorch.org/whl/cpu"
    return f"cd ~/app && pip install -q {TORCH}{index} && pip install -q -e . && app models build"


def _start_commands(name: str, spec_path: str) -> tuple[list[str], list[str]]:
    """`ray start` on each node, then `app up` on the head; node_env() is the containers'."""
    head = [
        "ray stop",
        f"ulimit -n 65536; ray start --head --port={GCS_PORT} --object-manager-port=8076 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1",
        f"cd ~/app && APP_FLEET={shlex.quote(spec_path)} app up --region {shlex.quote(name)} "
        "--address auto --host 0.0.0.0",
    ]
    worker = [
        "ray stop",
        f"ulimit -n 65536; ray start --address=$RAY_HEAD_IP:{GCS_PORT} --object-manager-port=8076",
    ]
    return head, worker


def _docker() -> dict[str, Any]:
    env = [f"--env {key}={shlex.quote(value)}" for key, value in node_env().items()]
    return {
        "image": RAY_IMAGE,
        "container_name": "ray_container",
        "pull_before_run": True,
        "run_options": ["--ulimit nofile=65536:65536", *env],
    }


def render_launcher(
    spec: FleetSpec, region: str, *, spec_path: str = DEFAULT_SPEC_PATH
) -> dict[str, Any]:
    """The Ray cluster launcher config (`ray up`) of one aws, gcp or azure region."""
    config = region_of(spec, region)
    if config.cloud not in CLOUDS:
        raise LauncherError(
            f"region {region!r} runs on {config.cloud.value}; the launcher handles "
            f"{', '.join(cloud.value for cloud in CLOUDS)}"
        )
    cloud = CLOUDS[config.cloud]
    node_types = _node_types(region, config, cloud.node_config)
    head_commands, worker_commands = _start_commands(region, spec_path)
    return {
        "cluster_name": f"app-{region}",
        "max_workers": sum(t.get("max_workers", 0) for t in node_types.values()),
        "upscaling_speed": UPSCALING_SPEED,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {**cloud.provider(region, config), **config.provider},
        "auth": {"ssh_user": "ubuntu"},
        "docker": _docker(),
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": node_types,
        "file_mounts": {"~/app": ".", TOKEN_FILE: TOKEN_FILE},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [".git", ".venv"],
        "rsync_filter": [".gitignore"],
        "initialization_commands": [],
        "setup_commands": [_install(cuda=False)],
        "head_setup_commands": [cloud.head_setup],
        "worker_setup_commands": [],
        "head_start_ray_commands": head_commands,
        "worker_start_ray_commands": worker_commands,
    }


def render(spec: FleetSpec, region: str, *, spec_path: str = DEFAULT_SPEC_PATH) -> dict[str, Any]:
    """The file that starts a region's cluster: a launcher config, or a RayService on
    kubernetes. A local region has none (`app cluster up` starts it on this machine) unless it
    runs Ray's autoscaler: then its fake multi-node config (app.regions.fake)."""
    config = region_of(spec, region)
    if config.cloud is Cloud.LOCAL and config.local.autoscaler:
        from app.regions.fake import render_fake  # fake imports this module

        return render_fake(region, config)
    if config.cloud is Cloud.LOCAL:
        raise LauncherError(
            f"region {region!r} is local: `app cluster up {region}` starts it on this machine; "
            "it has no launcher file"
        )
    if config.cloud is Cloud.KUBERNETES:
        from app.regions.kuberay import render_rayservice  # kuberay imports this module

        return render_rayservice(spec, region, spec_path=spec_path)
    return render_launcher(spec, region, spec_path=spec_path)


def _header(spec: FleetSpec, region: str, spec_path: str) -> str:
    if spec.regions[region].cloud is Cloud.KUBERNETES:
        usage = [
            "kubectl apply -f <this file>   # needs the KubeRay operator, v1.5.1 or later",
            "The image must hold the project (see app/regions/kuberay.py).",
        ]
    else:
        usage = [
            "ray get-auth-token --generate   # once: the token that file_mounts copies to nodes",
            "ray up <this file>              # from the repository root, which becomes ~/app",
            "ray dashboard <this file>       # the dashboard listens on the head's 127.0.0.1",
        ]
    lines = [
        f"Generated by `app cluster render {region}` from the fleet spec {spec_path}.",
        "Edit the spec and render again; changes made here are lost.",
        "",
        *usage,
    ]
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (a RayService's serveConfigV2), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render_yaml(spec: FleetSpec, region: str, *, spec_path: str = DEFAULT_SPEC_PATH) -> str:
    """render() as YAML, keys in the order written, under a header naming its source."""
    body = yaml.dump(
        render(spec, region, spec_path=spec_path),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=1000,  # a shell command stays on one line
    )
    return _header(spec, region, spec_path) + body
