"""What differs between clouds in a region's Ray launcher file: the provider section, each node's
machine config (instance type, zone, disk, GPUs, spot) and the images (app.regions.launcher
assembles the rest)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.regions.spec import Cloud, Region

DISK_GB = 200
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


def head_zone(region: Region) -> str | None:
    """The zone of the head: the provider's (first) availability_zone, else the region's first."""
    zone = region.provider.get("availability_zone")
    if zone:
        return str(zone).split(",")[0].strip()
    return region.zones[0] if region.zones else None


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
