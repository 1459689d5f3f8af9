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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from app.fleet.spec import REGION_LABEL, ZONE_LABEL, FleetSpec
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
DISK_GB = 200
TORCH = "'torch>=2.4,<3'"  # the range pyproject.toml allows
TOKEN_FILE = "~/.ray/auth_token"  # where `ray get-auth-token` writes it and Ray looks for it
AUTH_ENV = {"RAY_AUTH_MODE": "token"}

# GCP attaches the GPUs of these machine families itself; other families (n1) take
# guestAccelerators.
GCP_BUNDLED_GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
GCP_IMAGES = "projects/deeplearning-platform-release/global/images/family"
GCP_IMAGE = f"{GCP_IMAGES}/common-cpu"
GCP_GPU_IMAGE = f"{GCP_IMAGES}/common-cu128-ubuntu-2204-nvidia-570"
AZURE_IMAGE = {"imagePublisher": "microsoft-dsvm", "imageOffer": "ubuntu-2204"}
AZURE_IMAGE |= {"imageSku": "2204-gen2", "imageVersion": "latest"}


class LauncherError(ValueError):
    """The fleet spec cannot be rendered for this region; the message names the field."""


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


def head_zone(region: Region) -> str | None:
    """The zone of the head: the provider's (first) availability_zone, else the region's first."""
    zone = region.provider.get("availability_zone")
    if zone:
        return str(zone).split(",")[0].strip()
    return region.zones[0] if region.zones else None


def node_env() -> dict[str, str]:
    """Environment of every Ray process on a node: what `app up` needs, and token auth."""
    return {**cluster_env(), **AUTH_ENV}


# --- providers and node configs, one per cloud -------------------------------------------------


def _aws_provider(name: str, region: Region) -> dict[str, Any]:
    provider: dict[str, Any] = {
        "type": "aws",
        "region": region.cloud_region or name,
        "cache_stopped_nodes": False,
    }
    if region.zones:
        # Ray's bootstrap picks subnets for every node type from these zones only; each node
        # type's Placement then keeps its nodes in its own zone.
        provider["availability_zone"] = ",".join(region.zones)
    return provider


def _gcp_provider(name: str, region: Region) -> dict[str, Any]:
    zone = head_zone(region)
    if zone is None or not region.provider.get("project_id"):
        raise LauncherError(
            f"region {name!r} (gcp) needs zones and provider.project_id (its GCP project)"
        )
    return {
        "type": "gcp",
        "region": region.cloud_region or name,
        "availability_zone": zone,
        "project_id": region.provider["project_id"],
    }


def _azure_provider(name: str, region: Region) -> dict[str, Any]:
    if not region.provider.get("resource_group"):
        raise LauncherError(f"region {name!r} (azure) needs provider.resource_group")
    provider: dict[str, Any] = {
        "type": "azure",
        "location": region.cloud_region or name,
        "resource_group": region.provider["resource_group"],
    }
    if region.provider.get("subscription_id"):
        # Without it Ray uses the subscription of the operator's `az login`.
        provider["subscription_id"] = region.provider["subscription_id"]
    return provider


@dataclass(frozen=True)
class Machine:
    """What every cloud's node_config needs to know about one node type."""

    instance_type: str
    zone: str | None
    gpus: int = 0
    accelerator: str | None = None
    spot: bool = False


def _aws_node(machine: Machine) -> dict[str, Any]:
    config: dict[str, Any] = {
        "InstanceType": machine.instance_type,
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": DISK_GB, "VolumeType": "gp3"}}
        ],
    }
    if machine.zone:
        config["Placement"] = {"AvailabilityZone": machine.zone}
    if machine.spot:
        config["InstanceMarketOptions"] = {"MarketType": "spot"}
    return config


def _gcp_node(machine: Machine) -> dict[str, Any]:
    image = GCP_GPU_IMAGE if machine.gpus else GCP_IMAGE
    config: dict[str, Any] = {
        "machineType": machine.instance_type,
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "type": "PERSISTENT",
                "initializeParams": {"diskSizeGb": DISK_GB, "sourceImage": image},
            }
        ],
    }
    scheduling: dict[str, Any] = {}
    if machine.gpus:
        if not machine.instance_type.startswith(GCP_BUNDLED_GPU_FAMILIES):
            config["guestAccelerators"] = [
                {"acceleratorType": machine.accelerator, "acceleratorCount": machine.gpus}
            ]
        config["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
        scheduling["onHostMaintenance"] = "TERMINATE"  # GPU VMs cannot live-migrate
    if machine.spot:
        scheduling.update(preemptible=True, automaticRestart=False, onHostMaintenance="TERMINATE")
    if scheduling:
        config["scheduling"] = scheduling
    return config


def _azure_node(machine: Machine) -> dict[str, Any]:
    arm: dict[str, Any] = {"vmSize": machine.instance_type, **AZURE_IMAGE}
    if machine.zone:
        # Azure numbers a location's zones 1-3; a spec zone may carry the location in front
        # (eastus-1) so that zone labels stay unique across the fleet.
        arm["availability_zone"] = machine.zone.rsplit("-", 1)[-1]
    if machine.spot:
        arm["priority"] = "Spot"
    return {"azure_arm_parameters": arm}


NodeConfigFn = Callable[[Machine], dict[str, Any]]


@dataclass(frozen=True)
class CloudLauncher:
    provider: Callable[[str, Region], dict[str, Any]]
    node_config: NodeConfigFn
    head_setup: str  # the SDK the head's autoscaler drives the cloud with (Ray's defaults.yaml)


CLOUDS = {
    Cloud.AWS: CloudLauncher(_aws_provider, _aws_node, "pip install 'boto3>=1.4.8'"),
    Cloud.GCP: CloudLauncher(
        _gcp_provider, _gcp_node, "pip install google-api-python-client==1.7.8"
    ),
    Cloud.AZURE: CloudLauncher(
        _azure_provider,
        _azure_node,
        "pip install -U azure-core==1.35.0 azure-identity==1.23.1 azure-mgmt-compute==35.0.0 "
        "azure-mgmt-network==29.0.0 azure-mgmt-resource==24.0.0 azure-common==1.1.28 "
        "msrest==0.7.1 msrestazure==0.6.4.post1",
    ),
}


# --- the launcher config -----------------------------------------------------------------------


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
    kubernetes. A local region has none: `app cluster up` starts it on this machine."""
    config = region_of(spec, region)
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
