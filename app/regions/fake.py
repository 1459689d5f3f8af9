"""A `cloud: local` region with `local.autoscaler: true`: Ray's autoscaler runs over the region's
node_types with its fake multi-node provider (ray/autoscaler/_private/fake_multi_node). Each
worker node it adds is a real raylet on this machine, with the node type's resources and the
region/zone labels a cloud node of that type gets, so replicas that do not fit make the
autoscaler add a node where their label selector points, and an idle node goes away after
`local.idle_timeout_s`, exactly as in a cloud region rendered by app.regions.launcher.

The Ray 2.60 wheel lacks the provider's example config, so this module renders a complete one
from the spec (`app cluster render REGION` prints it). The provider needs RAY_FAKE_CLUSTER=1 in
the head's environment; it fixes the head's node id and type name (FAKE_HEAD_NODE_ID,
FAKE_HEAD_NODE_TYPE below) and starts each worker raylet against `provider.gcs_address`.
"""

from __future__ import annotations

from typing import Any

from app.regions.launcher import locality_labels, node_groups, whole_cpus
from app.regions.spec import Region, local_ports

# Ray's names, ray/autoscaler/_private/fake_multi_node/node_provider.py (not imported: that
# module imports Ray's autoscaler, and rendering a config needs no Ray at all).
FAKE_HEAD_NODE_TYPE = "ray.head.default"
FAKE_CLUSTER_ENV = {"RAY_FAKE_CLUSTER": "1"}
# A fake node's object store: tiny, since replicas pass requests, not large objects, and every
# node on one machine would otherwise reserve 30 % of its memory.
OBJECT_STORE_BYTES = 200 * 1024**2
UPSCALING_SPEED = 1.0


def head_cpus(region: Region) -> int:
    """The head's logical CPUs: as configured, else none, like a cloud region's head."""
    return 0 if region.local.num_cpus is None else region.local.num_cpus


def render_fake(name: str, region: Region) -> dict[str, Any]:
    """The autoscaling config `ray start --head --autoscaling-config` reads for this region."""
    zone = region.zones[0] if region.zones else f"{name}-a"
    node_types: dict[str, Any] = {
        FAKE_HEAD_NODE_TYPE: {
            "resources": {"CPU": head_cpus(region)},
            "labels": locality_labels(name, zone),
            "node_config": {},
            "max_workers": 0,
        }
    }
    for group in node_groups(name, region, None):
        resources: dict[str, Any] = {
            "CPU": whole_cpus(name, f"node_types.{group.type_name}", group.node_type.cpus),
            "object_store_memory": OBJECT_STORE_BYTES,
        }
        if group.node_type.gpus:
            resources["GPU"] = group.node_type.gpus  # logical only: this machine has none
        node_types[group.name] = {
            "resources": resources,
            "labels": locality_labels(name, group.zone),
            "node_config": {},
            "min_workers": group.node_type.min_nodes,
            "max_workers": group.node_type.max_nodes,
        }
    return {
        "cluster_name": f"app-{name}",
        "max_workers": sum(t.get("max_workers", 0) for t in node_types.values()),
        "upscaling_speed": UPSCALING_SPEED,
        "idle_timeout_minutes": region.local.idle_timeout_s / 60,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{local_ports(region.local)['gcs']}",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": node_types,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
