"""app.regions.launcher and app.regions.kuberay: the rendered files pass the checks `ray up` and
the Kubernetes API server would make, and say what the fleet spec says."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.providers import _get_default_config
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from app.catalog.cards import deployment_name
from app.fleet.spec import REGION_LABEL, ZONE_LABEL, FleetSpec, load_fleet
from app.regions import kuberay
from app.regions.launcher import (
    CLOUDS,
    HEAD_NODE_TYPE,
    RAY_VERSION,
    LauncherError,
    render,
    render_launcher,
    render_yaml,
)
from app.regions.spec import Cloud

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "tests/schemas/kuberay/ray.io_rayservices.yaml"


@pytest.fixture(autouse=True)
def _operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered environment comes from app.runtime.cluster_env(), which reads these."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("APP_INGRESS", raising=False)


def fleet(**regions: dict[str, Any]) -> FleetSpec:
    return FleetSpec.model_validate({"regions": regions, "default_region": next(iter(regions))})


def region(cloud: str, **fields: Any) -> dict[str, Any]:
    return {"cloud": cloud, "latitude": 0, "longitude": 0, **fields}


GCP = region(
    "gcp",
    cloud_region="europe-west4",
    zones=["europe-west4-a", "europe-west4-b"],
    provider={"project_id": "p-1"},
    head={"instance_type": "n2-standard-8", "cpus": 8},
    node_types={
        "cpu": {"instance_type": "n2-standard-8", "cpus": 8, "min_nodes": 1, "max_nodes": 3},
        "t4": {
            "instance_type": "n1-standard-8",
            "cpus": 8,
            "gpus": 1,
            "accelerator": "nvidia-tesla-t4",
            "market": "spot",
        },
        "l4": {"instance_type": "g2-standard-8", "cpus": 8, "gpus": 1, "accelerator": "nvidia-l4"},
    },
    models={"echo": 1},
)
AZURE = region(
    "azure",
    cloud_region="eastus",
    zones=["eastus-1", "eastus-2"],
    provider={"resource_group": "rg-app", "subscription_id": "sub-1"},
    head={"instance_type": "Standard_D8s_v5", "cpus": 8},
    node_types={
        "cpu": {"instance_type": "Standard_D8s_v5", "cpus": 8, "max_nodes": 2},
        "spot": {
            "instance_type": "Standard_D8s_v5",
            "cpus": 8,
            "max_nodes": 4,
            "market": "spot",
            "zones": ["eastus-2"],
        },
    },
    models={"echo": 1},
)
KUBE = region(
    "kubernetes",
    zones=["zone-a", "zone-b"],
    kubernetes={"namespace": "serving", "service_type": "LoadBalancer"},
    head={"cpus": 4, "memory_gb": 16},
    node_types={
        "cpu": {
            "instance_type": "m7i.2xlarge",
            "cpus": 8,
            "memory_gb": 32,
            "min_nodes": 1,
            "max_nodes": 3,
        },
        "gpu": {
            "instance_type": "g6.2xlarge",
            "cpus": 8,
            "gpus": 1,
            "max_nodes": 2,
            "zones": ["zone-b"],
        },
    },
    models={"echo": {"min_replicas": 1, "max_replicas": 4}, "tiny-llama": 1},
)


def shipped() -> FleetSpec:
    return load_fleet(ROOT / "deployments/fleet.yaml")


def ray_up_checked(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it talks to a cloud (commands.py _bootstrap_config)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def docker_env(config: dict[str, Any]) -> dict[str, str]:
    options = [
        o.split(" ", 1)[1] for o in config["docker"]["run_options"] if o.startswith("--env ")
    ]
    return dict(option.split("=", 1) for option in options)


def assert_common(config: dict[str, Any], name: str) -> None:
    """What every launcher config must hold, whatever the cloud."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert config["cluster_name"] == f"app-{name}"
    assert head["resources"] == {"CPU": 0}, "the head takes no replicas"
    assert head["labels"][REGION_LABEL] == name
    for type_name, node_type in types.items():
        assert node_type["labels"][REGION_LABEL] == name
        zone = node_type["labels"].get(ZONE_LABEL)
        if type_name != HEAD_NODE_TYPE and zone:
            assert type_name.endswith(f"-{zone}")
    assert config["max_workers"] == sum(t.get("max_workers", 0) for t in types.values())
    env = docker_env(config)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_AUTH_TOKEN" not in env, "the token lives in a file, never in the config"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "--dashboard-host=0.0.0.0" not in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    assert (
        f"cd ~/app && APP_FLEET=deployments/fleet.yaml app up --region {name} "
        "--address auto --host 0.0.0.0"
    ) in config["head_start_ray_commands"]


# --- aws: the shipped fleet ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["us-east-1", "eu-west-1", "ap-southeast-1"])
def test_every_shipped_vm_region_passes_ray_up_checks(name: str) -> None:
    config = render(shipped(), name)
    ray_up_checked(config)
    assert_common(config, name)


def test_aws_node_types_per_zone_with_labels_and_spot() -> None:
    config = render_launcher(shipped(), "us-east-1")
    types = config["available_node_types"]
    assert config["provider"] == {
        "type": "aws",
        "region": "us-east-1",
        "cache_stopped_nodes": False,
        "availability_zone": "us-east-1a,us-east-1b,us-east-1c",
    }
    assert set(types) == {
        HEAD_NODE_TYPE,
        "cpu-us-east-1a",
        "cpu-us-east-1b",
        "gpu-l4-us-east-1c",
    } | {f"gpu-l4-spot-us-east-1{z}" for z in "abc"}
    cpu_b = types["cpu-us-east-1b"]
    assert (cpu_b["min_workers"], cpu_b["max_workers"]) == (1, 4)
    assert cpu_b["resources"] == {"CPU": 8}
    assert cpu_b["labels"] == {REGION_LABEL: "us-east-1", ZONE_LABEL: "us-east-1b"}
    assert cpu_b["node_config"]["Placement"] == {"AvailabilityZone": "us-east-1b"}
    assert "InstanceMarketOptions" not in cpu_b["node_config"]
    spot = types["gpu-l4-spot-us-east-1c"]
    assert spot["resources"] == {"CPU": 8, "GPU": 1}
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert spot["docker"]["worker_image"].endswith("-gpu")
    assert "download.pytorch.org/whl/cpu" not in spot["worker_setup_commands"][0]
    assert "download.pytorch.org/whl/cpu" in config["setup_commands"][0]
    assert types[HEAD_NODE_TYPE]["labels"][ZONE_LABEL] == "us-east-1a"


def test_region_provider_settings_are_merged() -> None:
    spec = shipped().model_dump(mode="json")
    spec["regions"]["eu-west-1"]["provider"] = {"use_internal_ips": True}
    config = render(FleetSpec.model_validate(spec), "eu-west-1")
    assert config["provider"]["use_internal_ips"] is True
    assert config["provider"]["region"] == "eu-west-1"  # cloud_region defaults to the name


def test_cluster_yaml_is_the_rendered_default_region() -> None:
    spec = shipped()
    expected = render_yaml(spec, spec.default_region, spec_path="deployments/fleet.yaml")
    assert (ROOT / "cluster.yaml").read_text() == expected, (
        "cluster.yaml is stale: regenerate it with `app cluster render "
        f"{spec.default_region} > cluster.yaml`"
    )


def test_rendered_yaml_has_a_header_and_parses_back() -> None:
    text = render_yaml(shipped(), "eu-west-1", spec_path="deployments/other.yaml")
    assert text.startswith(
        "# Generated by `app cluster render eu-west-1` from the fleet spec deployments/other.yaml."
    )
    assert yaml.safe_load(text) == render(
        shipped(), "eu-west-1", spec_path="deployments/other.yaml"
    )
    assert "&id" not in text, "no YAML anchors"


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_the_head_installs_the_cloud_sdk_ray_installs_by_default(cloud: str) -> None:
    """The head's autoscaler drives the cloud; a Ray upgrade that changes the SDK shows here."""
    defaults = _get_default_config({"type": cloud})["head_setup_commands"]
    assert [CLOUDS[Cloud(cloud)].head_setup] == defaults


# --- gcp and azure ---------------------------------------------------------------------------


def test_gcp_launcher() -> None:
    config = render(fleet(eu=GCP), "eu")
    ray_up_checked(config)
    assert_common(config, "eu")
    assert config["provider"] == {
        "type": "gcp",
        "region": "europe-west4",
        "availability_zone": "europe-west4-a",
        "project_id": "p-1",
    }
    types = config["available_node_types"]
    # GCP's launcher is zonal: every node type runs in the provider's zone.
    assert set(types) == {
        HEAD_NODE_TYPE,
        "cpu-europe-west4-a",
        "l4-europe-west4-a",
        "t4-europe-west4-a",
    }
    t4 = types["t4-europe-west4-a"]["node_config"]
    assert t4["machineType"] == "n1-standard-8"
    assert t4["guestAccelerators"] == [
        {"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}
    ]
    assert t4["scheduling"] == {
        "onHostMaintenance": "TERMINATE",
        "preemptible": True,
        "automaticRestart": False,
    }
    l4 = types["l4-europe-west4-a"]["node_config"]
    assert "guestAccelerators" not in l4, "g2 machines come with their GPUs"
    assert l4["scheduling"] == {"onHostMaintenance": "TERMINATE"}
    assert "scheduling" not in types["cpu-europe-west4-a"]["node_config"]


def test_azure_launcher() -> None:
    config = render(fleet(east=AZURE), "east")
    ray_up_checked(config)
    assert_common(config, "east")
    assert config["provider"] == {
        "type": "azure",
        "location": "eastus",
        "resource_group": "rg-app",
        "subscription_id": "sub-1",
    }
    types = config["available_node_types"]
    assert set(types) == {HEAD_NODE_TYPE, "cpu-eastus-1", "cpu-eastus-2", "spot-eastus-2"}
    spot = types["spot-eastus-2"]["node_config"]["azure_arm_parameters"]
    assert spot["vmSize"] == "Standard_D8s_v5"
    assert spot["priority"] == "Spot"
    assert spot["availability_zone"] == "2"
    assert "priority" not in types["cpu-eastus-1"]["node_config"]["azure_arm_parameters"]


def test_a_region_without_zones_has_one_node_type_per_spec_type() -> None:
    bare = {
        **AZURE,
        "zones": [],
        "node_types": {"cpu": {"instance_type": "Standard_D8s_v5", "cpus": 8}},
    }
    config = render(fleet(east=bare), "east")
    ray_up_checked(config)
    assert set(config["available_node_types"]) == {"cpu", HEAD_NODE_TYPE}
    assert config["available_node_types"]["cpu"]["labels"] == {REGION_LABEL: "east"}


# --- kubernetes ------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused: the API server would prune them silently."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def test_vendored_crd_is_unchanged_from_upstream() -> None:
    text = CRD.read_text()
    header = re.search(r"sha256 of the upstream file .*: ([0-9a-f]{64})", text)
    assert header is not None
    body = text[text.index("\n---\n") + 1 :]
    assert hashlib.sha256(body.encode()).hexdigest() == header.group(1)


def test_rayservice_matches_the_kuberay_crd(rayservice_schema: dict[str, Any]) -> None:
    service = render(fleet(k8s=KUBE), "k8s")
    jsonschema.Draft7Validator(rayservice_schema).validate(service)
    with pytest.raises(jsonschema.ValidationError):  # the strict schema does catch a typo
        jsonschema.Draft7Validator(rayservice_schema).validate(
            {**service, "spec": {**service["spec"], "rayClusterSpec": {}}}
        )


def test_rayservice_cluster() -> None:
    service = render(fleet(k8s=KUBE), "k8s")
    assert service["metadata"] == {"name": "app-k8s", "namespace": "serving"}
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in [head, *cluster["workerGroupSpecs"]]:
        assert "labels" not in group["rayStartParams"], "KubeRay refuses it: use `labels`"
    assert head["serviceType"] == "ClusterIP", "only Serve's service is public"
    assert service["spec"]["serveService"]["spec"]["type"] == "LoadBalancer"
    assert head["labels"] == {REGION_LABEL: "k8s", ZONE_LABEL: "zone-a"}
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu-zone-a", "cpu-zone-b", "gpu-zone-b"]
    cpu = groups["cpu-zone-b"]
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (1, 1, 3)
    assert cpu["labels"] == {REGION_LABEL: "k8s", ZONE_LABEL: "zone-b"}
    pod = cpu["template"]["spec"]
    assert pod["nodeSelector"] == {
        "node.kubernetes.io/instance-type": "m7i.2xlarge",
        "topology.kubernetes.io/zone": "zone-b",
    }
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "32Gi"}
    gpu = groups["gpu-zone-b"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["image"].endswith("-gpu")
    env = {item["name"]: item["value"] for item in gpu["env"]}
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "RAY_AUTH_TOKEN" not in env, "KubeRay's authOptions supplies the token"


def test_rayservice_serve_config() -> None:
    service = render(fleet(k8s=KUBE), "k8s", spec_path="deployments/fleet.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.http_options.host == "0.0.0.0"
    assert config.http_options.port == 8000
    apps = {app.name: app for app in config.applications}
    fleet_path = f"{kuberay.K8S_APP_DIR}/deployments/fleet.yaml"
    for model in ("echo", "tiny-llama"):
        app = apps[deployment_name(model)]
        assert app.route_prefix == f"/models/{model}"
        assert app.import_path == "app.serving.builder:build_model_app"
        assert app.args == {"model": model, "fleet": fleet_path, "region": "k8s"}
    from app.serving.builder import GATEWAY_APP

    gateway = apps[GATEWAY_APP]
    assert gateway.route_prefix == "/"
    assert gateway.import_path == "app.serving.builder:build_gateway_app"
    assert gateway.args == {"fleet": fleet_path, "region": "k8s", "models": ["echo", "tiny-llama"]}


# --- what cannot be rendered -----------------------------------------------------------------


def test_a_local_region_has_no_launcher_file() -> None:
    with pytest.raises(LauncherError, match="app cluster up"):
        render(fleet(dev=region("local")), "dev")


@pytest.mark.parametrize(
    ("spec", "name", "message"),
    [
        (fleet(eu=GCP), "nowhere", r"unknown region 'nowhere'; the spec has \['eu'\]"),
        (fleet(eu={**GCP, "provider": {}}), "eu", "needs zones and provider.project_id"),
        (fleet(east={**AZURE, "provider": {}}), "east", "needs provider.resource_group"),
        (
            fleet(
                eu={
                    **GCP,
                    "node_types": {
                        "cpu": {"instance_type": "n2", "cpus": 8, "zones": ["europe-west4-b"]}
                    },
                }
            ),
            "eu",
            r"node_types.cpu.zones \['europe-west4-b'\]: Ray's GCP launcher puts every node in one zone",
        ),
        (
            fleet(east={**AZURE, "node_types": {"cpu": {"instance_type": "D4", "cpus": 3.5}}}),
            "east",
            "node_types.cpu.cpus is 3.5; use whole CPUs",
        ),
        (fleet(east={**AZURE, "node_types": {}}), "east", "serves models but has no node_types"),
        (
            fleet(
                east={
                    **AZURE,
                    "zones": [],
                    "node_types": {"head": {"instance_type": "D4", "cpus": 4}},
                }
            ),
            "east",
            r"node type names \['head'\] clash",
        ),
    ],
)
def test_bad_input_names_the_problem(spec: FleetSpec, name: str, message: str) -> None:
    with pytest.raises(LauncherError, match=message):
        render(spec, name)


def test_a_rayservice_name_follows_kuberays_rule() -> None:
    with pytest.raises(
        LauncherError, match=re.escape("RayService name 'app-eu.west' must be at most 47")
    ):
        render(fleet(**{"eu.west": KUBE}), "eu.west")
    with pytest.raises(LauncherError, match="must be at most 47"):
        render(fleet(**{"x" * 44: KUBE}), "x" * 44)


def test_launcher_and_kuberay_refuse_each_others_regions() -> None:
    with pytest.raises(
        LauncherError, match="runs on kubernetes; the launcher handles aws, gcp, azure"
    ):
        render_launcher(fleet(k8s=KUBE), "k8s")
    with pytest.raises(LauncherError, match="runs on gcp, not kubernetes"):
        kuberay.render_rayservice(fleet(eu=GCP), "eu")
