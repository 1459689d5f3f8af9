"""app.regions.fake: a local region's autoscaler config is one Ray's monitor accepts and says what
the spec's node types say; app.regions.local starts the head with it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_TYPE as RAY_HEAD_TYPE,
)
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import validate_config

from app.fleet.spec import REGION_LABEL, ZONE_LABEL, FleetSpec
from app.regions import local
from app.regions.fake import FAKE_HEAD_NODE_TYPE, OBJECT_STORE_BYTES, render_fake
from app.regions.launcher import render
from app.regions.spec import Region


def elastic(**local_fields: Any) -> dict[str, Any]:
    return {
        "cloud": "local",
        "latitude": 0,
        "longitude": 0,
        "zones": ["el-a", "el-b"],
        "local": {"port_base": 28000, "autoscaler": True, **local_fields},
        "node_types": {
            "cpu": {"instance_type": "fake", "cpus": 2, "max_nodes": 3},
            "gpu": {"instance_type": "fake-gpu", "cpus": 4, "gpus": 1, "zones": ["el-b"]},
        },
        "models": {"echo": {"min_replicas": 1, "max_replicas": 4}},
    }


def test_the_config_passes_rays_schema_and_names_rays_head_type() -> None:
    config = render_fake("el", Region.model_validate(elastic()))
    validate_config(config)  # what the monitor checks when it (re)reads the file
    assert FAKE_HEAD_NODE_TYPE == RAY_HEAD_TYPE  # the provider tags its head with this name
    assert config["head_node_type"] == RAY_HEAD_TYPE
    assert config["provider"]["type"] == "fake_multinode"
    assert "fake_multinode" in _NODE_PROVIDERS
    assert config["provider"]["gcs_address"] == "127.0.0.1:28000"


def test_node_types_per_zone_with_the_regions_labels_and_bounds() -> None:
    types = render_fake("el", Region.model_validate(elastic()))["available_node_types"]
    assert set(types) == {RAY_HEAD_TYPE, "cpu-el-a", "cpu-el-b", "gpu-el-b"}
    assert types["cpu-el-a"]["labels"] == {REGION_LABEL: "el", ZONE_LABEL: "el-a"}
    assert types["cpu-el-b"]["resources"] == {"CPU": 2, "object_store_memory": OBJECT_STORE_BYTES}
    assert (types["cpu-el-b"]["min_workers"], types["cpu-el-b"]["max_workers"]) == (0, 3)
    assert types["gpu-el-b"]["resources"]["GPU"] == 1
    assert types[RAY_HEAD_TYPE]["resources"] == {"CPU": 0}  # like a cloud head: no replicas
    assert types[RAY_HEAD_TYPE]["labels"] == {REGION_LABEL: "el", ZONE_LABEL: "el-a"}


def test_idle_timeout_and_head_cpus_come_from_the_spec() -> None:
    config = render_fake("el", Region.model_validate(elastic(idle_timeout_s=30, num_cpus=1)))
    assert config["idle_timeout_minutes"] == 0.5
    assert config["available_node_types"][RAY_HEAD_TYPE]["resources"] == {"CPU": 1}
    assert config["max_workers"] == 3 + 3 + 1


def test_app_cluster_render_prints_it_for_such_a_region() -> None:
    spec = FleetSpec.model_validate({"regions": {"el": elastic()}, "default_region": "el"})
    assert render(spec, "el") == render_fake("el", spec.regions["el"])


def test_the_head_starts_with_the_config_and_its_cpus(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("APP_LOCAL_REGIONS_DIR", str(tmp_path))
    command = local.start_command("el", Region.model_validate(elastic(num_cpus=1)))
    assert f"--autoscaling-config={tmp_path / 'el' / 'autoscaler.yaml'}" in command
    assert "--num-cpus=1" in command
    plain = dict(elastic(), local={"port_base": 28000, "num_cpus": 3}, node_types={})
    plain_command = local.start_command("el", Region.model_validate(plain))
    assert not any(arg.startswith("--autoscaling-config") for arg in plain_command)


def test_an_autoscaler_without_node_types_is_refused() -> None:
    spec = dict(elastic(), node_types={}, models={})
    with pytest.raises(ValidationError, match=r"local\.autoscaler needs node_types"):
        Region.model_validate(spec)
