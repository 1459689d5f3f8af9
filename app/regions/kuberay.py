"""Renders a kubernetes region of the fleet spec as a KubeRay RayService (ray.io/v1): the Serve
config of the region's applications and the Ray cluster that runs them.

The region's image (kubernetes.image / gpu_image) must hold the project at K8S_APP_DIR, installed
into the image's Python with its models built (`app models build`): KubeRay starts Ray from the
image and Serve imports `app.serving.builder` there. Two things differ from the VM launcher:

- The dashboard listens on the pod's address (0.0.0.0), not on 127.0.0.1. The operator deploys
  serveConfigV2 and reads Serve's status through the head service's dashboard port
  (kuberay ray-operator/controllers/ray/rayservice_controller.go: FetchHeadServiceURL(...,
  DashboardPortName)), and a loopback dashboard is out of its reach (common/pod.go: "`localhost`
  ... is not accessible from outside the head Pod"). Token authentication guards it:
  `authOptions: {mode: token}` (KubeRay v1.5.1+) makes the operator create a Secret and set
  RAY_AUTH_MODE / RAY_AUTH_TOKEN on every Ray container.
- Node labels come from each group's `labels`, which KubeRay passes to `ray start --labels`
  (common/pod.go: updateRayStartParamsLabels); it refuses rayStartParams['labels']
  (utils/validation.go: validateRayGroupLabels).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import yaml

from app.catalog.cards import deployment_name
from app.fleet.spec import FleetSpec
from app.regions.launcher import (
    DEFAULT_SPEC_PATH,
    GCS_PORT,
    IDLE_TIMEOUT_MINUTES,
    RAY_VERSION,
    SERVE_PORT,
    LauncherError,
    NodeGroup,
    head_zone,
    locality_labels,
    node_groups,
    region_of,
)
from app.regions.spec import Cloud, Region
from app.runtime import cluster_env

K8S_APP_DIR = "/home/ray/app"
MODEL_APP = "app.serving.builder:build_model_app"
GATEWAY_APP = "app.serving.builder:build_gateway_app"
GATEWAY_NAME = "gateway"  # app.serving.builder.GATEWAY_APP (not imported: that pulls in Serve)
ZONE_SELECTOR = "topology.kubernetes.io/zone"
INSTANCE_TYPE_SELECTOR = "node.kubernetes.io/instance-type"
# KubeRay's checks on a RayService name (utils/constant.go, utils/validation.go).
MAX_NAME_LENGTH = 47
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
HEAD_PORTS = {"gcs-server": GCS_PORT, "dashboard": 8265, "client": 10001, "serve": SERVE_PORT}


def service_name(region: str) -> str:
    name = f"app-{region}"
    if len(name) > MAX_NAME_LENGTH or not DNS1035_LABEL.fullmatch(name):
        raise LauncherError(
            f"region {region!r}: its RayService name {name!r} must be at most {MAX_NAME_LENGTH} "
            "characters of a-z, 0-9 and '-' (KubeRay's rule)"
        )
    return name


def serve_config(spec: FleetSpec, region: str, fleet_path: str) -> dict[str, Any]:
    """The Serve config of one region: each model it serves at /models/<id>, the gateway at /."""
    models = list(region_of(spec, region).models)
    common = {"fleet": fleet_path, "region": region}
    applications: list[dict[str, Any]] = [
        {
            "name": deployment_name(model),
            "route_prefix": f"/models/{model}",
            "import_path": MODEL_APP,
            "args": {"model": model, **common},
        }
        for model in models
    ]
    applications.append(
        {
            "name": GATEWAY_NAME,
            "route_prefix": "/",
            "import_path": GATEWAY_APP,
            "args": {**common, "models": models},
        }
    )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": applications,
    }


def _resources(cpus: float, memory_gb: float | None, gpus: int = 0) -> dict[str, Any]:
    amounts = {"cpu": f"{cpus:g}"}
    if memory_gb is not None:
        amounts["memory"] = f"{memory_gb:g}Gi"
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    # Requests equal to limits: Ray sizes the node from them, and the pod is not overcommitted.
    return {"limits": amounts, "requests": dict(amounts)}


def _pod(container: dict[str, Any], selector: dict[str, str]) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [container]}
    if selector:
        pod["nodeSelector"] = selector
    return {"spec": pod}


def _head_group(name: str, region: Region, env: list[dict[str, str]]) -> dict[str, Any]:
    zone = head_zone(region)
    container = {
        "name": "ray-head",
        "image": region.kubernetes.image,
        "env": env,
        "resources": _resources(region.head.cpus, region.head.memory_gb),
        "ports": [
            {"containerPort": port, "name": port_name} for port_name, port in HEAD_PORTS.items()
        ],
    }
    return {
        "serviceType": "ClusterIP",  # Serve's own service carries kubernetes.service_type
        # num-cpus 0: no model replicas on the head (see app.regions.launcher). The dashboard
        # must be reachable by the operator; token authentication guards it.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "labels": locality_labels(name, zone),
        "template": _pod(container, {ZONE_SELECTOR: zone} if zone else {}),
    }


def _worker_group(
    name: str, region: Region, group: NodeGroup, env: list[dict[str, str]]
) -> dict[str, Any]:
    node_type = group.node_type
    image = region.kubernetes.gpu_image if node_type.gpus else region.kubernetes.image
    container = {
        "name": "ray-worker",
        "image": image,
        "env": env,
        "resources": _resources(node_type.cpus, node_type.memory_gb, node_type.gpus),
    }
    selector = {INSTANCE_TYPE_SELECTOR: node_type.instance_type}
    if group.zone:
        selector[ZONE_SELECTOR] = group.zone
    return {
        "groupName": group.name,
        "replicas": node_type.min_nodes,
        "minReplicas": node_type.min_nodes,
        "maxReplicas": node_type.max_nodes,
        "rayStartParams": {},
        "labels": locality_labels(name, group.zone),
        "template": _pod(container, selector),
    }


def render_rayservice(
    spec: FleetSpec, region: str, *, spec_path: str = DEFAULT_SPEC_PATH
) -> dict[str, Any]:
    """The KubeRay RayService of one kubernetes region."""
    config = region_of(spec, region)
    if config.cloud is not Cloud.KUBERNETES:
        raise LauncherError(f"region {region!r} runs on {config.cloud.value}, not kubernetes")
    fleet_path = posixpath.join(K8S_APP_DIR, spec_path)  # an absolute spec_path stays as is
    env = [{"name": k, "value": v} for k, v in {**cluster_env(), "APP_FLEET": fleet_path}.items()]
    workers = [_worker_group(region, config, group, env) for group in node_groups(region, config)]
    serve = yaml.safe_dump(serve_config(spec, region, fleet_path), sort_keys=False)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": service_name(region), "namespace": config.kubernetes.namespace},
        "spec": {
            "serveConfigV2": serve,
            "serveService": {"spec": {"type": config.kubernetes.service_type}},
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": IDLE_TIMEOUT_MINUTES * 60},
                "authOptions": {"mode": "token"},
                "headGroupSpec": _head_group(region, config, env),
                "workerGroupSpecs": workers,
            },
        },
    }
